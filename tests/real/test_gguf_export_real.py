"""GGUF out on a real model: SmolLM2-135M-Instruct (loaded from its Q4_1 GGUF package) exported to f32 and q8_0
with the source file's tokenizer metadata, then read back by transformers' own GGUF reader.

f32 holds the loaded (dequantised) weights exactly, so logits are identical (max |diff| 0.0). q8_0 re-quantises
them (about 0.5% relative RMS error per tensor, Q8_0's usual); measured max |logit diff| on the chat prompt below is
1.32 on logits up to 37.6 in magnitude (bound 2.5), and the 8 greedy tokens ("The capital of France is Paris."
and <|im_end|>) are the same. (f16, not tested here: 0.041.)

The tier's conftest points TUNEFORGE_CACHE at a session temporary folder when it is unset, so the dequantised
SmolLM2 folder never lands in the user's cache.
"""

import copy

import gguf
import numpy as np
import pytest
import torch
from .conftest import smollm2_mcfg

from tuneforge.export import write_lora_gguf, write_model_gguf
from tuneforge.methods import apply_methods, lora
from tuneforge.models.load import load_model

pytestmark = pytest.mark.real

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
TEXTS = ["Hello, world! 1234 numbers; isn't it?", "  two spaces\tand a tab\n", "<|im_start|>user\nhi<|im_end|>"]
LOGIT_BOUND = {"f32": 1e-5, "q8_0": 2.5}


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    model, tok = load_model(smollm2_mcfg())
    return model.eval(), tok


@torch.no_grad()
def greedy(model, ids, n=8):
    x = torch.tensor([ids])
    for _ in range(n):
        x = torch.cat([x, model(input_ids=x).logits[:, -1:].argmax(-1)], dim=1)
    return x[0, len(ids):].tolist()


def tokenizer_fields(path):
    r = gguf.GGUFReader(path)
    return {k: (f.types, [bytes(f.parts[i]) for i in f.data]) for k, f in r.fields.items()
            if k.startswith("tokenizer.")}


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_smollm2_exports_and_reads_back(smol, smollm2_file, tmp_path, outtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = smol
    out = write_model_gguf(model, tok, tmp_path / f"smollm2-{outtype}.gguf", outtype, source_gguf=smollm2_file)
    assert tokenizer_fields(out) == tokenizer_fields(smollm2_file)

    back_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert back_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
    assert back_tok.chat_template == tok.chat_template
    for text in TEXTS:
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"], text

    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings and back.config.num_key_value_heads == 3
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (model(input_ids=x).logits - back(input_ids=x).logits).abs().max().item()
    assert diff <= LOGIT_BOUND[outtype], diff
    assert greedy(back, ids) == greedy(model, ids)


def test_smollm2_lora_fits_the_llama_cpp_base(smol, smollm2_file, tmp_path):
    """Every adapter tensor names a tensor of the GGUF llama.cpp itself wrote, with the shapes its loader checks:
    lora_a (in, r) against the base's ne[0], lora_b (r, out) against its ne[1]."""
    import copy

    model = copy.deepcopy(smol[0])
    apply_methods(model, [lora.Config(rank=8, alpha=16.0, rslora=True)])
    reader = gguf.GGUFReader(write_lora_gguf(model, "default", tmp_path / "a.gguf", "f16"))
    base = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(smollm2_file).tensors}
    adapted = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert len(adapted) == 2 * 7 * 30  # q k v o gate up down, 30 blocks
    for name, shape in adapted.items():
        target, part = name.rsplit(".", 1)
        assert target in base, name
        if part == "lora_a":
            assert shape == [base[target][0], 8]
        else:
            assert shape == [8, base[target][1]]
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert np.isclose(alpha / 8, 16.0 / np.sqrt(8))


def test_cli_exports_the_packaged_model_with_its_tokenizer(smollm2_dir, smollm2_file, tmp_path, capsys):
    from tuneforge.cli import main

    out = tmp_path / "smol.gguf"
    with pytest.raises(SystemExit) as code:
        main(["export", "gguf", "--model", "smollm2", "--out", str(out), "--type", "q8_0"])
    assert code.value.code == 0, capsys.readouterr().err
    assert tokenizer_fields(out) == tokenizer_fields(smollm2_file)
    kv = gguf.GGUFReader(out).fields
    assert kv["general.name"].contents() == "smol" and kv["general.file_type"].contents() == 7  # MOSTLY_Q8_0
