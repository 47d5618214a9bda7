"""CK-1 and CK-8 at world size 2: every process saves and restores its own RNG state, so a 2-process run with
dropout resumed from a checkpoint continues exactly as the uninterrupted 2-process run (before, only rank 0's state
was saved and every rank restored it, and losses drifted from the 4th step after the resume)."""

import json
import os
import shutil
import subprocess

import pytest
import torch
import yaml

from tuneforge.safeio import load_safetensors
from tuneforge.train import checkpoint as ckpt
from conftest import base_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")]


def _torchrun(cfg_path, port, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["torchrun", "--nproc_per_node=2", f"--master_port={port}", "-m", "tuneforge", "train",
                           str(cfg_path), *extra], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(out_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())]


def test_two_process_resume_with_dropout_is_exact(tmp_path, pc_file):
    d = base_config(tmp_path, pc_file, max_steps=12, save_every=4, keep_last=3, batch_size=2,
                    output_dir=str(tmp_path / "base"))
    d["method"][0]["dropout"] = 0.3
    base_yaml = tmp_path / "base.yaml"
    base_yaml.write_text(yaml.safe_dump(d))
    _torchrun(base_yaml, 29531)

    state = json.loads((tmp_path / "base" / "checkpoints" / ckpt.step_dir_name(4) / "state.json").read_text())
    assert len(state["rng"]["per_rank"]) == 2  # both processes' generators are in the checkpoint

    run = tmp_path / "run"  # a copy of the base run as it was at step 4, as if it had been killed there
    shutil.copytree(tmp_path / "base" / "checkpoints" / ckpt.step_dir_name(4), run / "checkpoints" /
                    ckpt.step_dir_name(4))
    d["train"]["output_dir"] = str(run)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(d))
    _torchrun(run_yaml, 29532, "--resume", "auto")

    after = [x for x in _losses(tmp_path / "base") if x[0] > 4]
    assert _losses(run)[-len(after):] == after  # steps 5..12: identical losses
    a = load_safetensors(tmp_path / "base" / "adapter" / "adapter_model.safetensors")
    b = load_safetensors(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
