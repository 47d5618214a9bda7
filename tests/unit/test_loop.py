"""The training loop: accumulation normalised by tokens, clipping, non-finite policies, determinism, resume."""

import json
import math

import pytest
import torch

from tuneforge.api import train
from tuneforge.config import load_config
from tuneforge.train.loop import TrainingAborted
from conftest import base_config


def _run(tmp_path, data, name="run", resume=None, hooks=None, overrides=(), **train_kw):
    d = base_config(tmp_path, data, **train_kw)
    d["train"]["output_dir"] = str(tmp_path / name)
    return train(load_config(d, list(overrides)), resume=resume, hooks=hooks)


def _losses(out):
    return [h["loss"] for h in out.result.history]


def _adapter(out):
    from tuneforge.safeio import load_safetensors

    return load_safetensors(out.saved / "adapter_model.safetensors")


def test_batch4_equals_batch1_times_4_accumulation(tmp_path, pc_file):
    a = _run(tmp_path, pc_file, "a", batch_size=4, grad_accum=1, max_steps=3)
    b = _run(tmp_path, pc_file, "b", batch_size=1, grad_accum=4, max_steps=3)
    assert _losses(a) == pytest.approx(_losses(b), abs=1e-5)
    ta, tb = _adapter(a), _adapter(b)
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


# RELIABILITY.md DT-1
def test_same_seed_bitwise_different_seed_differs(tmp_path, pc_file):
    kw = dict(max_steps=4, overrides=["method.0.dropout=0.1"])
    a, b = _run(tmp_path, pc_file, "a", **kw), _run(tmp_path, pc_file, "b", **kw)
    c = _run(tmp_path, pc_file, "c", seed=1, **kw)
    assert _losses(a) == _losses(b)
    ta, tb, tc = _adapter(a), _adapter(b), _adapter(c)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


# RELIABILITY.md NF-6
def test_clipping_bound_and_logged_norm(tmp_path, pc_file):
    seen = []

    def before(loop):
        grads = [p.grad for p in loop.params.values() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    post = []

    def after(loop):
        before_clip = seen[-1]
        grads = [p.grad for p in loop.params.values() if p.grad is not None]
        post.append((before_clip, float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))))

    out = _run(tmp_path, pc_file, hooks={"after_backward": before, "after_clip": after}, max_grad_norm=0.01,
               max_steps=3)
    for rec, (pre, clipped) in zip(out.result.history, post):
        assert rec["grad_norm"] == pytest.approx(pre, rel=1e-6)
        assert clipped <= 0.01 + 1e-6


def _poison(at_steps):
    def hook(loop):
        if loop.state.step + 1 in at_steps:
            p = next(iter(loop.params.values()))
            p.grad[0].fill_(float("nan"))
    return hook


# RELIABILITY.md NF-1
def test_nan_step_is_skipped_bitwise(tmp_path, pc_file):
    snaps = {}

    def snap(loop):
        if loop.state.step + 1 in (2, 3):
            snaps[loop.state.step + 1] = {n: p.detach().clone() for n, p in loop.params.items()}

    hooks = {"after_backward": lambda loop: (snap(loop), _poison({2})(loop))}
    out = _run(tmp_path, pc_file, hooks=hooks, max_steps=4)
    # step 2 was skipped: the weights going into step 3 are those going into step 2
    assert all(torch.equal(snaps[2][n], snaps[3][n]) for n in snaps[2])
    assert out.result.state.skipped_steps == 1
    assert math.isnan(out.result.history[1]["grad_norm"])
    assert out.result.history[-1]["skipped_steps"] == 1


def test_three_bad_steps_abort_with_checkpoint(tmp_path, pc_file):
    with pytest.raises(TrainingAborted) as e:
        _run(tmp_path, pc_file, hooks={"after_backward": _poison({2, 3, 4})}, max_steps=6)
    msg = str(e.value)
    assert "3 consecutive" in msg and "step 4" in msg and "lora_" in msg and "checkpoints" in msg


# RELIABILITY.md NF-2
def test_nan_policy_raise_stops_in_the_same_step(tmp_path, pc_file):
    with pytest.raises(TrainingAborted, match="step 2.*nan_policy=raise"):
        _run(tmp_path, pc_file, hooks={"after_backward": _poison({2})}, max_steps=4, nan_policy="raise")


# RELIABILITY.md NF-3
def test_inf_loss_is_logged_not_hidden(tmp_path, pc_file, capsys):
    def inf_loss(loop):
        if loop.state.step + 1 == 2:
            for p in loop.params.values():
                p.grad.fill_(float("inf"))

    out = _run(tmp_path, pc_file, hooks={"after_backward": inf_loss}, max_steps=3)
    recs = [json.loads(x) for x in (out.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert recs[1]["grad_norm"] in (float("inf"), float("nan")) or not math.isfinite(recs[1]["grad_norm"])
    assert "batch rows" in capsys.readouterr().err


# RELIABILITY.md CK-5
def test_resume_from_checkpoint_is_bitwise(tmp_path, pc_file, capsys):
    full = _run(tmp_path, pc_file, "full", max_steps=8, save_every=100, overrides=["method.0.dropout=0.1"])
    # interrupted: crash during step 6 with a checkpoint at step 4, then resume the same config
    d = base_config(tmp_path, pc_file, max_steps=8, save_every=4)
    d["train"]["output_dir"] = str(tmp_path / "part")
    cfg = load_config(d, ["method.0.dropout=0.1"])

    class Crash(Exception):
        pass

    def crash(loop):
        if loop.state.step == 6:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, hooks={"after_clip": crash})
    capsys.readouterr()
    resumed = train(cfg, resume="auto")
    assert resumed.result.history[0]["step"] == 5
    said = capsys.readouterr().out
    assert f"resuming from {resumed.out_dir / 'checkpoints' / 'step-00000004'} (step 4 of " in said
    ta, tb = _adapter(full), _adapter(resumed)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    log_full = (full.out_dir / "metrics.jsonl").read_text().splitlines()
    log_res = (resumed.out_dir / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "step_s")}
                           for x in lines]
    assert strip(log_full) == strip(log_res)
    ledger = lambda o: (o.out_dir / "ledger.jsonl").read_text()
    assert ledger(full) == ledger(resumed)


def test_ck4_changed_config_is_refused_with_the_diff(tmp_path, pc_file):
    from tuneforge.train.checkpoint import CheckpointError

    _run(tmp_path, pc_file, "r", max_steps=2, save_every=2)
    with pytest.raises(CheckpointError, match=r"learning_rate: 0\.001 -> 0\.002"):
        _run(tmp_path, pc_file, "r", resume="auto", max_steps=4, learning_rate=2e-3)
    with pytest.warns(UserWarning, match="learning_rate"):
        d = base_config(tmp_path, pc_file, max_steps=4, learning_rate=2e-3, output_dir=str(tmp_path / "r"))
        out = train(load_config(d), resume="auto", allow_config_change=True)
    assert [h["step"] for h in out.result.history] == [3, 4]


def test_all_masked_batch_contributes_zero_not_nan():
    """NF-5 at the loss level: a micro-batch with every label -100 gives loss 0, 0 tokens and zero, finite grads
    (the data pipeline already drops such rows and refuses a dataset of them; this guards the arithmetic)."""
    from tuneforge.algorithms import sft
    from tuneforge.models.tiny import build_tiny
    from tuneforge.train.loop import StepContext

    model, _ = build_tiny("llama", seed=0)
    ids = torch.randint(5, 50, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
    loss, metrics = sft.step(model, batch, sft.Config(), StepContext(normaliser=0.0, step=0))
    loss.backward()
    assert float(loss.detach()) == 0.0 and metrics["tokens"] == 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_periodic_eval_logs_eval_loss(tmp_path, pc_file):
    out = _run(tmp_path, pc_file, "e", max_steps=4, eval_every=2, overrides=["data.eval_fraction=0.25"])
    evals = {h["step"]: h["eval_loss"] for h in out.result.history if "eval_loss" in h}
    assert sorted(evals) == [2, 4] and all(math.isfinite(v) for v in evals.values())
    assert evals[4] < evals[2] + 1.0
    rows = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]


def test_an_update_with_no_tokens_anywhere_takes_no_optimizer_step(tmp_path):
    """An online update whose global normaliser is 0 (e.g. a PPO minibatch no completion fell into) must not step:
    with several processes the summed gradient is all zeros, and AdamW would still move the weights by momentum
    and decay. Every process sees the same global sum, so all skip alike."""
    from types import SimpleNamespace

    from tuneforge.config import TrainConfig
    from tuneforge.train.loop import Experience, Loop

    w = torch.nn.Linear(2, 1, bias=False)
    model = torch.nn.Sequential(w)
    x = torch.ones(1, 2)

    def make_experience(model, rows, cfg, ctx):
        return Experience(updates=[[{"input_ids": x}], [], [{"input_ids": x}]], weights=[1.0, 0.0, 1.0], samples=1)

    def step(model, batch, cfg, ctx):
        return model(batch["input_ids"]).sum() / ctx.normaliser, {"policy_loss": 1.0}

    algo = SimpleNamespace(make_experience=make_experience, step=step)
    tcfg = TrainConfig(max_steps=1, batch_size=1, learning_rate=0.1, weight_decay=0.1, warmup_steps=0,
                       output_dir=str(tmp_path / "out"), progress=False)
    loop = Loop(model, algo, None, [{"input_ids": [1]}], tcfg, tmp_path / "out", collate=lambda rows: rows)
    steps = []
    loop.opt.step = (lambda f: (lambda *a, **k: (steps.append(1), f(*a, **k))[1]))(loop.opt.step)
    record = loop.train_step([0])
    assert len(steps) == 2 and record["updates"] == 2
    assert record["policy_loss"] == 1.0  # averaged over the updates that stepped, not diluted by the skipped one
