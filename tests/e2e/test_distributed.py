"""Data parallelism on CPU (gloo): 2 processes equal 1 process with the same global batch (DT-2), and a checkpoint
written by 2 processes is refused, with the reason, by a 1-process resume (CK-8)."""

import json
import os
import shutil
import subprocess

import pytest
import torch
import yaml

from tuneforge.api import train
from tuneforge.config import load_config
from tuneforge.safeio import load_safetensors
from tuneforge.train.checkpoint import CheckpointError
from conftest import base_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")]


def _records(out_dir):
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _torchrun(cfg_dict, path, port):
    path.write_text(yaml.safe_dump(cfg_dict))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["torchrun", "--nproc_per_node=2", f"--master_port={port}", "-m", "tuneforge", "train",
                           str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("micro,accum,port", [(4, 1, 29517), (2, 2, 29518)])
def test_two_processes_match_one(tmp_path, pc_file, micro, accum, port):
    steps = 10
    single = base_config(tmp_path, pc_file, max_steps=steps, batch_size=8, output_dir=str(tmp_path / "single"),
                         save_every=5)
    train(load_config(single))
    ddp = base_config(tmp_path, pc_file, max_steps=steps, batch_size=micro, grad_accum=accum,
                      output_dir=str(tmp_path / "ddp"), save_every=5)
    _torchrun(ddp, tmp_path / "ddp.yaml", port)
    a, b = _records(tmp_path / "single"), _records(tmp_path / "ddp")
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 and ra["tokens"] == rb["tokens"]
        assert abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-5 * max(1.0, ra["grad_norm"])
    pa = load_safetensors(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    pb = load_safetensors(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(pa[k], pb[k], atol=1e-5) for k in pa)
    ledger = (tmp_path / "ddp" / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == steps  # one writer: rank 0
    assert ledger == (tmp_path / "single" / "ledger.jsonl").read_text().splitlines()
    if accum == 1:  # CK-8: a 1-process resume of the 2-process checkpoint is refused with the reason
        cfg = load_config(ddp, [f"train.max_steps={steps + 2}"])
        with pytest.raises(CheckpointError, match="2 process"):
            train(cfg, resume="auto", allow_config_change=True)


@pytest.mark.parametrize("algorithm,port", [
    ({"name": "grpo", "num_generations": 4, "max_new_tokens": 5,
      "rewards": [{"name": "length", "target": 3}, {"name": "similarity"}]}, 29521),
    ({"name": "online_dpo", "max_new_tokens": 5, "rewards": [{"name": "exact_match"}]}, 29522),
    ({"name": "ppo", "max_new_tokens": 5, "ppo_epochs": 2, "num_minibatches": 2, "whiten_advantages": True,
      "temperature": 0.7, "ptx_coef": 0.1, "rewards": [{"name": "length", "target": 3}, {"name": "similarity"}]},
     29523),
], ids=["grpo", "online_dpo_mostly_skipped", "ppo_whitened_minibatches"])
def test_online_algorithms_two_processes_match_one(tmp_path, pc_file, algorithm, port):
    """Rollouts are seeded per request, so 2 processes sample exactly what 1 process samples for the same global
    batch; rewards, losses and weights agree. Online DPO with an exact-match reward on an untrained model skips
    most pairs, so a process often has nothing to train on in a step and must still join every collective. PPO
    whitens advantages over the global batch and splits the global batch into its minibatches, so with whitening
    and 2 minibatches per epoch each update trains exactly what it trains in one process."""
    steps = 4
    single = base_config(tmp_path, pc_file, max_steps=steps, batch_size=4, output_dir=str(tmp_path / "single"))
    single["algorithm"] = algorithm
    train(load_config(single))
    ddp = base_config(tmp_path, pc_file, max_steps=steps, batch_size=2, output_dir=str(tmp_path / "ddp"))
    ddp["algorithm"] = algorithm
    _torchrun(ddp, tmp_path / "ddp.yaml", port)
    a, b = _records(tmp_path / "single"), _records(tmp_path / "ddp")
    for ra, rb in zip(a, b):
        assert ra.get("reward", 0) == pytest.approx(rb.get("reward", 0), abs=1e-9) and ra["samples"] == rb["samples"]
        assert abs(ra["loss"] - rb["loss"]) < 1e-5
    pa = load_safetensors(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    pb = load_safetensors(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(pa[k], pb[k], atol=1e-5) for k in pa)
