"""SmolLM2-135M-Instruct from its GGUF package loads through tuneforge exactly as transformers' own GGUF loader
reads it (same logits, same tokenizer and chat template), and the light commands work on it by name."""

import json

import pytest
import torch
from .conftest import SMOLLM2, smollm2_mcfg

from tuneforge.cli import main
from tuneforge.models.load import load_model, load_tokenizer, meta_model


@pytest.fixture(scope="module")
def direct(smollm2_file):
    """transformers reading the GGUF itself: the anchor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_file.parent), gguf_file=smollm2_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_file.parent), gguf_file=smollm2_file.name,
                                                 dtype=torch.float32)
    return model.eval(), tok


def test_loads_like_transformers_gguf_reader(smollm2_dir, direct):
    model, tok = load_model(smollm2_mcfg())
    ref, ref_tok = direct
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    msgs = [{"role": "user", "content": "Name a colour."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.chat_template == ref_tok.chat_template and tok.eos_token == "<|im_end|>"
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)
    assert not getattr(model, "is_quantized", False)  # saveable: merge and full fine-tuning write it


def test_bf16_and_light_loaders(smollm2_dir):
    model, _ = load_model(smollm2_mcfg(dtype="bfloat16"))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert load_tokenizer(smollm2_mcfg()).chat_template
    meta = meta_model(smollm2_mcfg())
    assert next(meta.parameters()).device.type == "meta"


def test_commands_take_the_packaged_name(smollm2_dir, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("red", "blue", "green")]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {SMOLLM2}}}\ndata: {{train: {data}, max_len: 64}}\n"
                      f"method: [{{name: lora, rank: 4}}]\n")
    for argv in (["validate", str(recipe)], ["data", "check", str(data), "--model", SMOLLM2],
                 ["estimate", "--model", SMOLLM2], ["ls", "--model", SMOLLM2]):
        with pytest.raises(SystemExit) as code:
            main(argv)
        assert code.value.code == 0, (argv, capsys.readouterr())
    out = capsys.readouterr().out
    assert "OK" in out and "134,515,008" in out
