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


# a method config's field -> the ``estimate`` option it is
EST_OPTION = {"num_virtual_tokens": "virtual_tokens", "bottleneck": "bottleneck", "rank": "rank",
              "target_modules": "targets", "top_k": "top_k", "gate": "gate"}


def _est_kw(kw):
    """The ``estimate`` options of a method config's fields (only those given: others are another method's)."""
    return {EST_OPTION[k]: v for k, v in kw.items() if k in EST_OPTION}


@pytest.mark.parametrize("method,kw", [("full", {}), ("lora", {"rank": 4}), ("freeze", {"top_k": 1}),
                                       ("lora", {"rank": 4, "target_modules": ["q_proj", "v_proj"]}), *ADDITIVE])
def test_trainable_counts_match_tuneforge_methods(method, kw):
    from tuneforge.methods import METHODS, apply_methods, count_parameters

    model = _tiny_llama()
    apply_methods(model, [METHODS[method].Config(**kw)])
    e = est.estimate("tiny:llama-demo", method=method, bits=32, **_est_kw(kw))
    assert e.params_trainable == count_parameters(model)[0]


def _saved_bytes(model, batch, seq) -> int:
    """Bytes autograd holds for backward (distinct storages) in one SFT forward. Parameters and buffers are
    excluded: they are resident anyway (intrinsic's projection is a buffer; the estimate counts it apart)."""
    from tuneforge.algorithms._logps import token_cross_entropy_sum

    params = {p.untyped_storage().data_ptr() for p in (*model.parameters(), *model.buffers())}
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


# LoRA on o_proj or the MLP only: the lowest block keeps only its stages from there up, and at the MLP only the
# SwiGLU branches an adapted gate_proj/up_proj makes trainable
LORA_ABOVE_ATTENTION = [("lora", {"rank": 8, "target_modules": t}) for t in
                        (["o_proj"], ["up_proj"], ["gate_proj"], ["down_proj"], ["up_proj", "down_proj"])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,kw", [("full", {}), ("lora", {"rank": 8}), ("freeze", {"top_k": 2}),
                                       ("lora", {"rank": 8, "target_modules": ["q_proj", "v_proj"]}),
                                       *LORA_ABOVE_ATTENTION])
def test_activation_model_matches_what_autograd_saves(method, kw, dtype):
    from tuneforge.methods import METHODS, apply_methods

    model = _tiny_llama().to(dtype)
    apply_methods(model, [METHODS[method].Config(**kw)])
    model.train()
    got = _saved_bytes(model, 2, 64)
    e = est.estimate("tiny:llama-demo", method=method, bits=32 if dtype == torch.float32 else 16, batch=2, seq=64,
                     **_est_kw(kw))
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


# The methods modelled in ``estimate_additive`` beyond single adapters: each case is (method list applied in
# order, the matching ``estimate`` options). Fusion members come from ``members`` (configs only: their weights
# do not change what is saved).
def _fusion(kind, n, **kw):
    return [{"name": "adapter_fusion", "adapters": [f"m{i}" for i in range(n)],
             "members": [{"name": kind, **kw} for _ in range(n)]}]


COMPOSED = {
    "intrinsic": ([{"name": "intrinsic", "dimension": 500}], {"intrinsic_dim": 500}),
    "intrinsic-said": ([{"name": "intrinsic", "dimension": 40, "said": True}], {"intrinsic_dim": 40, "said": True}),
    "intrinsic-dense-qv": ([{"name": "intrinsic", "dimension": 64, "projection": "dense",
                             "target_modules": ["q_proj", "v_proj"]}],
                           {"intrinsic_dim": 64, "projection": "dense", "targets": ["q_proj", "v_proj"]}),
    "intrinsic-down": ([{"name": "intrinsic", "dimension": 300, "target_modules": ["down_proj"]}],
                       {"intrinsic_dim": 300, "targets": ["down_proj"]}),
    **{f"intrinsic-{'-'.join(t.removesuffix('_proj') for t in ts)}": (
        [{"name": "intrinsic", "dimension": 100, "target_modules": ts}], {"intrinsic_dim": 100, "targets": ts})
       for ts in (["gate_proj"], ["up_proj"], ["gate_proj", "up_proj"])},
    "drop-houlsby-2": ([{"name": "houlsby"}, {"name": "adapter_drop", "drop_layers": 2}], {"drop_layers": 2}),
    "drop-pfeiffer-3": ([{"name": "pfeiffer", "bottleneck": 24}, {"name": "adapter_drop", "drop_layers": 3}],
                        {"drop_layers": 3, "adapter_method": "pfeiffer", "bottleneck": 24}),
    "drop-compacter-1": ([{"name": "compacter"}, {"name": "adapter_drop", "drop_layers": 1}],
                         {"drop_layers": 1, "adapter_method": "compacter"}),
    "fusion-pfeiffer-2": (_fusion("pfeiffer", 2), {}),
    "fusion-houlsby-3": (_fusion("houlsby", 3), {"fusion_adapters": 3, "adapter_method": "houlsby"}),
    "fusion-compacter-2": (_fusion("compacter", 2), {"adapter_method": "compacter"}),
    "fusion-bias-4": (_fusion("adapter_bias", 4), {"fusion_adapters": 4, "adapter_method": "adapter_bias"}),
}


def _composed(case, dtype=torch.float32, table=None):
    from tuneforge.methods import METHODS, apply_methods

    cfgs, kw = (table or COMPOSED)[case]
    model = _tiny_llama().to(dtype)
    apply_methods(model, [METHODS[c["name"]].Config(**c) for c in cfgs])
    return model, cfgs[-1]["name"], kw


@pytest.mark.parametrize("case", sorted(COMPOSED))
def test_intrinsic_drop_and_fusion_counts_match_the_methods(case):
    """Trainable numbers exactly (intrinsic: d, θ and SAID's λ together; AdapterDrop: the adapter over the blocks
    from k up; AdapterFusion: 3 d^2 + 3 d a site), and every added tensor (fusion members are frozen but resident)."""
    from tuneforge.methods import count_parameters

    model, method, kw = _composed(case)
    e = est.estimate("tiny:llama-demo", method=method, bits=32, **kw)
    trainable, total = count_parameters(model)
    assert (e.params_trainable, e.params_total + e.adapter // 4) == (trainable, total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(COMPOSED))
def test_intrinsic_drop_and_fusion_activations_match_what_autograd_saves(case, dtype):
    """Intrinsic: every block in the path with each target's input kept in fp32, plus ΔW and Fastfood's kept k x L
    tensors per layer (none of which scale with tokens); AdapterDrop: blocks below k keep nothing; AdapterFusion:
    per site the members' activations, z, K z, V z, the query and the softmax. Within 2% of autograd's saved
    tensors."""
    model, method, kw = _composed(case, dtype)
    model.train()
    got = _saved_bytes(model, 2, 64)
    e = est.estimate("tiny:llama-demo", method=method, bits=32 if dtype == torch.float32 else 16, batch=2, seq=64,
                     **kw)
    assert e.activations == pytest.approx(got, rel=0.02)


def test_intrinsic_projection_is_the_methods_buffers():
    """P is 13 bytes a padded weight with Fastfood (int8 signs, int64 permutation, fp32 Gaussian) and D x d fp32
    dense: exactly the buffers the method registers."""
    from tuneforge.estimate_additive import DENSE_LIMIT
    from tuneforge.methods import intrinsic

    assert DENSE_LIMIT == intrinsic.DENSE_LIMIT
    for case in ("intrinsic", "intrinsic-dense-qv"):
        model, method, kw = _composed(case)
        buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".ii_" in f".{n}")
        assert est.estimate("tiny:llama-demo", method=method, bits=32, **kw).projection == buffers > 0


def test_adapter_drop_saves_the_dropped_blocks_activations():
    """Rücklé et al.'s training saving: with k of L blocks dropped the adapters' activations shrink to about
    (L - k) / L of the plain adapter's (Llama-2-7B, Houlsby, 4 x 1024 tokens, k = 5)."""
    kw = dict(model="llama-2-7b", bits=16, batch=4, seq=1024)
    plain = est.estimate(method="houlsby", **kw)
    drop = est.estimate(method="adapter_drop", drop_layers=5, **kw)
    assert drop.activations / plain.activations == pytest.approx(27 / 32, rel=0.01)
    assert drop.params_trainable == plain.params_trainable * 27 // 32


# UniPELT's gate on LoRA and the bottleneck adapters (AdapterDrop's adapter, AdapterFusion's frozen members), and
# UniPELT itself: (method configs, ``estimate`` options) as COMPOSED
GATED = {
    "lora-qv-gate": ([{"name": "lora", "target_modules": ["q_proj", "v_proj"], "gate": True}],
                     {"targets": ["q_proj", "v_proj"], "gate": True}),
    "lora-gate-r4": ([{"name": "lora", "rank": 4, "gate": True}], {"rank": 4, "gate": True}),
    "lora-up-gate": ([{"name": "lora", "target_modules": ["up_proj"], "gate": True}],
                     {"targets": ["up_proj"], "gate": True}),
    **{f"{kind}-gate": ([{"name": kind, "gate": True}], {"gate": True})
       for kind in ("houlsby", "pfeiffer", "parallel", "scaled_parallel", "compacter")},
    "compacter_pp-gate-24": ([{"name": "compacter_pp", "bottleneck": 24, "gate": True}],
                             {"bottleneck": 24, "gate": True}),
    "drop-houlsby-gate-2": ([{"name": "houlsby", "gate": True}, {"name": "adapter_drop", "drop_layers": 2}],
                            {"drop_layers": 2, "gate": True}),
    "fusion-pfeiffer-gate-2": (_fusion("pfeiffer", 2, gate=True), {"gate": True}),
    "unipelt": ([{"name": "unipelt"}], {}),
    "unipelt-ungated": ([{"name": "unipelt", "gate": False}], {"gate": False}),
    "unipelt-r4-n6-m24": ([{"name": "unipelt", "rank": 4, "num_virtual_tokens": 6, "bottleneck": 24}],
                          {"rank": 4, "virtual_tokens": 6, "bottleneck": 24}),
    "unipelt-o-up": ([{"name": "unipelt", "lora_targets": ["o_proj", "up_proj"]}],
                     {"targets": ["o_proj", "up_proj"]}),
}


@pytest.mark.parametrize("case", sorted(GATED))
def test_gated_methods_and_unipelt_counts_match_the_methods(case):
    """A gate is a (d_in -> 1) linear map with a bias per adapted layer or adapter; UniPELT is gated LoRA on W_q and
    W_v, a key/value prefix at every layer and a gated Pfeiffer adapter: trainable numbers exactly, and every added
    tensor (fusion members' gates are frozen but resident)."""
    from tuneforge.methods import count_parameters

    model, method, kw = _composed(case, table=GATED)
    e = est.estimate("tiny:llama-demo", method=method, bits=32, **kw)
    trainable, total = count_parameters(model)
    assert (e.params_trainable, e.params_total + e.adapter // 4) == (trainable, total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(GATED))
def test_gated_methods_and_unipelt_activations_match_what_autograd_saves(case, dtype):
    """A gate keeps σ(W_g x + b_g) and the ungated update for their product, and in 16 bit its own fp32 copy of
    the input; UniPELT keeps a prefix model's tensors (K and V at T + n for every head, a mask per layer) plus its
    LoRA's and adapter's. Within 2% of autograd's saved tensors."""
    model, method, kw = _composed(case, dtype, table=GATED)
    model.train()
    got = _saved_bytes(model, 2, 64)
    e = est.estimate("tiny:llama-demo", method=method, bits=32 if dtype == torch.float32 else 16, batch=2, seq=64,
                     **kw)
    assert e.activations == pytest.approx(got, rel=0.02)


def test_unipelt_defaults_are_the_papers():
    """r = 8 on W_q and W_v, 10 prefix tokens (also in the serving KV cache), m = d / 16, both gates on."""
    a = est.resolve_model("llama-2-7b")
    e = est.estimate(a, method="unipelt", bits=16, batch=1, seq=100)
    H, L = a.hidden, a.layers
    lora = L * 8 * (2 * H + 2 * H) + L * 2 * (H + 1)
    adapter = L * (2 * H * (H // 16) + H // 16 + H + H + 1)
    assert e.params_trainable == lora + 10 * L * 2 * H + adapter
    assert e.kv_cache == 2 * L * H * 2 * (100 + 10)
    ungated = est.estimate(a, method="unipelt", bits=16, batch=1, seq=100, gate=False)
    assert e.params_trainable - ungated.params_trainable == L * 3 * (H + 1)


@pytest.mark.parametrize("kw,match", [
    ({"method": "lora", "said": True}, r"--said \(said\) is an option of intrinsic; lora does not use it"),
    ({"method": "lora", "drop_layers": 2}, r"--drop-layers .* adapter_drop; lora does not"),
    ({"method": "full", "rank": 8}, r"--rank .* lora, qlora, unipelt; full does not"),
    ({"method": "houlsby", "virtual_tokens": 10}, "--virtual-tokens"),
    ({"method": "prefix_tuning", "bottleneck": 16}, "--bottleneck"),
    ({"method": "ia3", "gate": True}, "--gate"),
    ({"method": "adapter_bias", "gate": True}, "--gate"),
    ({"method": "adapter_bias", "bottleneck": 4}, "--bottleneck"),
    ({"method": "adapter_drop", "drop_layers": 1, "adapter_method": "adapter_bias", "gate": True}, "no gate"),
    ({"method": "intrinsic", "intrinsic_dim": 100, "top_k": 2}, "--top-k"),
    ({"method": "unipelt", "intrinsic_dim": 100}, "--intrinsic-dim"),
    ({"method": "freeze", "fusion_adapters": 3}, "--fusion-adapters"),
    ({"method": "lora", "adapter_method": "houlsby"}, "--adapter-method"),
    ({"method": "lora", "projection": "dense"}, "--projection"),
])
def test_options_of_another_method_are_refused(kw, match):
    with pytest.raises(est.EstimateError, match=match):
        est.estimate("tiny:llama-demo", **kw)


def test_an_option_left_off_is_no_option_given():
    """said=False and gate=False are a flag that is off: every method takes them."""
    plain = est.estimate("tiny:llama-demo", method="lora")
    assert est.estimate("tiny:llama-demo", method="lora", said=False, gate=False) == plain


@pytest.mark.parametrize("kw,match", [
    ({"method": "intrinsic"}, "intrinsic_dim"),
    ({"method": "intrinsic", "intrinsic_dim": 28, "said": True}, "exceed 28"),
    ({"method": "intrinsic", "intrinsic_dim": 10**7}, "exceeds the 737280 weights"),
    ({"method": "intrinsic", "intrinsic_dim": 1000, "projection": "dense"}, "use projection fastfood"),
    ({"method": "intrinsic", "intrinsic_dim": 100, "projection": "sparse"}, "fastfood, dense"),
    ({"method": "intrinsic", "intrinsic_dim": 100, "targets": ["c_attn"]}, "unknown intrinsic targets"),
    ({"method": "adapter_drop"}, "drop_layers"),
    ({"method": "adapter_drop", "drop_layers": 4}, "1 .. 3"),
    ({"method": "adapter_drop", "drop_layers": 1, "adapter_method": "lora"}, "not a bottleneck adapter"),
    ({"method": "adapter_fusion", "fusion_adapters": 1}, "at least 2"),
])
def test_intrinsic_drop_and_fusion_options_are_checked(kw, match):
    with pytest.raises(est.EstimateError, match=match):
        est.estimate("tiny:llama-demo", **kw)


def _cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(["estimate", "--model", "tiny:llama-demo", *args])
    return exit_.value.code


def test_estimate_command_takes_the_new_options(capsys):
    assert _cli("--method", "intrinsic", "--intrinsic-dim", "500", "--said", "--bits", "32", "--json") == 0
    e = json.loads(capsys.readouterr().out)
    assert e["params_trainable"] == 500 and e["projection"] > 0
    assert _cli("--method", "adapter_fusion", "--fusion-adapters", "3", "--adapter-method", "houlsby") == 0
    assert "adapter_fusion, 396,288 trainable" in capsys.readouterr().out
    assert _cli("--method", "adapter_drop", "--drop-layers", "9") == 2
    assert "--drop-layers" in capsys.readouterr().err


def test_estimate_command_takes_unipelt_and_gates(capsys):
    assert _cli("--method", "unipelt", "--bits", "32", "--json") == 0
    assert json.loads(capsys.readouterr().out)["params_trainable"] == 29740  # the tiny model's, as the method's
    assert _cli("--method", "unipelt", "--no-gate", "--bits", "32", "--json") == 0
    assert json.loads(capsys.readouterr().out)["params_trainable"] == 29740 - 3 * 4 * 129
    assert _cli("--method", "lora", "--gate", "--targets", "q_proj,v_proj", "--json") == 0
    assert json.loads(capsys.readouterr().out)["params_trainable"] == 14336 + 2 * 4 * 129
    assert _cli("--method", "lora", "--said") == 2
    assert "--said (said) is an option of intrinsic; lora does not use it" in capsys.readouterr().err
    assert _cli("--method", "lora", "--drop-layers", "2") == 2
    assert "adapter_drop; lora does not use it" in capsys.readouterr().err
