"""``tuneforge.estimate``: the seed's serving rule and can-it-run-llm table number by number, parameter counts against
real models, the saved-activation model against what autograd actually saves, and the ``estimate`` command."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from tuneforge import estimate as est
from tuneforge.cli import main

# The seed's table for Meta-Llama-3-8B-Instruct (from huggingface.co/spaces/Vokturz/can-it-run-llm).
SEED_TABLE = {
    "float32": (27.96, 33.55, 111.83, 34.99),
    "float16/bfloat16": (13.98, 16.77, 55.92, 18.22),
    "int8": (6.99, 8.39, 27.96, 9.83),
    "int4": (3.49, 4.19, 13.98, 5.63),
}
COLUMNS = ("Total Size (GB)", "Inference (GB)", "Training using Adam (GB)", "LoRA Fine-Tuning (GB)")


def test_serving_rule_70b_16bit_is_168_gb():
    assert est.serving_rule_gb(70e9, 16) == pytest.approx(168.0)
    assert est.serving_rule_gb(70e9, 4) == pytest.approx(42.0)


@pytest.mark.parametrize("dtype,column,expected",
                         [(d, c, v) for d, vals in SEED_TABLE.items() for c, v in zip(COLUMNS, vals)])
def test_can_it_run_llm_reproduces_the_seed_table(dtype, column, expected):
    table = est.can_it_run_llm("llama-3-8b")
    assert round(table["rows"][dtype][column], 2) == expected


def test_can_it_run_llm_counts_the_backbone_without_the_head():
    table = est.can_it_run_llm("llama-3-8b")
    assert table["parameters"] == 7_504_924_672 == 8_030_261_248 - 128256 * 4096
    assert table["header_billions"] == 7.6  # the "(7.6B)" of the seed's header: the Space rounds up


@pytest.mark.parametrize("name,published", [("llama-3-8b", 8_030_261_248), ("llama-2-7b", 6_738_415_616),
                                            ("llama-2-70b", 68_976_648_192), ("mistral-7b", 7_241_732_096),
                                            ("qwen2-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400)])
def test_preset_parameter_counts(name, published):
    assert est.param_counts(est.resolve_model(name))["total"] == published


def _meta_model(cfg):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("preset", ["llama", "gpt2", "gpt_neox", "llama-bench"])
def test_counts_match_built_tiny_models(preset):
    from tuneforge.models.tiny import _make_config, char_tokenizer

    cfg = _make_config(preset, None, char_tokenizer())
    model = _meta_model(cfg)
    counts = est.param_counts(est.arch_from_config(cfg))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["backbone"] == sum(p.numel() for p in model.base_model.parameters())


@pytest.mark.parametrize("cfg", [
    Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True),
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=32, attention_bias=True, mlp_bias=True),
])
def test_counts_match_biases_ties_and_head_dim(cfg):
    assert est.param_counts(est.arch_from_config(cfg))["total"] == sum(p.numel() for p in
                                                                       _meta_model(cfg).parameters())


def test_model_inputs(tmp_path):
    assert est.parse_count("7b") == 7_000_000_000 and est.parse_count("70e9") == 70_000_000_000
    assert est.parse_count("125M") == 125_000_000 and est.parse_count("8.03B") == 8_030_000_000
    assert est.parse_count("llama") is None
    LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4).save_pretrained(tmp_path)
    arch = est.resolve_model(str(tmp_path))
    assert (arch.hidden, arch.layers, arch.vocab) == (64, 3, 500)
    with pytest.raises(est.EstimateError, match="no config.json"):
        est.resolve_model(str(tmp_path / ".."))
    with pytest.raises(est.EstimateError, match="llama-3-8b.*tiny:llama-demo"):
        est.resolve_model("llama-9b")


def test_a_bare_count_gives_weights_and_optimizer_only():
    e = est.estimate("7b", method="full", bits=16)
    assert (e.weights, e.gradients, e.optimizer_state) == (14e9, 14e9, 28e9)
    assert e.activations is None and "need the architecture" in e.notes[0]
    with pytest.raises(est.EstimateError, match="layer shapes"):
        est.estimate("7b", method="lora")


def _tiny_llama():
    from tuneforge.models.tiny import build_tiny

    return build_tiny("llama-demo", attn_implementation="sdpa")[0]


ADDITIVE = [("prompt_tuning", {"num_virtual_tokens": 10}), ("p_tuning", {"num_virtual_tokens": 10}),
            ("prefix_tuning", {"num_virtual_tokens": 10}), ("p_tuning_v2", {"num_virtual_tokens": 7}),
            ("houlsby", {}), ("pfeiffer", {"bottleneck": 24}), ("parallel", {}), ("scaled_parallel", {}),
            ("compacter", {}), ("compacter_pp", {"bottleneck": 24}), ("adapter_bias", {})]


def _est_kw(kw):
    return {"virtual_tokens": kw.get("num_virtual_tokens", 20), "bottleneck": kw.get("bottleneck", 0)}


@pytest.mark.parametrize("method,kw", [("full", {}), ("lora", {"rank": 4}), ("freeze", {"top_k": 1}),
                                       ("lora", {"rank": 4, "target_modules": ["q_proj", "v_proj"]}), *ADDITIVE])
def test_trainable_counts_match_tuneforge_methods(method, kw):
    from tuneforge.methods import METHODS, apply_methods, count_parameters

    model = _tiny_llama()
    apply_methods(model, [METHODS[method].Config(**kw)])
    e = est.estimate("tiny:llama-demo", method=method, bits=32, rank=kw.get("rank", 8),
                     targets=kw.get("target_modules"), top_k=kw.get("top_k", 1), **_est_kw(kw))
    assert e.params_trainable == count_parameters(model)[0]


def _saved_bytes(model, batch, seq) -> int:
    """Bytes autograd holds for backward (distinct storages, parameters excluded) in one SFT forward."""
    from tuneforge.algorithms._logps import token_cross_entropy_sum

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(8, 100, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_cross_entropy_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,kw", [("full", {}), ("lora", {"rank": 8}), ("freeze", {"top_k": 2}),
                                       ("lora", {"rank": 8, "target_modules": ["q_proj", "v_proj"]})])
def test_activation_model_matches_what_autograd_saves(method, kw, dtype):
    from tuneforge.methods import METHODS, apply_methods

    model = _tiny_llama().to(dtype)
    apply_methods(model, [METHODS[method].Config(**kw)])
    model.train()
    got = _saved_bytes(model, 2, 64)
    e = est.estimate("tiny:llama-demo", method=method, bits=32 if dtype == torch.float32 else 16, batch=2, seq=64,
                     rank=kw.get("rank", 8), targets=kw.get("target_modules"), top_k=kw.get("top_k", 1))
    assert e.activations == pytest.approx(got, rel=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,kw", ADDITIVE)
def test_additive_methods_activation_model_matches_what_autograd_saves(method, kw, dtype):
    """Soft prompts keep every block's activations (and, with a prefix, K/V repeated to every head at T + n and a
    mask per layer); bottleneck adapters leave block 0 (or its attention) out. Within 2% of autograd's saved
    tensors (rotary cos/sin and the head's small tensors are not modelled)."""
    from tuneforge.methods import METHODS, apply_methods

    model = _tiny_llama().to(dtype)
    apply_methods(model, [METHODS[method].Config(**kw)])
    model.train()
    got = _saved_bytes(model, 2, 64)
    e = est.estimate("tiny:llama-demo", method=method, bits=32 if dtype == torch.float32 else 16, batch=2, seq=64,
                     **_est_kw(kw))
    assert e.activations == pytest.approx(got, rel=0.02)


def test_soft_prompts_cost_about_full_fine_tunings_activations():
    """The seeds' memory slide: prompt methods backpropagate through every layer, so their activations are of the
    order of full fine-tuning's (Llama-2-7B, 4 x 1024 tokens: 16.4 vs 22.9 GiB; the frozen linears keep no inputs),
    while their optimizer state is negligible."""
    kw = dict(model="llama-2-7b", bits=16, batch=4, seq=1024)
    full, prefix = est.estimate(method="full", **kw), est.estimate(method="prefix_tuning", **kw)
    assert 0.6 < prefix.activations / full.activations < 1.3
    assert prefix.params_trainable == 20 * 32 * 2 * 4096 and prefix.training < full.training / 2
