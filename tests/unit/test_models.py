"""Tiny presets, the char tokenizer, load_model and the architecture helpers (all offline, a few seconds)."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

from tuneforge.models import arch
from tuneforge.models.load import ModelLoadError, load_model, model_summary
from tuneforge.models.tiny import PRESETS, _make_config, build_tiny, char_tokenizer, save_tiny

SMALL_PRESETS = ["llama", "gpt2", "gpt_neox", "llama-demo"]
PRINTABLE = "".join(chr(c) for c in range(32, 127)) + "\n\t"


def mcfg(path, **kw):
    fields = {"path": str(path), "dtype": "auto", "trust_remote_code": False, "revision": None,
              "attn_implementation": "sdpa"}
    fields.update(kw)
    return types.SimpleNamespace(**fields)


def ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved directory per preset, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("tiny")
    for preset in SMALL_PRESETS:
        save_tiny(preset, root / preset)
    return root


# --------------------------------------------------------------------------------------------------- tokenizer
def test_char_tokenizer_round_trips_printable_ascii():
    tok = char_tokenizer()
    for text in [PRINTABLE, "  two  spaces ", "a .b ,c", "line1\nline2\n", "x" * 300]:
        encoded = ids(tok, text)
        assert len(encoded) == len(text), "one id per character"
        assert tok.decode(encoded) == text


def test_char_tokenizer_specials_and_no_auto_bos_eos():
    tok = char_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "right"
    assert ids(tok, "ab") == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")]
    for role in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert len(ids(tok, role)) == 1
    assert ids(tok, "é") == [tok.unk_token_id]
    assert tok.decode(ids(tok, "<s>hi</s>"), skip_special_tokens=True) == "hi"


def test_chat_template_renders_roles_and_is_prefix_stable():
    tok = char_tokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "rev abc:"},
        {"role": "assistant", "content": "cba"},
        {"role": "user", "content": "copy xy:"},
        {"role": "assistant", "content": "xy"},
    ]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full == "<|system|>be brief</s><|user|>rev abc:</s><|assistant|>cba</s><|user|>copy xy:</s><|assistant|>xy</s>"
    for i in range(1, len(messages)):
        shorter = tok.apply_chat_template(messages[:i], tokenize=False)
        longer = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        assert longer.startswith(shorter)
        assert ids(tok, longer)[: len(ids(tok, shorter))] == ids(tok, shorter)
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("</s><|assistant|>") and full.startswith(prompt)


# --------------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_preset_builds_and_special_ids_agree(preset):
    model, tok = build_tiny(preset)
    batch = torch.tensor([ids(tok, "sort cba:abc")])
    logits = model(batch).logits
    assert logits.shape == (1, batch.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    for source in (model.config, model.generation_config):
        assert (source.pad_token_id, source.bos_token_id, source.eos_token_id) == (0, 1, 2)


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = build_tiny("llama", seed=5)
    assert torch.equal(torch.rand(3), expected)
    b, _ = build_tiny("llama", seed=5)
    c, _ = build_tiny("llama", seed=6)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_bench_preset_shape_keeps_char_ids_in_range():
    config = _make_config("llama-bench", None, char_tokenizer())
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (512, 1376, 8)
    assert (config.num_attention_heads, config.num_key_value_heads) == (8, 4)
    assert (config.vocab_size, config.max_position_embeddings) == (32000, 4096)
    assert len(char_tokenizer()) < config.vocab_size
    assert set(PRESETS) >= {"llama", "gpt2", "gpt_neox", "llama-demo", "llama-bench"}


def test_vocab_override_and_unknown_preset():
    model, tok = build_tiny("llama", vocab_size=128)
    assert model.get_input_embeddings().weight.shape[0] == 128
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_tiny("llama", vocab_size=10)
    with pytest.raises(ValueError, match="unknown tiny preset"):
        build_tiny("nope")


# --------------------------------------------------------------------------------------------------- load_model
@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_save_then_load_gives_identical_logits(saved, preset):
    reference, _ = build_tiny(preset)
    model, tok = load_model(mcfg(saved / preset))
    batch = torch.tensor([ids(tok, "12+34=46"), ids(tok, "rev abc:cba")[:8]])
    with torch.no_grad():
        assert torch.equal(reference(batch).logits, model(batch).logits)
    assert tok.decode(ids(tok, PRINTABLE)) == PRINTABLE
    assert tok.chat_template == char_tokenizer().chat_template
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for source in (model.config, model.generation_config):
        assert (source.pad_token_id, source.bos_token_id, source.eos_token_id) == (0, 1, 2)
    assert not model.training


def test_load_tiny_prefix_and_dtypes(saved):
    model, _ = load_model(mcfg("tiny:llama", dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_model(mcfg("tiny:llama", dtype="auto"))
    assert next(model.parameters()).dtype == torch.float32
    model, _ = load_model(mcfg(saved / "llama", dtype="float16"))
    assert next(model.parameters()).dtype == torch.float16
    with pytest.raises(ModelLoadError, match="llama-demo"):
        load_model(mcfg("tiny:nope"))


def test_dtype_auto_keeps_checkpoint_dtype(tmp_path):
    model, tok = build_tiny("llama", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(mcfg(tmp_path, dtype="auto"))
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_missing_or_invalid_directories_name_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(mcfg(tmp_path / "absent"))
    assert str(tmp_path / "absent") in str(info.value)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(mcfg(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(_make_config("llama", None, char_tokenizer()).to_dict()))
    with pytest.raises(ModelLoadError, match="no model weights"):
        load_model(mcfg(tmp_path))


# RELIABILITY.md SE-1
def test_pickle_only_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    reference, tok = build_tiny("llama")
    # transformers 5 only writes safetensors, so write the legacy pickle layout by hand.
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "pytorch_model.bin").exists() and not list(tmp_path.glob("*.safetensors"))
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.warns(UserWarning, match="weights_only=True"):
        model, _ = load_model(mcfg(tmp_path))
    assert calls and all(flag is True for flag in calls)
    batch = torch.tensor([ids(tok, "copy ab:ab")])
    assert torch.equal(reference(batch).logits, model(batch).logits)


# RELIABILITY.md BI-6
def test_missing_pad_token_falls_back_to_eos(tmp_path):
    save_tiny("llama", tmp_path)
    tok_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tok_config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    config = json.loads((tmp_path / "config.json").read_text())
    config["pad_token_id"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").unlink()
    with pytest.warns(UserWarning, match="no pad token"):
        model, tok = load_model(mcfg(tmp_path))
    assert tok.pad_token == "</s>" and tok.pad_token_id == 2
    assert model.config.pad_token_id == 2 and model.generation_config.pad_token_id == 2


def test_model_summary():
    model, _ = build_tiny("llama-demo")
    summary = model_summary(model)
    assert summary["model_type"] == "llama" and summary["n_layers"] == 4 and summary["hidden"] == 128
    assert summary["dtype"] == "float32"
    assert summary["n_params"] == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------- arch
EXPECTED_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


@pytest.mark.parametrize("preset", list(EXPECTED_TARGETS))
def test_targets_linears_heads_and_blocks(preset):
    model, _ = build_tiny(preset)
    layers = model.config.num_hidden_layers
    assert arch.default_targets(model) == EXPECTED_TARGETS[preset]
    linears = arch.linear_modules(model)
    heads = arch.output_head_names(model)
    assert heads == ["lm_head"] and not set(heads) & set(linears)
    assert all(any(name.endswith("." + t) for name in linears) for t in EXPECTED_TARGETS[preset])
    per_block = len(linears) // layers
    assert len(linears) == per_block * layers and per_block == (7 if preset == "llama" else 4)
    prefix = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}[preset]
    assert [name for name, _ in arch.blocks(model)] == [f"{prefix}.{i}" for i in range(layers)]
    conv = [arch.is_conv1d(m) for m in linears.values()]
    assert all(conv) if preset == "gpt2" else not any(conv)


def test_conv1d_in_out_follows_storage():
    model, _ = build_tiny("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc
    assert arch.is_conv1d(c_fc) and c_fc.weight.shape == (64, 128)
    assert arch.weight_in_out(c_fc) == (64, 128)
    q = build_tiny("llama")[0].model.layers[0].self_attn.k_proj
    assert arch.weight_in_out(q) == (64, 32)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.ff = nn.Linear(8, 8)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])
        self.trunk = nn.ModuleList([_Block() for _ in range(3)])
        self.lm_head = nn.Linear(8, 20)


def test_structural_fallbacks_for_unknown_architectures():
    model = _Custom()
    assert [name for name, _ in arch.blocks(model)] == ["trunk.0", "trunk.1", "trunk.2"]
    assert arch.output_head_names(model) == ["lm_head"]
    assert "lm_head" not in arch.linear_modules(model)
    assert arch.default_targets(model) == ["0", "ff", "mix"]
