"""Every method against the method contract: closed-form trainable counts, identity at init, save/load round trip,
merge ≡ unmerged, frozen weights untouched by training, per-example adapters ≡ one by one."""

import pytest
import torch
from conftest import base_config

from tuneforge.config import RunConfig
from tuneforge.methods import (METHODS, apply_methods, finalize_methods, load_adapter, merge_methods,
                               method_state_dict, save_adapter)
from tuneforge.methods import adapter_scope, count_parameters, sparse
from tuneforge.methods._inject import trainable_parameters
from tuneforge.models import arch
from tuneforge.models.tiny import build_tiny

CONFIGS = {  # method -> config on the tiny llama (bias-free, so bitfit adds biases)
    "full": {}, "freeze": {"top_k": 1}, "bitfit": {"add_bias": True},
    "diff_pruning": {"density": 0.01}, "sparse": {"density": 0.01, "selection": "magnitude"},
    "lora": {"rank": 4}, "dora": {"rank": 4, "dora": True, "name": "lora"},
    "lokr": {"rank": 2}, "ia3": {}, "qlora": {"rank": 4},
    "houlsby": {"bottleneck": 8}, "pfeiffer": {}, "parallel": {"reduction_factor": 8}, "scaled_parallel": {},
    "compacter": {}, "compacter_pp": {"bottleneck": 8}, "adapter_bias": {},
    "intrinsic": {"dimension": 50}, "intrinsic_dense": {"name": "intrinsic", "dimension": 40, "projection": "dense"},
    "intrinsic_said": {"name": "intrinsic", "dimension": 60, "said": True},
    "phm_adapter": {"name": "compacter", "factorized": False, "shared_rules": False, "phm_dim": 2, "bottleneck": 6},
    "prompt_tuning": {"num_virtual_tokens": 4}, "p_tuning": {"num_virtual_tokens": 3, "encoder_hidden_size": 16},
    "p_tuning_lstm": {"num_virtual_tokens": 3, "encoder": "lstm", "encoder_hidden_size": 8, "name": "p_tuning"},
    "prefix_tuning": {"num_virtual_tokens": 3},
    "prefix_projection": {"num_virtual_tokens": 3, "projection": True, "encoder_hidden_size": 16,
                          "name": "prefix_tuning"},
    "p_tuning_v2": {"num_virtual_tokens": 2},
    # UniPELT and the gates it adds to LoRA and the bottleneck adapters
    "unipelt": {"num_virtual_tokens": 3, "rank": 4}, "lora_gate": {"rank": 4, "gate": True, "name": "lora"},
    "pfeiffer_gate": {"bottleneck": 8, "gate": True, "name": "pfeiffer"},
}
SOFT = ["prompt_tuning", "p_tuning", "p_tuning_lstm", "prefix_tuning", "prefix_projection", "p_tuning_v2"]
# not mergeable (non-linear, or, AdapterBias, reading another point than it writes)
BOTTLENECK = ["houlsby", "pfeiffer", "parallel", "scaled_parallel", "compacter", "compacter_pp", "adapter_bias"]
INTRINSIC = ["intrinsic", "intrinsic_dense", "intrinsic_said"]
GATED = ["lora_gate", "pfeiffer_gate"]  # not mergeable (the gate depends on the input)
IDENTITY_AT_INIT = ["bitfit", "diff_pruning", "sparse", "lora", "dora", "lokr", "ia3", *BOTTLENECK, "phm_adapter",
                    *INTRINSIC, *GATED]
ADAPTERS = ["bitfit", "diff_pruning", "sparse", "lora", "dora", "lokr", "ia3", "qlora", *INTRINSIC]  # mergeable


def cfg_of(key, **kw):
    d = {**CONFIGS[key], **kw}
    name = d.pop("name", key)
    return METHODS[name].Config(**d)


def _ids():
    return torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(0))


def _perturb(model, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def expected_trainable(key, model) -> int:
    """Closed forms, from the layer shapes of the unmodified model."""
    lin = {p: arch.weight_in_out(m) for p, m in arch.linear_modules(model).items()}  # path -> (in, out)
    c = cfg_of(key)
    if key == "full":
        return count_parameters(model)[1]
    if key == "freeze":
        return sum(p.numel() for p in arch.blocks(model)[-1][1].parameters())
    if key == "bitfit":  # a zero bias per attention/MLP projection
        return sum(o for i, o in lin.values())
    if key == "diff_pruning":  # a dense w and log-alpha per targeted weight
        return sum(2 * i * o for i, o in lin.values())
    if key == "sparse":
        return sum(sparse.budget(i * o, c.density) for i, o in lin.values())
    if key == "lora_gate":  # r (in + out) and a gate (in -> 1, with bias) per layer
        return sum(c.rank * (i + o) + i + 1 for i, o in lin.values())
    if key == "pfeiffer_gate":  # Pfeiffer's D, U and their biases, and a gate (d -> 1, with bias) per block
        d = model.config.hidden_size
        return len(arch.blocks(model)) * (2 * d * c.bottleneck + c.bottleneck + d + d + 1)
    if key == "unipelt":  # gated LoRA on q and v, an n-token prefix, a gated Pfeiffer adapter (m = d/16)
        return unipelt_trainable(model.config, c)
    if key in ("lora", "dora", "qlora"):  # r (in + out), DoRA adds one magnitude per output row
        return sum(c.rank * (i + o) + (o if key == "dora" else 0) for i, o in lin.values())
    if key == "lokr":
        from tuneforge.methods.lokr import factorization

        total = 0
        for i, o in lin.values():
            (a, b), (cc, d) = factorization(o), factorization(i)
            total += a * cc + ((b + d) * c.rank if c.rank < max(b, d) / 2 else b * d)
        return total
    if key in INTRINSIC:  # d numbers (with SAID, θ^{d-m} and one λ per layer: d in all)
        return c.dimension
    if key in ("compacter", "compacter_pp", "phm_adapter"):
        return compacter_trainable(key, model.config.hidden_size, len(arch.blocks(model)))
    if key == "adapter_bias":  # v (d) and L_α (d -> 1, with bias) per block
        return len(arch.blocks(model)) * (2 * model.config.hidden_size + 1)
    if key in BOTTLENECK:  # D (m x d) + its bias, U (d x m) + its bias per adapted sub-layer, a learned s each
        d = model.config.hidden_size
        m = c.bottleneck or int(d // (c.reduction_factor or 16))
        per_layer = 2 if key == "houlsby" else 1
        return len(arch.blocks(model)) * per_layer * (2 * d * m + m + d + (key == "scaled_parallel"))
    if key in SOFT:
        return soft_prompt_trainable(key, model.config)
    if key == "ia3":  # k_proj and v_proj outputs, down_proj input
        return sum(o if not p.endswith("down_proj") else i for p, (i, o) in lin.items()
                   if p.rsplit(".", 1)[-1] in ("k_proj", "v_proj", "down_proj"))
    raise KeyError(key)


def unipelt_trainable(config, c) -> int:
    """Per block: LoRA on W_q (d -> H hd) and W_v (d -> KV hd), r (in + out) + a gate (d + 1) each; the adapter
    D (m x d) + m, U (d x m) + d, its gate d + 1; and the prefix, n x 2 x KV hd per block (Mao et al. 2022)."""
    d, L, H = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or H
    hd = getattr(config, "head_dim", None) or d // H
    m = d // 16
    per_block = c.rank * (2 * d + (H + kv) * hd) + 2 * (d + 1) + (2 * d * m + m + d) + (d + 1)
    return L * per_block + c.num_virtual_tokens * L * 2 * kv * hd


def compacter_trainable(key, d: int, blocks: int, **kw) -> int:
    """Per adapted sub-layer: D and U as PHM layers, each r (k + d) numbers (s_i: k/n x r, t_i: r x d/n, n of
    each) or, unfactorised, n (k/n)(d/n) = k d / n, plus the biases m + d; the rules 2 n^3 once (shared) or per
    sub-layer. Karimi Mahabadi et al. 2021, sec. 3.4."""
    from tuneforge.methods.compacter import width

    c = cfg_of(key, **kw)
    n, r, m = c.phm_dim, c.phm_rank, width(c, d)
    per = (2 * r * (m + d) if c.factorized else 2 * m * d // n) + m + d
    sites = blocks * (2 if c.name == "compacter" else 1)  # Houlsby's two places, or Pfeiffer's one
    return sites * per + (2 * n ** 3 if c.shared_rules else sites * 2 * n ** 3)


def soft_prompt_trainable(key, config, **kw) -> int:
    """n virtual tokens of width d (input-level) or of layers x 2 x kv_dim (a key/value prefix), plus encoders."""
    c, d = cfg_of(key, **kw), config.hidden_size
    n, L = c.num_virtual_tokens, config.num_hidden_layers
    kv = getattr(config, "num_key_value_heads", config.num_attention_heads) * (
        getattr(config, "head_dim", None) or d // config.num_attention_heads)
    if key == "prompt_tuning":
        return n * d
    if key in ("prefix_tuning", "p_tuning_v2"):
        return n * L * 2 * kv
    h = c.encoder_hidden_size or d
    if key == "prefix_projection":  # P' (n x kv_dim), then kv_dim -> h -> L*2*kv_dim
        return n * kv + (kv * h + h) + (h * L * 2 * kv + L * 2 * kv)
    if key == "p_tuning":  # free embeddings, then PEFT's 3-layer MLP d -> h -> h -> d
        return n * d + (d * h + h) + (h * h + h) + (h * d + d)
    # p_tuning_lstm: a bidirectional LSTM (per layer and direction 4h(in + h) + 8h; in = d, then 2h) + MLP 2h->2h->d
    lstm = sum(2 * (4 * h * ((d if i == 0 else 2 * h) + h) + 8 * h) for i in range(c.encoder_num_layers))
    return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


@pytest.mark.parametrize("key", ["prompt_tuning", "prefix_tuning", "p_tuning_v2", "p_tuning", "houlsby", "pfeiffer",
                                 "compacter", "compacter_pp", "adapter_bias", "unipelt"])
def test_trainable_count_on_a_gpt3_175b_shaped_model(key):
    """The closed forms at GPT-3 175B's shape (96 layers, d 12288, 96 heads; Brown et al. 2020, table 2.1), on a
    weightless (meta-device) model: prompt tuning 20 x 12288 = 245,760 numbers; a 20-token prefix 47.2M."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=12288, num_hidden_layers=96, num_attention_heads=96, num_key_value_heads=96,
                         intermediate_size=4 * 12288, vocab_size=50257, max_position_embeddings=2048)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    kw = {"num_virtual_tokens": 20} if key in SOFT + ["unipelt"] else {"bottleneck": None} if "compacter" in key \
        else {}
    c = cfg_of(key, **kw)
    apply_methods(model, [c])
    if key in SOFT:
        want = soft_prompt_trainable(key, config, num_virtual_tokens=20)
    elif key in ("compacter", "compacter_pp"):  # m = 12288 / 32 = 384: a Compacter++ is 3.6M numbers, 0.002%
        want = compacter_trainable(key, 12288, 96, **kw)
        assert key != "compacter_pp" or want == 96 * (2 * (384 + 12288) + 384 + 12288) + 128 == 3_649_664
    elif key == "adapter_bias":  # 96 x (2 x 12288 + 1): the seed documents' L x 2 x d_h
        want = 96 * (2 * 12288 + 1)
    elif key == "unipelt":  # r = 4 here: LoRA 19.0M, adapters 29.0M (m = 768), a 20-token prefix 47.2M
        want = unipelt_trainable(config, c)
        assert want == 96 * (4 * 4 * 12288 + 2 * 12289 + 2 * 12288 * 768 + 768 + 12288 + 12289) + 47_185_920
    else:
        m = c.bottleneck or 12288 // 16
        want = 96 * (2 if key == "houlsby" else 1) * (2 * 12288 * m + m + 12288)
    assert count_parameters(model)[0] == want
    assert key != "prefix_tuning" or want == 20 * 96 * 2 * 12288 == 47_185_920
    assert key != "prompt_tuning" or want == 245_760


@pytest.mark.parametrize("key", list(CONFIGS))
def test_trainable_count_matches_closed_form(key):
    model, _ = build_tiny("llama")
    expected = expected_trainable(key, model)
    apply_methods(model, [cfg_of(key)])
    assert count_parameters(model)[0] == expected


@pytest.mark.parametrize("key", IDENTITY_AT_INIT)
def test_identity_at_init(key):
    model, _ = build_tiny("llama")
    model.eval()
    ref = model(_ids()).logits
    apply_methods(model, [cfg_of(key)])
    assert torch.equal(model(_ids()).logits, ref)


@pytest.mark.parametrize("key", ADAPTERS + BOTTLENECK + ["phm_adapter"] + SOFT + GATED + ["unipelt"])
def test_save_load_round_trip(tmp_path, key):
    model, _ = build_tiny("llama")
    cfg = cfg_of(key)
    apply_methods(model, [cfg])
    _perturb(model)
    finalize_methods(model, [cfg])
    model.eval()
    ours = model(_ids()).logits
    save_adapter(model, [cfg], tmp_path / "ad")
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh.eval()(_ids()).logits, ours)


@pytest.mark.parametrize("preset", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("key", ADAPTERS)
def test_merge_equals_unmerged(key, preset):
    model, _ = build_tiny(preset)
    cfg = cfg_of(key)
    apply_methods(model, [cfg])
    _perturb(model)
    finalize_methods(model, [cfg])
    model.eval()
    before = model(_ids()).logits
    merge_methods(model, [cfg])
    assert not any(getattr(m, "is_adapter_layer", False) for m in model.modules())
    assert torch.allclose(model(_ids()).logits, before, atol=1e-5)
    assert {n: p.shape for n, p in model.state_dict().items()}.keys() >= {
        n for n in build_tiny(preset)[0].state_dict()}  # a plain model of the same architecture again


@pytest.mark.parametrize("key", ["lora", "dora", "lokr", "ia3", "sparse", "diff_pruning", "qlora", *BOTTLENECK,
                                 *INTRINSIC, *GATED, "unipelt"])
def test_per_example_adapters_equal_one_by_one(key):
    model, _ = build_tiny("llama")
    cfg = cfg_of(key)
    apply_methods(model, [cfg], adapter="a")
    apply_methods(model, [cfg], adapter="b")
    _perturb(model, scale=0.2)
    model.eval()
    ids, names = _ids(), ["b", None, "a"]
    with adapter_scope(model, names):
        mixed = model(ids).logits
    for i, n in enumerate(names):
        with adapter_scope(model, n):
            assert torch.allclose(model(ids[i:i + 1]).logits, mixed[i:i + 1], atol=1e-5), (i, n)


@pytest.mark.parametrize("preset", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("key", BOTTLENECK)
def test_bottleneck_adapters_refuse_merge_and_unload_to_the_base(key, preset):
    model, _ = build_tiny(preset)
    model.eval()
    ref = model(_ids()).logits
    cfg = cfg_of(key)
    apply_methods(model, [cfg])
    _perturb(model)
    assert not torch.allclose(model(_ids()).logits, ref, atol=1e-4)  # the perturbed adapter acts
    with pytest.raises(ValueError, match="cannot be folded into the base weights"):
        merge_methods(model, [cfg])
    METHODS[key].unload(model)
    assert not any(getattr(m, "is_adapter_layer", False) for m in model.modules())
    assert torch.equal(model(_ids()).logits, ref)


def test_bottleneck_adapters_compose_with_lora():
    """[lora, houlsby, parallel]: LoRA wraps the projections, Houlsby wraps LoRA's o_proj/down_proj layers, the
    parallel adapter the FFN block; the composition saves and reloads with identical logits."""
    import tempfile

    model, _ = build_tiny("llama")
    cfgs = [cfg_of("lora"), cfg_of("houlsby"), cfg_of("parallel")]
    apply_methods(model, cfgs)
    _perturb(model)
    model.eval()
    ours = model(_ids()).logits
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, cfgs, d)
        fresh, _ = build_tiny("llama")
        load_adapter(fresh, d)
        assert torch.equal(fresh.eval()(_ids()).logits, ours)
    expected = sum(expected_trainable(k, build_tiny("llama")[0]) for k in ("lora", "houlsby", "parallel"))
    assert count_parameters(model)[0] == expected


def test_mixed_task_batch_with_ia3_and_lora_adapters():
    """One forward where rows use an IA3 adapter, a LoRA adapter or the base = running them one by one."""
    model, _ = build_tiny("llama")
    apply_methods(model, [cfg_of("ia3")], adapter="t_ia3")
    apply_methods(model, [cfg_of("lora")], adapter="t_lora")
    _perturb(model, scale=0.2)
    model.eval()
    ids, names = _ids(), ["t_lora", "t_ia3", None]
    with adapter_scope(model, names):
        mixed = model(ids).logits
    for i, n in enumerate(names):
        with adapter_scope(model, n):
            assert torch.allclose(model(ids[i:i + 1]).logits, mixed[i:i + 1], atol=1e-5), (i, n)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_frozen_parameters_bit_identical_after_training(tmp_path, pc_file, key):
    from tuneforge import api

    d = base_config(tmp_path, pc_file, max_steps=3, learning_rate=1e-2)
    d["method"] = [{"name": cfg_of(key).name, **{k: v for k, v in CONFIGS[key].items() if k != "name"}}]
    torch.manual_seed(0)
    fresh = dict(build_tiny("llama")[0].named_parameters())
    seen = {}
    api.train(RunConfig.model_validate(d), hooks={"after_clip": lambda loop: seen.setdefault("loop", loop)})
    loop = seen["loop"]
    trained = set(loop.params)
    frozen = {n: p for n, p in loop.model.named_parameters() if n not in trained and n in fresh}
    changed = [n for n, p in frozen.items() if not torch.equal(p, fresh[n])]
    assert not changed
    moved = [n for n in trained if n in fresh and not torch.equal(loop.params[n], fresh[n])]
    assert key not in ("full", "freeze") or moved  # the whole-model methods moved their own weights


def test_bitfit_refuses_bias_free_model_with_a_hint():
    model, _ = build_tiny("llama")
    with pytest.raises(ValueError, match="add_bias"):
        apply_methods(model, [METHODS["bitfit"].Config()])


def test_bitfit_trains_existing_biases_on_gpt2():
    model, _ = build_tiny("gpt2")
    apply_methods(model, [METHODS["bitfit"].Config()])
    names = set(trainable_parameters(model))
    assert names and all(n.endswith(".bias") for n in names)


def test_bitfit_merged_llama_reloads_with_biases(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = build_tiny("llama")
    cfg = cfg_of("bitfit")
    apply_methods(model, [cfg])
    _perturb(model)
    model.eval()
    before = model(_ids()).logits
    merge_methods(model, [cfg])
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(again(_ids()).logits, before, atol=1e-6)


def test_diff_pruning_projects_to_exact_density():
    model, _ = build_tiny("llama")
    cfg = cfg_of("diff_pruning")
    apply_methods(model, [cfg])
    _perturb(model)
    total = sum(i * o for i, o in (arch.weight_in_out(m) for m in arch.linear_modules(model).values()))
    finalize_methods(model, [cfg])
    kept = sum(v.numel() for k, v in method_state_dict(model, [cfg]).items() if k.endswith("dp_values"))
    assert kept == round(cfg.density * total)


def test_bottleneck_adapters_come_last_in_a_method_list():
    """A bottleneck adapter wraps the module at its target (o_proj becomes o_proj.base): a linear-layer method after
    it would miss or quantise those layers, so the order is refused, at config time and in apply_methods."""
    from tuneforge.config import ConfigError, load_config

    for later in ("lora", "qlora", "ia3", "bitfit"):
        with pytest.raises(ValueError, match=f"{later} after houlsby: list the bottleneck adapters last"):
            apply_methods(build_tiny("llama")[0], [cfg_of("houlsby"), METHODS[later].Config()])
    with pytest.raises(ConfigError, match="list the bottleneck adapters last"):
        load_config({"model": {"path": "tiny:llama"}, "data": {"train": "rows.jsonl"},
                     "method": [{"name": "parallel"}, {"name": "lora"}]})
    apply_methods(build_tiny("llama")[0], [cfg_of("houlsby"), cfg_of("parallel")])  # bottleneck after bottleneck


def test_merge_refuses_a_list_with_a_bottleneck_adapter_before_changing_anything():
    from tuneforge.methods.lora import LoraLayer

    model, _ = build_tiny("llama")
    cfgs = [cfg_of("lora"), cfg_of("houlsby")]
    apply_methods(model, cfgs)
    _perturb(model)
    model.eval()
    before = model(_ids()).logits
    with pytest.raises(ValueError, match="non-linear"):
        merge_methods(model, cfgs)
    assert any(isinstance(m, LoraLayer) for m in model.modules())  # LoRA still unmerged, in place
    assert torch.equal(model(_ids()).logits, before)


def test_bottleneck_biases_take_no_weight_decay():
    from tuneforge.methods import weight_decays

    model, _ = build_tiny("llama")
    apply_methods(model, [cfg_of("scaled_parallel")])
    decays = weight_decays(model, trainable_parameters(model))
    assert decays and all(d == (n.endswith(".weight") and "adapter_scale" not in n) for n, d in decays.items())
