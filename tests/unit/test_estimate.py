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


@pytest.mark.parametrize("method,kw", [("full", {}), ("lora", {"rank": 4}), ("freeze", {"top_k": 1}),
                                       ("lora", {"rank": 4, "target_modules": ["q_proj", "v_proj"]})])
def test_trainable_counts_match_tuneforge_methods(method, kw):
    from tuneforge.methods import METHODS, apply_methods, count_parameters

    model = _tiny_llama()
    apply_methods(model, [METHODS[method].Config(**kw)])
    e = est.estimate("tiny:llama-demo", method=method, bits=32, rank=kw.get("rank", 8),
                     targets=kw.get("target_modules"), top_k=kw.get("top_k", 1))
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


def test_detailed_mode_rules():
    base = dict(model="llama-3-8b", batch=1, seq=512)
    lora16, qlora = est.estimate(method="lora", bits=16, **base), est.estimate(method="qlora", bits=16, **base)
    assert qlora.bits == 4 and qlora.weights < lora16.weights / 2.5
    assert est.NF4_BITS == pytest.approx(4.127, abs=1e-3)
    assert lora16.adapter == lora16.params_trainable * 4 == lora16.gradients  # fp32 adapters and their gradients
    assert lora16.optimizer_state == 8 * lora16.params_trainable
    eight = est.estimate(method="lora", bits=16, optimizer="adamw8bit", **base)
    assert eight.optimizer_state / eight.params_trainable == pytest.approx(2.0, abs=0.01)
    assert est.estimate(method="lora", optimizer="sgd", **base).optimizer_state == 0
    f1, f4 = est.estimate(method="freeze", top_k=1, **base), est.estimate(method="freeze", top_k=4, **base)
    assert f4.params_trainable == 4 * f1.params_trainable and f4.activations > 3 * f1.activations
    full = est.estimate(method="full", bits=32, **base)
    assert full.training >= full.weights + full.gradients + full.optimizer_state
    assert est.estimate(method="none", **base).training is None
    with pytest.raises(est.EstimateError, match="cannot train in 4-bit"):
        est.estimate(method="full", bits=4, **base)
    with pytest.raises(est.EstimateError, match="unknown LoRA targets"):
        est.estimate(method="lora", targets=["c_attn"], **base)
    with pytest.raises(est.EstimateError, match="no bias|has none"):
        est.estimate(method="bitfit", **base)
    assert est.estimate("qwen2-0.5b", method="bitfit").params_trainable == 24 * (896 + 2 * 128)


def test_head_chunk_constant_matches_the_loss_code():
    from tuneforge.algorithms._head_logps import CHUNK_ELEMENTS

    assert est.HEAD_CHUNK_ELEMENTS == CHUNK_ELEMENTS


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["estimate", *argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_can_it_run_llm_table(capsys):
    code, out, _ = _cli(["--model", "llama-3-8b", "--mode", "can-it-run-llm"], capsys)
    assert code == 0
    for number in ("27.96", "16.77", "111.83", "34.99", "5.63", "(7.6B"):
        assert number in out


def test_cli_detailed_and_json(capsys):
    code, out, _ = _cli(["--model", "tiny:llama", "--method", "lora", "--rank", "4", "--bits", "32"], capsys)
    assert code == 0 and "training peak" in out and "activations" in out
    code, out, _ = _cli(["--model", "mistral-7b", "--method", "qlora", "--json"], capsys)
    assert code == 0 and json.loads(out)["bits"] == 4


def test_cli_errors_are_clear(capsys):
    code, _, err = _cli(["--model", "gpt-5"], capsys)
    assert code == 2 and "known presets" in err and "llama-2-70b" in err
    code, _, err = _cli(["--model", "7b", "--method", "lora"], capsys)
    assert code == 2 and "config.json" in err
