"""``tuneforge demo`` on the real model: a shortened plan (30 LoRA steps, 32 held-out problems) still takes
SmolLM2-135M-Instruct from ~0% to ≥ 80% held-out exact match on the record task (the full plan measured 0% -> 100%
on 64 problems), writes the adapter, the loss curve, the summary and a GGUF file llama.cpp can read."""

import json
from pathlib import Path

from tuneforge.real_demo import RealPlan, run_real_demo

SHORT = RealPlan(train_rows=400, eval_rows=32, steps=30, eval_every=15, gguf_type="f16")


def test_real_demo_lifts_held_out_exact_match_and_exports_gguf(smollm2_dir, tmp_path):
    lines = []
    s = run_real_demo(str(tmp_path / "demo"), SHORT, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert s["exact_match_before"] <= 0.05 and s["exact_match_after"] >= 0.80, s
    assert s["held_out_examples"] == 32
    for key in ("adapter", "loss_curve", "gguf"):
        assert Path(s[key]).exists(), key
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["exact_match_after"] == s["exact_match_after"]
    import gguf

    reader = gguf.GGUFReader(s["gguf"])
    assert len(reader.tensors) > 0 and any("before fine-tuning" in x for x in lines)
