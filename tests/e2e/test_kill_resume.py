"""CK-1: a run SIGKILLed mid-training (in epoch 2, and mid-accumulation) and resumed with ``--resume auto`` ends
bitwise equal to an uninterrupted one, with the same loss log and the same row ledger (CK-2)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tuneforge.safeio import load_safetensors
from conftest import base_config

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(cfg_path, *extra):
    return [sys.executable, "-m", "tuneforge", "train", str(cfg_path), *extra]


def _write(tmp_path, name, data, **train_kw):
    d = base_config(tmp_path, data, output_dir=str(tmp_path / name), num_threads=1, **train_kw)
    d["method"][0]["dropout"] = 0.1
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _kill_after(cfg_path, ledger, at_step):
    proc = subprocess.Popen(_cmd(cfg_path), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ledger.exists() and len(ledger.read_text().splitlines()) >= at_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.parametrize("accum,kill_at", [(1, 19), (4, 9)])
def test_sigkill_then_resume_is_bitwise(tmp_path, pc_file, accum, kill_at):
    kw = dict(max_steps=24, save_every=4, batch_size=4 // accum, grad_accum=accum, epochs=1)
    base = _write(tmp_path, "base", pc_file, **kw)
    subprocess.run(_cmd(base), env=ENV, check=True, capture_output=True)
    run = _write(tmp_path, "run", pc_file, **kw)
    _kill_after(run, tmp_path / "run" / "ledger.jsonl", kill_at)
    assert not (tmp_path / "run" / "adapter").exists()
    _resume_and_compare(tmp_path, run)
    assert (tmp_path / "base" / "ledger.jsonl").read_text() == (tmp_path / "run" / "ledger.jsonl").read_text()


def _resume_and_compare(tmp_path, run_cfg):
    """Resume the killed run; its adapter must equal the uninterrupted one bitwise and its loss log be identical."""
    res = subprocess.run(_cmd(run_cfg, "--resume", "auto"), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_safetensors(tmp_path / "base" / "adapter" / "adapter_model.safetensors")
    b = load_safetensors(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "step_s")}
                       for x in p.read_text().splitlines()]
    assert strip(tmp_path / "base" / "metrics.jsonl") == strip(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.parametrize("algorithm", [
    {"name": "grpo", "num_generations": 4, "max_new_tokens": 6, "num_iterations": 2,
     "rewards": [{"name": "length", "target": 3}, {"name": "similarity"}]},
    {"name": "ppo", "max_new_tokens": 6, "ppo_epochs": 2, "num_minibatches": 2, "ptx_coef": 0.1,
     "rewards": [{"name": "length", "target": 3}]},
], ids=["grpo", "ppo"])
def test_online_sigkill_then_resume_is_bitwise(tmp_path, pc_file, algorithm):
    """CK-1 for the online algorithms: rollouts, rewards, the PPO critic and the optimizer all continue exactly.
    Rollouts are drawn from per-request generators seeded by (seed, step, row, sample), and checkpoints fall
    between loop steps, so a resumed run re-draws exactly what the uninterrupted run drew."""
    kw = dict(max_steps=12, save_every=3, batch_size=2, grad_accum=2, epochs=1)
    for name in ("base", "run"):
        path = _write(tmp_path, name, pc_file, **kw)
        d = yaml.safe_load(path.read_text())
        d["algorithm"] = algorithm
        path.write_text(yaml.safe_dump(d))
    subprocess.run(_cmd(tmp_path / "base.yaml"), env=ENV, check=True, capture_output=True)
    _kill_after(tmp_path / "run.yaml", tmp_path / "run" / "ledger.jsonl", 7)
    _resume_and_compare(tmp_path, tmp_path / "run.yaml")
