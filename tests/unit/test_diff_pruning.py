"""Diff pruning's two phases (Guo et al. 2021, sec. 3.3): the gated dense delta trains with the L0 penalty, is
projected by magnitude to exactly ``density`` after ``project_at`` of the run, and then only the kept entries train.
Also: the mask survives a kill/resume on either side of the projection (it lives in log α, a trainable tensor),
tensors that get no gradient after projection cannot move it, and the saved adapter still loads and merges."""

import json

import pytest
import torch
from conftest import base_config

from tuneforge.api import train
from tuneforge.config import TrainConfig, load_config
from tuneforge.methods import (apply_methods, finalize_methods, load_adapter, merge_methods, regularizer,
                               save_adapter, step_methods)
from tuneforge.methods import diff_pruning as dp
from tuneforge.models.tiny import build_tiny
from tuneforge.safeio import load_safetensors
from tuneforge.train.optim import make_optimizer


def _ids():
    return torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(0))


def _trained_dense(density=0.02, seed=3, **kw):
    """A tiny llama whose (w, log α) look trained: random w, log α spread around 0 so E[z] takes every value."""
    model, _ = build_tiny("llama")
    cfg = dp.Config(density=density, **kw)
    apply_methods(model, [cfg])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dp.dp_layers(model).values():
            layer.dp_w["default"].copy_(torch.randn(layer.dp_w["default"].shape, generator=g) * 0.05)
            layer.dp_log_alpha["default"].copy_(torch.randn(layer.dp_log_alpha["default"].shape, generator=g) * 2)
    return model, cfg


def _layers(model):
    return list(dp.dp_layers(model).values())


def test_project_step_golden_values():
    # round(project_at * total), halves up; project_at = 1 is the end of the run (never reached inside the loop)
    assert [dp.project_step(0.5, 150), dp.project_step(0.3, 150), dp.project_step(0.25, 10),
            dp.project_step(1.0, 150), dp.project_step(0.01, 10)] == [75, 45, 3, 150, 0]


def test_mask_logits_are_exact_gates_in_every_float_format():
    keep = torch.tensor([True, False])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        la = dp.mask_logits(keep, dtype)
        assert la.tolist() == [dp.MASK_LOGIT, -dp.MASK_LOGIT]
        assert dp.hard_concrete_mean(la.float()).tolist() == [1.0, 0.0]
        for u in (1e-6, 0.5, 1 - 1e-6):  # even the noisy training gate is exactly the mask
            assert dp.hard_concrete_sample(la.float(), torch.full((2,), u)).tolist() == [1.0, 0.0]


def test_on_step_projects_at_project_at_to_exactly_density():
    """Before ``project_step`` nothing changes; at it, the kept entries are the global top-k of |E[z] ⊙ w| (k =
    round(density x targeted weights)), their delta is unchanged, every other entry's delta is 0, and the L0 penalty
    is gone (no gates are left to close)."""
    model, cfg = _trained_dense(project_at=0.5)
    layers = _layers(model)
    expected = [layer.expected_delta("default").detach().clone() for layer in layers]
    total = sum(e.numel() for e in expected)
    k = round(cfg.density * total)
    want = dp.topk_mask([e.abs() for e in expected], k)
    step_methods(model, [cfg], step=4, total=10)
    assert not dp.is_projected(layers, "default") and regularizer(model, [cfg]) is not None
    step_methods(model, [cfg], step=5, total=10)
    assert dp.is_projected(layers, "default") and regularizer(model, [cfg]) is None
    assert sum(int(layer.kept("default").sum()) for layer in layers) == k
    for layer, e, keep in zip(layers, expected, want):
        keep = keep.view_as(e)
        assert torch.equal(layer.kept("default"), keep)
        for training in (True, False):  # no gate noise after projection
            layer.train(training)
            assert torch.equal(layer.delta("default"), torch.where(keep, e, torch.zeros_like(e)))


def test_fixed_phase_gives_log_alpha_no_gradient_and_ignores_dropped_w():
    model, cfg = _trained_dense()
    step_methods(model, [cfg], step=0, total=1)  # project_at 0.5 of 1 step rounds to step 1: not yet
    assert not dp.is_projected(_layers(model), "default")
    step_methods(model, [cfg], step=1, total=2)
    model.train()
    ref = model(_ids()).logits
    ref.sum().backward()
    for layer in _layers(model):
        assert layer.dp_log_alpha["default"].grad is None
        g = layer.dp_w["default"].grad
        assert torch.equal(g[~layer.kept("default")], torch.zeros_like(g[~layer.kept("default")]))
    with torch.no_grad():  # what the optimizer does to dropped entries (stale moments, decay) cannot matter
        for layer in _layers(model):
            layer.dp_w["default"].add_(~layer.kept("default") * 0.3)
    assert torch.equal(model(_ids()).logits, ref)


def test_optimizer_drift_on_the_mask_is_undone_and_cannot_flip_it():
    """Under DDP, tensors without a gradient get a zero one (summed over ranks): AdamW then applies its stale
    moments and, if the tensor decays, weight decay. The next ``on_step`` snaps log α back to ±MASK_LOGIT."""
    model, cfg = _trained_dense()
    layers = _layers(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(params, TrainConfig(learning_rate=0.1, weight_decay=0.5), model)
    for p in params.values():  # Adam moments from a dense-phase step
        p.grad = torch.randn_like(p)
    opt.step()
    step_methods(model, [cfg], step=1, total=2)
    masks = [layer.kept("default").clone() for layer in layers]
    for _ in range(5):
        for p in params.values():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert any(not torch.equal(layer.dp_log_alpha["default"], dp.mask_logits(m, torch.float32))
               for layer, m in zip(layers, masks))  # the stale moments did move log α
    step_methods(model, [cfg], step=2, total=2)
    for layer, m in zip(layers, masks):
        assert torch.equal(layer.kept("default"), m)
        assert torch.equal(layer.dp_log_alpha["default"], dp.mask_logits(m, torch.float32))


def test_finalize_after_fixed_phase_saves_the_mask_and_merges(tmp_path):
    model, cfg = _trained_dense()
    step_methods(model, [cfg], step=1, total=2)
    with torch.no_grad():  # the fixed phase trains on: kept entries move
        for layer in _layers(model):
            layer.dp_w["default"].mul_(1.5)
    masks = [layer.kept("default").flatten().nonzero().flatten() for layer in _layers(model)]
    kept_w = [layer.dp_w["default"].detach().flatten()[m].clone() for layer, m in zip(_layers(model), masks)]
    model.eval()
    before = model(_ids()).logits
    finalize_methods(model, [cfg])
    for layer, m, w in zip(_layers(model), masks, kept_w):
        assert torch.equal(layer.dp_index["default"], m) and torch.equal(layer.dp_values["default"], w)
    assert torch.equal(model(_ids()).logits, before)
    save_adapter(model, [cfg], tmp_path / "ad")
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh.eval()(_ids()).logits, before)
    merge_methods(model, [cfg])
    assert torch.allclose(model(_ids()).logits, before, atol=1e-5)


def test_training_projects_then_trains_only_the_kept_entries(tmp_path, pc_file):
    """Through ``api.train``: 6 steps, projection before step 4 (0-based 3). From then on the penalty is 0, the
    saved adapter keeps exactly the entries chosen at the projection, and their values went on training. Before
    the fix the projection happened only at the end, so nothing trained after it."""
    d = base_config(tmp_path, pc_file, max_steps=6, learning_rate=0.05)
    d["method"] = [{"name": "diff_pruning", "density": 0.01, "project_at": 0.5}]
    seen = {}

    def snapshot(loop):
        if loop.state.step == 3:
            layers = dp.dp_layers(loop.model)
            seen.update({p: (layer.kept("default").flatten().nonzero().flatten(),
                             layer.dp_w["default"].detach().flatten().clone()) for p, layer in layers.items()})

    out = train(load_config(d), hooks={"after_clip": snapshot})
    regs = [h["regularizer"] for h in out.result.history]
    assert all(r > 0 for r in regs[:3]) and regs[3:] == [0, 0, 0], regs
    saved = load_safetensors(out.saved / "adapter_model.safetensors")
    total = sum(int(seen[p][1].numel()) for p in seen)
    assert sum(saved[f"{p}.dp_index"].numel() for p in seen) == round(0.01 * total)
    moved = 0
    for p, (index, w_at_projection) in seen.items():
        assert torch.equal(saved[f"{p}.dp_index"], index)
        moved += int((saved[f"{p}.dp_values"] != w_at_projection[index]).sum())
    assert moved > 0.9 * round(0.01 * total)


def _run(tmp_path, data, name, hooks=None, resume=None, **train_kw):
    d = base_config(tmp_path, data, output_dir=str(tmp_path / name), max_steps=10, learning_rate=0.05, **train_kw)
    d["method"] = [{"name": "diff_pruning", "density": 0.01, "project_at": 0.5}]  # projects before step 6 (0-based 5)
    return train(load_config(d), hooks=hooks, resume=resume)


@pytest.mark.parametrize("save_every,crash_at", [(3, 7), (5, 7), (3, 4)],
                         ids=["resume-after-projection", "resume-at-projection", "resume-before-projection"])
def test_resume_across_the_projection_is_bitwise(tmp_path, pc_file, save_every, crash_at):
    """CK-5 for diff pruning: a checkpoint from after the projection (mask recovered from log α), from exactly its
    step (saved before it ran) or from before it, resumed, ends bitwise equal to an uninterrupted run."""
    full = _run(tmp_path, pc_file, "full", save_every=100)

    class Crash(Exception):
        pass

    def crash(loop):
        if loop.state.step == crash_at:
            raise Crash

    with pytest.raises(Crash):
        _run(tmp_path, pc_file, "part", hooks={"after_clip": crash}, save_every=save_every)
    resumed = _run(tmp_path, pc_file, "part", resume="auto", save_every=save_every)
    assert resumed.result.history[0]["step"] == crash_at // save_every * save_every + 1
    a = load_safetensors(full.saved / "adapter_model.safetensors")
    b = load_safetensors(resumed.saved / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda o: [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "step_s")}
                       for x in (o.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert strip(full) == strip(resumed)
