"""Diff pruning under data parallelism (2 CPU processes, gloo): both ranks project to the same mask at the same step
and keep identical weights through the fixed-mask phase, although under DDP log α gets zero (not absent) gradients
after the projection, which AdamW's stale moments turn into drift that the per-step hook must undo."""

import json
import os
import shutil
import subprocess

import pytest
import yaml

from tuneforge.safeio import load_safetensors
from conftest import base_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")]

SCRIPT = '''
import hashlib, json, os, sys
import yaml
from tuneforge.api import train
from tuneforge.config import load_config
from tuneforge.methods import diff_pruning as dp

seen = []

def snapshot(loop):  # after the gradients are summed over ranks, before the optimizer step
    h = hashlib.sha256()
    for path, layer in sorted(dp.dp_layers(loop.model).items()):
        h.update(layer.dp_log_alpha["default"].detach().numpy().tobytes())
        h.update(layer.dp_w["default"].detach().numpy().tobytes())
    seen.append({"step": loop.state.step, "weights": h.hexdigest(),
                 "projected": dp.is_projected(list(dp.dp_layers(loop.model).values()), "default")})

train(load_config(yaml.safe_load(open(sys.argv[1]))), hooks={"after_clip": snapshot})
open(sys.argv[2] + os.environ["RANK"] + ".json", "w").write(json.dumps(seen))
'''


def test_ranks_agree_on_the_projection_and_after_it(tmp_path, pc_file):
    d = base_config(tmp_path, pc_file, max_steps=8, batch_size=2, learning_rate=0.05, weight_decay=0.1,
                    output_dir=str(tmp_path / "ddp"))
    d["method"] = [{"name": "diff_pruning", "density": 0.01, "project_at": 0.5}]  # projects before step 5
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    (tmp_path / "run.py").write_text(SCRIPT)
    proc = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29541", str(tmp_path / "run.py"),
                           str(tmp_path / "cfg.yaml"), str(tmp_path / "rank")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [s["projected"] for s in r0] == [False] * 4 + [True] * 4
    assert r0 == r1  # same projection step, same mask and same weights on both ranks, every step
    saved = load_safetensors(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith(".dp_index") for k in saved) and not any(k.endswith(".dp_w") for k in saved)
    regs = [json.loads(x)["regularizer"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert all(r > 0 for r in regs[:4]) and regs[4:] == [0, 0, 0, 0], regs
