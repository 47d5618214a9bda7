"""Diff pruning's hard-concrete maths (hand-derived values), sparse fine-tuning's selection, and compositions."""

import math

import pytest
import torch
from conftest import base_config

from tuneforge.config import RunConfig
from tuneforge.methods import (METHODS, adapter_scope, apply_methods, load_adapter, merge_methods,
                               prepare_methods, regularizer, save_adapter)
from tuneforge.methods import diff_pruning as dp
from tuneforge.methods import sparse
from tuneforge.methods._inject import trainable_parameters
from tuneforge.models.tiny import build_tiny


def test_hard_concrete_golden_values():
    la = torch.tensor([0.0, math.log(2.0), 10.0, -10.0])
    # sigmoid(la) * (1.5 - -1.5) - 1.5, clamped: 0.5*3-1.5 = 0; (2/3)*3-1.5 = 0.5; ~1.5 -> 1; ~-1.5 -> 0
    assert torch.allclose(dp.hard_concrete_mean(la), torch.tensor([0.0, 0.5, 1.0, 0.0]), atol=1e-6)
    # u = 0.5 makes the logistic noise log(u) - log(1-u) vanish: the sample is the mean
    assert torch.equal(dp.hard_concrete_sample(la, torch.full_like(la, 0.5)), dp.hard_concrete_mean(la))
    # u = 0.8, log alpha = 0: sigmoid(log 4) = 0.8 -> 0.8*3 - 1.5 = 0.9
    assert dp.hard_concrete_sample(torch.tensor(0.0), torch.tensor(0.8)).item() == pytest.approx(0.9, abs=1e-6)
    # P(z != 0) = sigmoid(log alpha - log(-l/r)); with l = -r the shift is log 1 = 0: sigmoid(log 3) = 0.75
    assert dp.prob_nonzero(torch.tensor(math.log(3.0))).item() == pytest.approx(0.75, abs=1e-6)


def test_topk_mask_across_tensors_keeps_exactly_k():
    a, b = torch.tensor([[0.1, 0.9], [0.5, 0.2]]), torch.tensor([0.8, 0.05, 0.7])
    ma, mb = dp.topk_mask([a, b], 3)
    assert ma.tolist() == [False, True, False, False] and mb.tolist() == [True, False, True]


def test_l0_regularizer_is_coef_times_open_fraction():
    model, _ = build_tiny("llama")
    cfg = dp.Config(l0_coef=2.0, init_log_alpha=math.log(3.0))
    apply_methods(model, [cfg])
    assert regularizer(model, [cfg]).item() == pytest.approx(2.0 * 0.75, abs=1e-6)


def test_diff_pruning_l0_penalty_closes_gates_in_training(tmp_path, pc_file):
    from tuneforge import api

    d = base_config(tmp_path, pc_file, max_steps=6, learning_rate=0.1)
    d["method"] = [{"name": "diff_pruning", "l0_coef": 10.0, "density": 0.01, "project_at": 1.0}]  # L0 phase only
    seen = {}
    out = api.train(RunConfig.model_validate(d), hooks={"after_clip": lambda loop: seen.setdefault("loop", loop)})
    history = out.result.history
    assert history[-1]["regularizer"] < history[0]["regularizer"]
    kept = sum(layer.dp_values["default"].numel() for layer in dp.dp_layers(seen["loop"].model).values())
    assert kept == round(0.01 * sum(layer.out_features * layer.in_features
                                    for layer in dp.dp_layers(seen["loop"].model).values()))


def test_sparse_gradient_selection_is_the_fisher_top_k():
    model, _ = build_tiny("llama")
    cfg = sparse.Config(density=0.02, selection="gradient", calibration_batches=2)
    apply_methods(model, [cfg])
    batches = [torch.randint(5, 60, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)]

    def losses():
        for ids in batches:
            yield model(ids, labels=ids).loss

    layer = sparse.sparse_layers(model)["model.layers.0.self_attn.q_proj"]
    w = layer.weight
    w.requires_grad_(True)
    for lyr in sparse.sparse_layers(model).values():
        lyr.calibrating = True  # the unselected layers run as the base model, as during selection
    fisher = sum(torch.autograd.grad(model(ids, labels=ids).loss, w)[0] ** 2 for ids in batches[:2])
    for lyr in sparse.sparse_layers(model).values():
        lyr.calibrating = False
    w.requires_grad_(False)
    prepare_methods(model, [cfg], losses)
    k = sparse.budget(w.numel(), 0.02)
    assert torch.equal(layer.sp_index["default"], torch.topk(fisher.flatten(), k).indices.sort().values)
    assert not w.requires_grad and set(trainable_parameters(model)) == {
        n for n, _ in model.named_parameters() if n.endswith("sp_values.default")}


def test_sparse_gradient_selection_runs_in_train(tmp_path, pc_file):
    from tuneforge import api

    d = base_config(tmp_path, pc_file, max_steps=2)
    d["method"] = [{"name": "sparse", "density": 0.01, "calibration_batches": 2}]
    out = api.train(RunConfig.model_validate(d))
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, out.saved)
    assert all(layer.sp_index["default"] is not None for layer in sparse.sparse_layers(fresh).values())


def test_unselected_sparse_refuses_to_run():
    model, _ = build_tiny("llama")
    apply_methods(model, [sparse.Config(selection="gradient")])
    with pytest.raises(RuntimeError, match="not chosen yet"):
        model(torch.tensor([[5, 6, 7]]))


@pytest.mark.parametrize("names", [("freeze", "lora"), ("lora", "ia3"), ("ia3", "lokr"), ("bitfit", "lora")])
def test_compositions_round_trip_and_merge(tmp_path, names):
    kw = {"freeze": {"top_k": 1}, "bitfit": {"add_bias": True}, "lora": {"rank": 4}, "lokr": {"rank": 2}}
    cfgs = [METHODS[n].Config(**kw.get(n, {})) for n in names]
    model, _ = build_tiny("llama")
    apply_methods(model, cfgs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(5, 60, (2, 9), generator=g)
    model.eval()
    ours = model(ids).logits
    with adapter_scope(model, None):
        base_out = model(ids).logits
    assert not torch.allclose(ours, base_out)
    save_adapter(model, cfgs, tmp_path / "ad")
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "ad")
    assert torch.allclose(fresh.eval()(ids).logits, ours, atol=1e-6)
    merge_methods(model, cfgs)
    assert torch.allclose(model(ids).logits, ours, atol=1e-5)


def test_freeze_blocks_bottom_k_and_module_regex():
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS["freeze"].Config(blocks=[-1], bottom_k=1, modules=[r"^model\.norm\."])])
    names = set(trainable_parameters(model))
    assert any(n.startswith("model.layers.0.") for n in names) and any(n.startswith("model.layers.1.") for n in names)
    assert "model.norm.weight" in names and "lm_head.weight" not in names
    with pytest.raises(ValueError, match="out of range"):
        apply_methods(build_tiny("llama")[0], [METHODS["freeze"].Config(blocks=[5])])
