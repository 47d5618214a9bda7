"""Data parallelism on CPU (gloo): 2 processes give the per-step losses of 1 process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tuneforge.api import train
from tuneforge.config import load_config
from conftest import base_config


def _records(out_dir):
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_match_one(tmp_path, pc_file):
    single = base_config(tmp_path, pc_file, max_steps=4, batch_size=4, output_dir=str(tmp_path / "single"))
    train(load_config(single))
    ddp = base_config(tmp_path, pc_file, max_steps=4, batch_size=2, output_dir=str(tmp_path / "ddp"))
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(ddp))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29517", "-m", "tuneforge", "train",
                           str(cfg_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _records(tmp_path / "single"), _records(tmp_path / "ddp")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5
        assert ra["tokens"] == rb["tokens"]
    ledger = [json.loads(x) for x in (tmp_path / "ddp" / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 4  # one writer: rank 0
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").exists()
