"""LoRA layer math and the method contract: identity at init, merge, scopes, per-example adapters, composition."""

import math

import pytest
import torch

from tuneforge.methods import (METHOD_CONFIGS, adapter_scope, apply_methods, count_parameters, load_adapter,
                               merge_methods, save_adapter)
from tuneforge.methods import lora
from tuneforge.methods._inject import TargetError
from tuneforge.models.tiny import build_tiny

PRESETS = ["llama", "gpt2", "gpt_neox"]


def _randomise(model, adapter="default", std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        w = layer.lora_B[adapter].weight
        w.data = torch.randn(w.shape, generator=g) * std


def _ids(seed=0, b=3, t=12):
    return torch.randint(5, 60, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_identity_at_init_and_param_count(preset):
    model, _ = build_tiny(preset)
    ids = _ids()
    base = model(ids).logits
    cfg = lora.Config(rank=4)
    apply_methods(model, [cfg])
    assert torch.equal(model(ids).logits, base)
    expected = sum(cfg.rank * (layer.in_features + layer.out_features) for layer in lora.lora_layers(model).values())
    trainable, _ = count_parameters(model)
    assert trainable == expected
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_merge_equals_unmerged_and_unmerge_restores(preset):
    model, _ = build_tiny(preset)
    apply_methods(model, [lora.Config(rank=4, alpha=8)])
    _randomise(model)
    ids = _ids()
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    out = model(ids).logits
    lora.merge(model)
    assert torch.allclose(model(ids).logits, out, atol=1e-5)
    lora.unmerge(model)
    assert all(torch.allclose(p, before[n], atol=1e-6) for n, p in model.named_parameters() if n in before)
    merge_methods(model, [lora.Config(rank=4, alpha=8)])  # merge + unload -> plain HF modules
    assert not lora.lora_layers(model)
    assert torch.allclose(model(ids).logits, out, atol=1e-5)


def test_scaling_plain_and_rslora():
    model, _ = build_tiny("llama")
    apply_methods(model, [lora.Config(rank=16, alpha=32)])
    layer = next(iter(lora.lora_layers(model).values()))
    assert layer.scaling["default"] == 2.0
    model, _ = build_tiny("llama")
    apply_methods(model, [lora.Config(rank=16, alpha=32, rslora=True)])
    layer = next(iter(lora.lora_layers(model).values()))
    assert layer.scaling["default"] == pytest.approx(32 / math.sqrt(16))


def test_base_scope_is_reference_model():
    model, _ = build_tiny("llama")
    ids = _ids()
    base = model(ids).logits
    apply_methods(model, [lora.Config(rank=4)])
    _randomise(model)
    with adapter_scope(model, None):
        assert torch.equal(model(ids).logits, base)
    assert not torch.allclose(model(ids).logits, base)


def test_per_example_adapters_equal_one_by_one():
    model, _ = build_tiny("llama")
    apply_methods(model, [lora.Config(rank=4)], adapter="a")
    lora.apply(model, lora.Config(rank=4), adapter="b")
    _randomise(model, "a", seed=1)
    _randomise(model, "b", seed=2)
    ids = _ids(b=4)
    names = ["a", "b", None, "a"]
    with adapter_scope(model, names):
        mixed = model(ids).logits
    for i, name in enumerate(names):
        with adapter_scope(model, name):
            alone = model(ids[i:i + 1]).logits
        assert torch.allclose(mixed[i:i + 1], alone, atol=1e-5), name


def test_unknown_adapter_name_is_an_error():
    model, _ = build_tiny("llama")
    apply_methods(model, [lora.Config(rank=4)])
    with pytest.raises(KeyError, match="unknown adapter"):
        with adapter_scope(model, "nope"):
            pass


# RELIABILITY.md BI-5
def test_unmatched_target_lists_closest_names():
    model, _ = build_tiny("llama")
    with pytest.raises(TargetError) as e:
        apply_methods(model, [lora.Config(target_modules=["q_proj", "v_prj"])])
    assert "'v_prj'" in str(e.value) and "v_proj" in str(e.value) and "'q_proj'" not in str(e.value)


def test_regex_and_exclude_targets():
    model, _ = build_tiny("llama")
    apply_methods(model, [lora.Config(target_modules=[r"re:.*layers\.0\.self_attn\.(q|v)_proj"])])
    assert sorted(lora.lora_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    model, _ = build_tiny("llama")
    apply_methods(model, [lora.Config(target_modules=["q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])])
    assert sorted(lora.lora_layers(model)) == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_round_trip(tmp_path, preset):
    model, _ = build_tiny(preset)
    cfg = lora.Config(rank=4, alpha=4, target_modules=None)
    apply_methods(model, [cfg])
    _randomise(model)
    ids = _ids()
    out = model(ids).logits
    save_adapter(model, [cfg], tmp_path / "ad")
    fresh, _ = build_tiny(preset)
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh(ids).logits, out)


def test_composition_freeze_plus_lora_round_trips(tmp_path):
    model, _ = build_tiny("llama")
    cfgs = [METHOD_CONFIGS["freeze"](top_k=1), lora.Config(rank=2, target_modules=["q_proj"])]
    apply_methods(model, cfgs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.layers.1.") and "lora_" not in n for n in trainable)
    assert any("lora_A" in n for n in trainable)
    assert not any(n.startswith("model.layers.0.") and "lora_" not in n for n in trainable)
    _randomise(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(0.1)
    ids = _ids()
    out = model(ids).logits
    save_adapter(model, cfgs, tmp_path / "ad")
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh(ids).logits, out)


def test_full_and_freeze_trainable_sets():
    model, _ = build_tiny("llama")
    apply_methods(model, [METHOD_CONFIGS["full"]()])
    assert count_parameters(model)[0] == count_parameters(model)[1]
    model, _ = build_tiny("gpt2")
    apply_methods(model, [METHOD_CONFIGS["freeze"](bottom_k=1, modules=["ln_f"])])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("transformer.h.0.") or "ln_f" in n for n in names) and names
