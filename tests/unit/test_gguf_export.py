"""GGUF out: merged models and LoRA adapters in llama.cpp's format, checked by reading them back.

Models go through transformers' own GGUF reader (``from_pretrained(..., gguf_file=...)``), which undoes llama.cpp's
q/k permutation and dequantises, so logits compare directly. LoRA files are read with ``gguf.GGUFReader`` and
rebuilt into weights the way llama.cpp applies them (W + alpha/r * B A).

Measured on these models (seeded, 2 layers, logits of magnitude ~1): f32 is exact (max |diff| 0.0); f16 max
|logit diff| ~3e-4; q8_0 ~7e-3. The bounds below are f16 2e-3 and q8_0 3e-2.
"""

import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tuneforge.cli import main
from tuneforge.export import GgufExportError, write_lora_gguf, write_model_gguf
from tuneforge.export.gguf import llama3_rope_factors, permute_qk, unpermute_qk
from tuneforge.methods import apply_methods, merge_methods, save_adapter
from tuneforge.methods import ia3, lora
from tuneforge.models.tiny import build_tiny

TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! 1234 numbers; isn't it?",
         "Ünïcödé text — and émojis 🙂", "def f(x):\n    return x + 1\n", "  two spaces\tand a tab\n\n",
         "<|im_start|>user\nhi <think> there<|im_end|>"]


# ------------------------------------------------------------------------------------------------------- helpers
def tiny(model_type="llama", seed=0, **over):
    """A seeded tiny causal LM; norms and biases get non-trivial values so a misplaced vector would show."""
    kw = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=256, tie_word_embeddings=False)
    if model_type == "mistral":
        kw["sliding_window"] = None
    kw.update(over)
    cfg = AutoConfig.for_model(model_type, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.data = torch.randn_like(p) * 0.1 + (0.0 if name.endswith("bias") else 1.0)
    return model.eval()


def bpe_tokenizer(add_bos=False) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained on a few strings, with ChatML specials and a plain added token."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TEXTS * 10, trainer)
    backend.add_tokens([AddedToken("<think>", normalized=False, special=False)])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[
            ("<|im_start|>", backend.token_to_id("<|im_start|>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def readback(path, config=None):
    """transformers' GGUF reader; ``config`` only where GGUF metadata cannot say it (llama's optional attention
    biases: llama.cpp loads them when the tensors are present, transformers builds its model from keys alone)."""
    extra = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                **extra).eval()


def ids(n=12, vocab=120, seed=1):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy(model, x, n=8):
    for _ in range(n):
        x = torch.cat([x, model(input_ids=x).logits[:, -1:].argmax(-1)], dim=1)
    return x


@torch.no_grad()
def max_logit_diff(a, b, x):
    return (a(input_ids=x).logits - b(input_ids=x).logits).abs().max().item()


def fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# ---------------------------------------------------------------------------------------------------- tensors
CASES = {
    "llama-gqa": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-head_dim": ("llama", {"head_dim": 32}),  # head_dim * heads != hidden: key/value length written
    "llama-bias": ("llama", {"attention_bias": True}),  # q/k biases are permuted like their weights
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_f32_reads_back_with_the_same_logits_and_greedy_tokens(tmp_path, case):
    model_type, over = CASES[case]
    model = tiny(model_type, **over)
    out = write_model_gguf(model, None, tmp_path / "m.gguf", "f32", with_tokenizer=False)
    back = readback(out, model.config if over.get("attention_bias") else None)
    x = ids()
    assert max_logit_diff(model, back, x) <= TOLERANCE["f32"]
    assert torch.equal(greedy(model, x), greedy(back, x))
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_f16_and_q8_0_within_tolerance(tmp_path, outtype):
    model = tiny("llama")
    back = readback(write_model_gguf(model, None, tmp_path / f"m-{outtype}.gguf", outtype, with_tokenizer=False))
    diff = max_logit_diff(model, back, ids())
    assert 0 < diff <= TOLERANCE[outtype], diff


def test_tensor_types_follow_llama_cpp(tmp_path):
    """Vectors stay F32; q8_0 applies to rows that are whole 32-blocks, 48-wide rows fall back to F16."""
    model = tiny("llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    out = write_model_gguf(model, None, tmp_path / "m.gguf", "q8_0", with_tokenizer=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    Q = gguf.GGMLQuantizationType
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == Q.F32
    assert types["blk.0.attn_q.weight"] == Q.F16  # rows of 48 (the hidden size)
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0  # rows of 64 (the FFN width)
    back = readback(out)
    assert max_logit_diff(model, back, ids()) <= TOLERANCE["q8_0"]


def test_metadata(tmp_path):
    model = tiny("llama", rope_theta=50000.0, rms_norm_eps=1e-5, max_position_embeddings=300)
    out = write_model_gguf(model, None, tmp_path / "m.gguf", "q8_0", with_tokenizer=False, name="tiny-test")
    _, kv = fields(out)
    assert kv["general.architecture"] == "llama" and kv["general.name"] == "tiny-test"
    assert kv["general.type"] == "model" and kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expect = {"context_length": 300, "embedding_length": 64, "block_count": 2, "feed_forward_length": 96,
              "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
              "vocab_size": 120}
    assert {k: kv[f"llama.{k}"] for k in expect} == expect
    assert kv["llama.rope.freq_base"] == 50000.0
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert not any(k.startswith("tokenizer.") for k in kv)


def test_qk_are_stored_in_llama_cpp_layout(tmp_path):
    """The file's attn_q/attn_k are convert_hf_to_gguf's permutation of q_proj/k_proj (GQA: k by its own head
    count), and transformers' GGUF reader's reverse permutation gives the Hugging Face weights back."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    model = tiny("llama", num_attention_heads=4, num_key_value_heads=1)
    out = write_model_gguf(model, None, tmp_path / "m.gguf", "f32", with_tokenizer=False)
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    attn = model.model.layers[1].self_attn
    q, k = attn.q_proj.weight.detach(), attn.k_proj.weight.detach()
    assert np.array_equal(stored["blk.1.attn_q.weight"], permute_qk(q, 4).numpy())
    assert np.array_equal(stored["blk.1.attn_k.weight"], permute_qk(k, 1).numpy())
    assert not np.array_equal(stored["blk.1.attn_q.weight"], q.numpy())
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 1})
    assert np.array_equal(proc.process(stored["blk.1.attn_k.weight"], "blk.1.attn_k.weight").weights, k.numpy())
    assert torch.equal(unpermute_qk(permute_qk(q, 4), 4), q)


def test_llama3_rope_is_written_as_llama_cpp_rope_freqs(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny("llama", rope_parameters=rope, max_position_embeddings=256)
    out = write_model_gguf(model, None, tmp_path / "m.gguf", "f16", with_tokenizer=False)
    freqs = {t.name: t for t in gguf.GGUFReader(out).tensors}["rope_freqs.weight"]
    assert freqs.tensor_type == gguf.GGMLQuantizationType.F32 and list(freqs.shape) == [8]
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    factors = llama3_rope_factors(model.config, 500000.0, rope)
    assert np.allclose(plain / factors, hf_inv.numpy(), rtol=1e-5)
    assert factors[0] == 1.0 and factors[-1] == 8.0  # fastest kept, slowest slowed by the full factor


def test_unsupported_model_type_names_it_and_what_is_supported(tmp_path):
    model, tok = build_tiny("gpt2")
    with pytest.raises(GgufExportError, match=r"model_type 'gpt2'.*supported: llama, mistral, qwen2"):
        write_model_gguf(model, tok, tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.iterdir())


def test_adapter_layers_must_be_merged_first(tmp_path):
    model = tiny("llama")
    apply_methods(model, [lora.Config(rank=2)])
    with pytest.raises(GgufExportError, match="merge them first"):
        write_model_gguf(model, None, tmp_path / "m.gguf", "f16", with_tokenizer=False)


# -------------------------------------------------------------------------------------------------- tokenizer
def test_word_level_tokenizer_is_refused_and_nothing_is_written(tmp_path):
    model, tok = build_tiny("llama")
    with pytest.raises(GgufExportError, match="not byte-level BPE"):
        write_model_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary
    write_model_gguf(model, tok, tmp_path / "m.gguf", "f32", with_tokenizer=False)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_bpe_tokenizer_reads_back_with_the_same_ids_and_chat_template(tmp_path):
    tok = bpe_tokenizer()
    model = tiny("llama", vocab_size=len(tok) + 3, tie_word_embeddings=True)  # 3 ids the tokenizer lacks
    out = write_model_gguf(model, tok, tmp_path / "m.gguf", "f32")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    msgs = [{"role": "user", "content": "Hello, world!"}]
    assert back.chat_template == CHATML
    assert back.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert (back.bos_token, back.eos_token, back.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")

    _, kv = fields(out)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == model.config.vocab_size
    T = gguf.TokenType
    vocab = tok.get_vocab()
    assert types[vocab["<|im_end|>"]] == T.CONTROL and types[vocab["<think>"]] == T.USER_DEFINED
    assert types[vocab["Ġthe"]] == T.NORMAL and tokens[vocab["Ġthe"]] == "Ġthe"
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-3:] == [T.UNUSED] * 3
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert kv["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.padding_token_id"]) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert kv["tokenizer.ggml.add_bos_token"] is False and kv["tokenizer.chat_template"] == CHATML


def test_pre_tokenizer_ids_name_llama_cpp_regexes():
    from tokenizers import Regex

    from tuneforge.export.gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT, pre_tokenizer_id

    def as_json(pre):
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre
        return json.loads(backend.to_str())["pre_tokenizer"]

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = lambda rx: pre_tokenizers.Split(Regex(rx), behavior="isolated")  # noqa: E731
    assert pre_tokenizer_id(as_json(pre_tokenizers.ByteLevel(add_prefix_space=False))) == "gpt-2"
    assert pre_tokenizer_id(as_json(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                             pre_tokenizers.ByteLevel(add_prefix_space=False)]))) \
        == "smollm"
    assert pre_tokenizer_id(as_json(pre_tokenizers.Sequence([split(_LLAMA3_SPLIT), byte_level]))) == "llama-bpe"
    assert pre_tokenizer_id(as_json(pre_tokenizers.Sequence([split(_QWEN2_SPLIT), byte_level]))) == "qwen2"
    with pytest.warns(UserWarning, match="no llama.cpp name"):
        assert pre_tokenizer_id(as_json(pre_tokenizers.Sequence([split(r"\w+"), byte_level]))) == "default"


def test_add_bos_is_read_off_the_tokenizers_behaviour(tmp_path):
    tok = bpe_tokenizer(add_bos=True)
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    model = tiny("llama", vocab_size=len(tok))
    out = write_model_gguf(model, tok, tmp_path / "m.gguf", "f16")
    assert fields(out)[1]["tokenizer.ggml.add_bos_token"] is True


def test_source_gguf_tokenizer_is_copied_byte_for_byte(tmp_path):
    tok = bpe_tokenizer()
    source = write_model_gguf(tiny("llama", vocab_size=len(tok)), tok, tmp_path / "src.gguf", "q8_0")
    tuned = tiny("llama", seed=5, vocab_size=len(tok))
    out = write_model_gguf(tuned, None, tmp_path / "out.gguf", "f32", source_gguf=source)

    def raw(path):
        r = gguf.GGUFReader(path)
        return {k: (f.types, [bytes(f.parts[i]) for i in f.data]) for k, f in r.fields.items()
                if k.startswith("tokenizer.")}

    assert raw(out) == raw(source) and "tokenizer.ggml.tokens" in raw(out)
    with pytest.raises(GgufExportError, match="tokens but the model's embedding has"):
        write_model_gguf(tiny("llama", vocab_size=len(tok) + 1), None, tmp_path / "bad.gguf", "f32",
                         source_gguf=source)


# ------------------------------------------------------------------------------------------------------- LoRA
def lora_model(model_type="llama", seed=0, **cfg_kw):
    model = tiny(model_type, seed=seed)
    cfg = lora.Config(rank=4, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                      **cfg_kw)
    apply_methods(model, [cfg])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for layer in lora.lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.1)
    return model, cfg


@pytest.mark.parametrize("model_type,rslora", [("llama", False), ("llama", True), ("qwen2", False)])
def test_lora_gguf_rebuilds_the_merged_weights(tmp_path, model_type, rslora):
    model, cfg = lora_model(model_type, rslora=rslora)
    out = write_lora_gguf(model, "default", tmp_path / "a.gguf", "f32", methods=[cfg])
    reader, kv = fields(out)
    assert (kv["general.type"], kv["adapter.type"], kv["general.architecture"]) == ("adapter", "lora", model_type)
    scaling = 8.0 / (4 ** 0.5 if rslora else 4)
    assert kv["adapter.lora.alpha"] == pytest.approx(scaling * 4)  # llama.cpp scales by alpha / r
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 5 * 2  # A and B, 5 targets, 2 blocks
    a, b = tensors["blk.0.attn_k.weight.lora_a"], tensors["blk.0.attn_k.weight.lora_b"]
    assert list(a.shape) == [64, 4] and list(b.shape) == [4, 32]  # ggml order: (in, r) and (r, out)

    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_methods(model, [cfg])
    merged = dict(model.named_parameters())
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    for block in range(2):
        for hf, gg, heads in (("self_attn.q_proj", "attn_q", n_head), ("self_attn.k_proj", "attn_k", n_kv),
                              ("self_attn.v_proj", "attn_v", None), ("self_attn.o_proj", "attn_output", None),
                              ("mlp.down_proj", "ffn_down", None)):
            A = torch.from_numpy(np.array(tensors[f"blk.{block}.{gg}.weight.lora_a"].data))
            B = torch.from_numpy(np.array(tensors[f"blk.{block}.{gg}.weight.lora_b"].data))
            if heads and model_type == "llama":
                B = unpermute_qk(B, heads)
            name = f"model.layers.{block}.{hf}.weight"
            rebuilt = base[name] + kv["adapter.lora.alpha"] / B.shape[1] * (B @ A)
            assert torch.allclose(rebuilt, merged[name].detach(), atol=1e-6), name


def test_lora_gguf_applies_on_the_permuted_base(tmp_path):
    """What llama.cpp computes: the base GGUF's (permuted) q plus alpha/r * B A from the adapter file equals the
    merged model's q, permuted."""
    model, cfg = lora_model("llama")
    adapter = fields(write_lora_gguf(model, "default", tmp_path / "a.gguf", "f32"))[0]
    base = write_model_gguf(tiny("llama"), None, tmp_path / "base.gguf", "f32", with_tokenizer=False)  # same seed
    merge_methods(model, [cfg])
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(base).tensors}
    ad = {t.name: np.array(t.data) for t in adapter.tensors}
    alpha = float(adapter.fields["adapter.lora.alpha"].contents())
    w = stored["blk.1.attn_q.weight"] + alpha / 4 * ad["blk.1.attn_q.weight.lora_b"] @ ad["blk.1.attn_q.weight.lora_a"]
    want = permute_qk(model.model.layers[1].self_attn.q_proj.weight.detach(), 4).numpy()
    assert np.allclose(w, want, atol=1e-6)


def test_lora_q8_0_quantises_only_whole_block_rows(tmp_path):
    model, _ = lora_model("llama")
    reader = gguf.GGUFReader(write_lora_gguf(model, "default", tmp_path / "a.gguf", "q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == gguf.GGMLQuantizationType.Q8_0  # rows of 64 (in features)
    assert types["blk.0.attn_q.weight.lora_b"] == gguf.GGMLQuantizationType.F16  # rows of 4 (the rank)


def test_lora_export_refuses_dora_and_other_methods(tmp_path):
    model, cfg = lora_model("llama", dora=True)
    with pytest.raises(GgufExportError, match="DoRA"):
        write_lora_gguf(model, "default", tmp_path / "a.gguf", "f32")
    with pytest.raises(GgufExportError, match="DoRA"):
        write_lora_gguf(model, "default", tmp_path / "a.gguf", "f32", methods=[cfg])
    model = tiny("llama")
    apply_methods(model, [ia3.Config()])
    with pytest.raises(GgufExportError, match="IA3Layer"):
        write_lora_gguf(model, "default", tmp_path / "a.gguf", "f32")
    with pytest.raises(GgufExportError, match="method 'ia3' is not LoRA"):
        write_lora_gguf(model, "default", tmp_path / "a.gguf", "f32", methods=[ia3.Config()])
    with pytest.raises(GgufExportError, match="no LoRA adapter named 'other'"):
        write_lora_gguf(lora_model("llama")[0], "other", tmp_path / "a.gguf", "f32")
    model = lora_model("llama")[0]
    for layer in model.modules():
        if isinstance(layer, lora.LoraLayer):
            layer.scaling["default"] = 0.0  # e.g. a PEFT adapter saved with lora_alpha 0
    with pytest.raises(GgufExportError, match="scaling is 0"):  # llama.cpp would read alpha 0 as unscaled
        write_lora_gguf(model, "default", tmp_path / "a.gguf", "f32")
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def model_dir(tmp_path):
    """A saved tiny llama with a byte-level BPE tokenizer, and a LoRA adapter saved for it."""
    tok = bpe_tokenizer()
    model = tiny("llama", vocab_size=len(tok))
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = lora.Config(rank=4, alpha=8.0)
    lmodel = tiny("llama", vocab_size=len(tok))  # the same seeded weights as the saved base
    apply_methods(lmodel, [cfg])
    with torch.no_grad():
        for layer in lora.lora_layers(lmodel).values():
            layer.lora_B["default"].weight.normal_(0, 0.1)
    save_adapter(lmodel, [cfg], tmp_path / "adapter", base_path=str(folder))
    merge_methods(lmodel, [cfg])
    return folder, tmp_path / "adapter", lmodel


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as code:
        main(argv)
    return code.value.code, capsys.readouterr()


def test_cli_writes_the_merged_model_and_the_lora(model_dir, tmp_path, capsys):
    folder, adapter, merged = model_dir
    out = tmp_path / "out" / "merged.gguf"
    code, io = run_cli(["export", "gguf", "--model", str(folder), "--adapter", str(adapter), "--out", str(out),
                        "--type", "f32"], capsys)
    assert code == 0, io.err
    assert str(out) in io.out and [p.name for p in out.parent.iterdir()] == ["merged.gguf"]
    assert max_logit_diff(merged, readback(out), ids(vocab=merged.config.vocab_size)) <= TOLERANCE["f32"]
    assert fields(out)[1]["general.name"] == "merged"

    lout = tmp_path / "out" / "adapter.gguf"
    code, io = run_cli(["export", "gguf", "--model", str(folder), "--adapter", str(adapter), "--out", str(lout),
                        "--lora"], capsys)
    assert code == 0, io.err
    kv = fields(lout)[1]
    assert kv["adapter.type"] == "lora" and kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16


def test_cli_user_errors_exit_2_with_one_error_line(model_dir, tmp_path, capsys):
    folder, adapter, _ = model_dir
    out = tmp_path / "x.gguf"
    base = ["export", "gguf", "--model", str(folder), "--out", str(out)]
    code, io = run_cli(base + ["--type", "q4_k"], capsys)
    assert code == 2 and "error:" in io.err and "q4_k" in io.err

    ia3_model = tiny("llama")
    apply_methods(ia3_model, [ia3.Config()])
    save_adapter(ia3_model, [ia3.Config()], tmp_path / "ia3")
    for argv, why in ((base + ["--adapter", str(tmp_path / "ia3"), "--lora"], "not LoRA"),
                      (base + ["--lora"], "--adapter"),
                      (["export", "gguf", "--model", "tiny:llama", "--out", str(out)], "not byte-level BPE"),
                      (["export", "gguf", "--model", "tiny:gpt2", "--out", str(out)], "model_type 'gpt2'")):
        code, io = run_cli(argv, capsys)
        lines = io.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and why in lines[0], (argv, io.err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.gguf")]
