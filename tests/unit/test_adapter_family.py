"""Compacter, AdapterBias, AdapterDrop and AdapterFusion: each against its paper's formula, computed by hand on
small tensors, and the behaviour each promises (shared rules, a backward that stops at block k, several tasks in
one forward, a fusion that saves and loads as one unit)."""

import pytest
import torch
from conftest import base_config, write_jsonl
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

from tuneforge.config import ConfigError, RunConfig
from tuneforge.methods import (METHODS, adapter_drop, apply_methods, count_parameters, load_adapter, regularizer,
                               save_adapter, step_methods)
from tuneforge.methods import adapter_scope
from tuneforge.methods._bottleneck import bottleneck_layers
from tuneforge.methods._inject import trainable_parameters
from tuneforge.methods.adapter_fusion import Fusion
from tuneforge.methods.compacter import PHMLinear, Rules
from tuneforge.models import arch
from tuneforge.models.tiny import build_tiny


def _ids(batch=3, seq=9, vocab=60):
    return torch.randint(5, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def _perturb(model, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _four_blocks(kind="llama"):
    torch.manual_seed(0)
    config = {"llama": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64),
              "gpt2": GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=64, bos_token_id=0, eos_token_id=0),
              "gpt_neox": GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, vocab_size=64, bos_token_id=0, eos_token_id=0)}[kind]
    return AutoModelForCausalLM.from_config(config).eval()


# ------------------------------------------------------------------------------------------------- Compacter
@pytest.mark.parametrize("factorized", [True, False])
def test_phm_weight_is_the_sum_of_kronecker_products(factorized):
    """W = Σ_i A_i ⊗ B_i (eq. 3), B_i = s_i t_i (eq. 5), against torch.kron on random factors."""
    torch.manual_seed(0)
    n, d_in, d_out = 4, 12, 8
    layer = PHMLinear(d_in, d_out, n, 2, factorized, Rules(n), zero=False, shared=True)
    with torch.no_grad():
        layer.rules.weight.normal_()
    bs = [layer.s[i] @ layer.t[i] for i in range(n)] if factorized else list(layer.b)
    want = sum(torch.kron(layer.rules.weight[i], bs[i]) for i in range(n))
    assert torch.allclose(layer.weight(), want, atol=1e-6)
    x = torch.randn(5, d_in)
    assert torch.allclose(layer(x), x @ want.T + layer.bias, atol=1e-5)


def test_compacter_rules_are_one_tensor_for_all_layers_saved_once_and_trained_by_all():
    model, _ = build_tiny("llama")
    cfg = METHODS["compacter"].Config()
    apply_methods(model, [cfg])
    layers = list(bottleneck_layers(model).values())
    assert len(layers) == 2 * len(arch.blocks(model))
    downs = {id(layer.adapter_down["default"].rules.weight) for layer in layers}
    ups = {id(layer.adapter_up["default"].rules.weight) for layer in layers}
    assert len(downs) == len(ups) == 1 and downs != ups
    keys = METHODS["compacter"].state_dict(model, cfg)
    assert [k for k in keys if "rules" in k] == ["compacter.rules.down", "compacter.rules.up"]
    _perturb(model)  # t of the up-projections away from 0, so gradients reach the rules
    model(_ids()).logits.sum().backward()
    rule = layers[0].adapter_down["default"].rules.weight
    assert rule.grad is not None and rule.grad.abs().sum() > 0
    assert sum(1 for n, _ in model.named_parameters() if "rules" in n) == 2  # one tensor each, not one per layer


def test_compacter_phm_dim_must_divide_an_explicit_bottleneck():
    with pytest.raises(ValueError, match="phm_dim 4 must divide the bottleneck 6"):
        apply_methods(build_tiny("llama")[0], [METHODS["compacter"].Config(bottleneck=6)])


def test_compacter_default_width_rounds_up_to_a_multiple_of_n():
    from tuneforge.methods.compacter import width

    cfg = METHODS["compacter_pp"].Config()
    assert cfg.reduction_factor == 32 and width(cfg, 64) == 4 and width(cfg, 576) == 20  # 576 / 32 = 18 -> 20


# ---------------------------------------------------------------------------------------------- AdapterBias
def test_adapter_bias_adds_v_times_alpha_of_the_ffn_input():
    """FFN(x) + v (w·x + b) at every block's FFN, checked at block 0 by hand."""
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS["adapter_bias"].Config()])
    _perturb(model)
    layer = model.model.layers[0].mlp
    x = torch.randn(2, 5, model.config.hidden_size)
    w, b = layer.adapter_down["default"].weight, layer.adapter_down["default"].bias  # L_α: (1, d), (1,)
    v = layer.adapter_up["default"].weight[:, 0]  # (d,)
    assert layer.adapter_up["default"].bias is None
    want = layer.base(x) + (x @ w.T + b) * v
    assert torch.allclose(layer(x), want, atol=1e-6)


# ---------------------------------------------------------------------------------------------- AdapterDrop
def test_fixed_adapter_drop_has_no_adapters_below_k_and_round_trips(tmp_path):
    model = _four_blocks()
    cfgs = [METHODS["houlsby"].Config(bottleneck=4), METHODS["adapter_drop"].Config(drop_layers=3)]
    apply_methods(model, cfgs)
    per_site = 2 * 32 * 4 + 4 + 32
    assert count_parameters(model)[0] == (4 - 3) * 2 * per_site  # the seed documents' (L - n) x 2 x ...
    assert {layer.block for layer in bottleneck_layers(model).values()} == {3}
    _perturb(model)
    ours = model(_ids()).logits
    save_adapter(model, cfgs, tmp_path / "ad")
    fresh = _four_blocks()
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh(_ids()).logits, ours)


def test_adapter_drop_refusals():
    with pytest.raises(ValueError, match="list it after one"):
        apply_methods(_four_blocks(), [METHODS["lora"].Config(), METHODS["adapter_drop"].Config(drop_layers=1)])
    with pytest.raises(ValueError, match="all 4 blocks"):
        apply_methods(_four_blocks(), [METHODS["pfeiffer"].Config(), METHODS["adapter_drop"].Config(drop_layers=4)])
    with pytest.raises(ValueError, match="train with random: true"):
        METHODS["adapter_drop"].Config(drop_layers=2, inference_drop_layers=1)


def test_robust_adapter_drop_draws_k_per_step_from_the_step_alone_and_uses_the_inference_k_in_eval():
    model = _four_blocks()
    cfgs = [METHODS["pfeiffer"].Config(bottleneck=4),
            METHODS["adapter_drop"].Config(drop_layers=3, random=True, inference_drop_layers=1)]
    apply_methods(model, cfgs)
    assert count_parameters(model)[0] == 4 * (2 * 32 * 4 + 4 + 32)  # every block keeps its adapter
    draws = [adapter_drop.draw_k(cfgs[1], s) for s in range(200)]
    assert draws == [adapter_drop.draw_k(cfgs[1], s) for s in range(200)] and set(draws) == {0, 1, 2, 3}
    _perturb(model)
    model.train()
    for s in (0, 1, 2):
        step_methods(model, cfgs, s, 10)
        assert {layer.drop_below["default"]["train"] for layer in bottleneck_layers(model).values()} == {draws[s]}
        assert [layer.dropped("default") for layer in bottleneck_layers(model).values()] == [
            b < draws[s] for b in range(4)]
    model.eval()
    assert [layer.dropped("default") for layer in bottleneck_layers(model).values()] == [True, False, False, False]


def test_dropping_k_blocks_stops_the_backward_at_block_k():
    """The saved backward compute, observed: with adapters off in blocks 0 .. k-1 no gradient flows through them
    (their backward hooks never fire), while without AdapterDrop every block runs backward."""
    def blocks_run_backward(drop):
        model = _four_blocks().train()
        cfgs = [METHODS["pfeiffer"].Config(bottleneck=4)] + (
            [METHODS["adapter_drop"].Config(drop_layers=drop)] if drop else [])
        apply_methods(model, cfgs)
        _perturb(model)
        ran = set()
        for i, (_, block) in enumerate(arch.blocks(model)):
            block.register_full_backward_hook(lambda m, gi, go, i=i: ran.add(i))
        model(_ids(vocab=60)).logits.sum().backward()
        return ran

    assert blocks_run_backward(0) == {0, 1, 2, 3}
    assert blocks_run_backward(2) == {2, 3}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_parallel_tasks_share_the_dropped_blocks_and_equal_each_task_alone(kind):
    model = _four_blocks(kind)
    cfgs = [METHODS["houlsby"].Config(bottleneck=4),
            METHODS["adapter_drop"].Config(drop_layers=2, random=True, inference_drop_layers=2)]
    for name in ("a", "b", "c"):
        apply_methods(model, cfgs, adapter=name)
    _perturb(model)
    ids, mask = _ids(), torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0  # a left-padded row
    tasks = ["a", "b", "c", "a"]
    together = adapter_drop.parallel_tasks(model, ids, tasks, shared_layers=2, attention_mask=mask)
    assert together.shape[:2] == (4, 3)
    for i, name in enumerate(tasks):
        with adapter_scope(model, name):
            alone = model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        assert (together[i] - alone)[real].abs().max().item() < 1e-5, (i, name)


def test_parallel_tasks_refuse_when_the_shared_blocks_have_adapters():
    model = _four_blocks()
    apply_methods(model, [METHODS["houlsby"].Config(bottleneck=4)], adapter="a")
    with pytest.raises(ValueError, match="must be dropped at inference"):
        adapter_drop.parallel_tasks(model, _ids(), ["a"], shared_layers=2)


def test_adapter_drop_acts_on_its_own_adapter_only():
    """A robust drop applied under "a" leaves adapter "b" in the same blocks running, in eval and in training."""
    model = _four_blocks()
    apply_methods(model, [METHODS["houlsby"].Config(bottleneck=4), METHODS["adapter_drop"].Config(
        drop_layers=3, random=True, inference_drop_layers=2)], adapter="a")
    apply_methods(model, [METHODS["houlsby"].Config(bottleneck=4)], adapter="b")
    _perturb(model)
    alone = _four_blocks()
    apply_methods(alone, [METHODS["houlsby"].Config(bottleneck=4)], adapter="b")
    alone.load_state_dict({k: v for k, v in model.state_dict().items() if k in alone.state_dict()}, strict=False)
    for name, layer in bottleneck_layers(alone).items():  # copy b's tensors under the same paths
        src = dict(bottleneck_layers(model))[name]
        layer.adapter_down["b"].load_state_dict(src.adapter_down["b"].state_dict())
        layer.adapter_up["b"].load_state_dict(src.adapter_up["b"].state_dict())
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(alone, mode)()
        step_methods(model, [METHODS["adapter_drop"].Config(drop_layers=3, random=True)], 5, 10, adapter="a")
        with adapter_scope(model, "b"), adapter_scope(alone, "b"):
            assert torch.allclose(model(_ids()).logits, alone(_ids()).logits, atol=1e-6), mode


def test_with_dropout_off_a_robust_drop_trains_with_the_inference_k():
    """PPO's ratio and DPO's reference need train-mode and eval-mode forwards to agree at equal weights: turning
    dropout off (as those algorithms do) makes a robust AdapterDrop use its inference k in training too."""
    from tuneforge.algorithms._dropout import disable_dropout

    model = _four_blocks()
    cfgs = [METHODS["houlsby"].Config(bottleneck=4),
            METHODS["adapter_drop"].Config(drop_layers=3, random=True, inference_drop_layers=1)]
    apply_methods(model, cfgs)
    _perturb(model)
    ref = model.eval()(_ids()).logits
    model.train()
    step_methods(model, cfgs, 0, 10)
    k = adapter_drop.draw_k(cfgs[1], 0)
    assert k != 1 and not torch.allclose(model(_ids()).logits, ref, atol=1e-6)
    assert disable_dropout(model) >= 1
    assert torch.allclose(model(_ids()).logits, ref, atol=1e-6)


def test_a_bottleneck_adapter_after_adapter_drop_is_refused():
    with pytest.raises(ValueError, match="pfeiffer after adapter_drop"):
        apply_methods(_four_blocks(), [METHODS["houlsby"].Config(), METHODS["adapter_drop"].Config(drop_layers=1),
                                       METHODS["pfeiffer"].Config()])


def test_methods_find_their_targets_under_a_block_adapter():
    """adapter_bias wraps each FFN (mlp -> mlp.base); Houlsby after it still finds mlp.down_proj."""
    model = _four_blocks()
    cfgs = [METHODS["adapter_bias"].Config(), METHODS["houlsby"].Config(bottleneck=4)]
    apply_methods(model, cfgs)
    paths = set(bottleneck_layers(model))
    assert "model.layers.0.mlp.base.down_proj" in paths and "model.layers.0.mlp" in paths


def test_a_bottleneck_adapter_named_value_still_decays():
    from tuneforge.methods import weight_decays

    model = _four_blocks()
    apply_methods(model, [METHODS["houlsby"].Config(bottleneck=4)], adapter="value")
    decays = weight_decays(model, trainable_parameters(model))
    assert all(d == n.endswith(".weight") for n, d in decays.items())


# -------------------------------------------------------------------------------------------- AdapterFusion
def test_fusion_attention_by_hand():
    """s_n = softmax_n((Q h)·(K z_n) / T), out = Σ_n s_n V z_n (eq. 3), looped over tokens and members."""
    torch.manual_seed(0)
    f = Fusion(6, 6, ["m0", "m1", "m2"], temperature=2.0)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    h, zs = torch.randn(2, 4, 6), [torch.randn(2, 4, 6) for _ in range(3)]
    out = f(h, zs)
    for b in range(2):
        for t in range(4):
            q = f.query.weight @ h[b, t] + f.query.bias
            scores = torch.stack([(f.key.weight @ z[b, t] + f.key.bias) @ q for z in zs]) / 2.0
            s = torch.softmax(scores, 0)
            want = sum(s[n] * (f.value.weight @ zs[n][b, t] + f.value.bias) for n in range(3))
            assert torch.allclose(out[b, t], want, atol=1e-5)


def _members(tmp_path, method="pfeiffer", n=2, base_path=None, **kw):
    paths = []
    for i in range(n):
        model, _ = build_tiny("llama")
        cfg = METHODS[method].Config(**kw)
        apply_methods(model, [cfg])
        _perturb(model, seed=10 + i, scale=0.3)
        paths.append(str(save_adapter(model, [cfg], tmp_path / f"member{i}", base_path=base_path)))
    return paths


def test_fusion_trains_only_qkv_saves_as_one_unit_and_loads_without_the_member_directories(tmp_path):
    import shutil

    paths = _members(tmp_path, "compacter_pp", bottleneck=8)
    model, _ = build_tiny("llama")
    cfg = METHODS["adapter_fusion"].Config(adapters=paths)
    apply_methods(model, [cfg])
    d, sites = model.config.hidden_size, len(arch.blocks(model))
    assert count_parameters(model)[0] == sites * 3 * (d * d + d)
    assert all(".fusion.default." in n for n in trainable_parameters(model))
    layer = next(iter(bottleneck_layers(model).values()))
    assert torch.equal(layer.fusion["default"].value.weight, torch.eye(d))
    assert regularizer(model, [cfg]).item() == 0.0
    # the fusion at init: uniform-ish weights over the members, so it differs from the base and from each member
    base, _ = build_tiny("llama")
    assert not torch.allclose(model.eval()(_ids()).logits, base.eval()(_ids()).logits, atol=1e-4)
    _perturb(model)
    v = [f.value.weight for f in (lay.fusion["default"] for lay in bottleneck_layers(model).values())]
    assert torch.isclose(regularizer(model, [cfg]), 0.01 * sum(((torch.eye(d) - w) ** 2).sum() for w in v))
    ours = model(_ids()).logits
    save_adapter(model, [cfg], tmp_path / "fused")
    for p in paths:
        shutil.rmtree(p)
    fresh, _ = build_tiny("llama")
    cfgs = load_adapter(fresh, tmp_path / "fused")
    assert cfgs[0].members and cfgs[0].members[0]["name"] == "compacter_pp"
    assert torch.equal(fresh.eval()(_ids()).logits, ours)


def test_fusion_members_stay_frozen_through_training(tmp_path):
    from tuneforge import api
    from tuneforge.tasks import make_examples

    paths = _members(tmp_path, "pfeiffer", bottleneck=4)
    data = write_jsonl(tmp_path / "train.jsonl", make_examples("copy", 32, seed=1))
    d = base_config(tmp_path, data, max_steps=3, learning_rate=1e-2)
    d["method"] = [{"name": "adapter_fusion", "adapters": paths}]
    seen = {}
    api.train(RunConfig.model_validate(d), hooks={"after_clip": lambda loop: seen.setdefault("loop", loop)})
    model = seen["loop"].model
    member0 = METHODS["pfeiffer"].state_dict(model, None, "default__member0")
    from tuneforge.safeio import load_safetensors

    saved = load_safetensors(f"{paths[0]}/adapter_model.safetensors")
    assert set(member0) == set(saved) and all(torch.equal(member0[k], saved[k]) for k in saved)
    assert set(seen["loop"].params) == {n for n in seen["loop"].params if ".fusion.default." in n}


def test_fusion_cannot_share_its_name_with_an_adapter_at_its_sites(tmp_path):
    paths = _members(tmp_path, "pfeiffer", bottleneck=4)
    with pytest.raises(ValueError, match="already used at"):
        apply_methods(build_tiny("llama")[0], [METHODS["pfeiffer"].Config(bottleneck=4),
                                               METHODS["adapter_fusion"].Config(adapters=paths)])
    with pytest.raises(ValueError, match="already used at this sub-layer"):
        apply_methods(build_tiny("llama")[0], [METHODS["adapter_fusion"].Config(adapters=paths),
                                               METHODS["pfeiffer"].Config(bottleneck=4)])


def test_fusion_over_members_with_different_targets_freezes_them_all(tmp_path):
    """A member trained on fewer sub-layers is left out where it has none (AdapterHub's rule); every member stays
    frozen everywhere and is reached only through the fusion."""
    a = _members(tmp_path / "a", "houlsby", n=1, bottleneck=4)
    b = _members(tmp_path / "b", "houlsby", n=1, bottleneck=4, target_modules=["mlp.down_proj"])
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS["adapter_fusion"].Config(adapters=a + b)])
    assert all(".fusion.default." in n for n in trainable_parameters(model))
    sites = {p: layer.fusion["default"].members for p, layer in bottleneck_layers(model).items()}
    assert all(m == ["default__member0"] for p, m in sites.items() if p.endswith("o_proj"))
    assert all(m == ["default__member0", "default__member1"] for p, m in sites.items() if p.endswith("down_proj"))
    assert all(layer.active == ("default",) for layer in bottleneck_layers(model).values())


def test_freeze_after_a_fusion_leaves_the_members_frozen(tmp_path):
    paths = _members(tmp_path, "pfeiffer", bottleneck=4)
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS["adapter_fusion"].Config(adapters=paths), METHODS["freeze"].Config(top_k=1)])
    assert not [n for n in trainable_parameters(model) if "__member" in n]


def test_fusion_refuses_members_of_different_types_or_not_bottleneck_adapters(tmp_path):
    a = _members(tmp_path / "a", "pfeiffer", n=1, bottleneck=4)
    b = _members(tmp_path / "b", "adapter_bias", n=1)
    with pytest.raises(ValueError, match="different types \\(adapter_bias, pfeiffer\\)"):
        apply_methods(build_tiny("llama")[0], [METHODS["adapter_fusion"].Config(adapters=a + b)])
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS["lora"].Config(rank=2)])
    lora = str(save_adapter(model, [METHODS["lora"].Config(rank=2)], tmp_path / "lora"))
    with pytest.raises(ValueError, match="must be one bottleneck adapter"):
        apply_methods(build_tiny("llama")[0], [METHODS["adapter_fusion"].Config(adapters=a + [lora])])


def test_fusion_of_adapters_trained_on_another_base_is_a_config_error(tmp_path, pc_file):
    from tuneforge import api

    paths = _members(tmp_path, "pfeiffer", bottleneck=4, base_path="tiny:gpt2")
    d = base_config(tmp_path, pc_file)
    d["method"] = [{"name": "adapter_fusion", "adapters": paths}]
    with pytest.raises(ConfigError, match=r"method\[0\].adapters\[0\].*trained on tiny:gpt2, this run's base is "
                                          "tiny:llama"):
        api.check_targets(RunConfig.model_validate(d))
