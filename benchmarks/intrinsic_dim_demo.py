"""d90 on the demo task: ``tuneforge intrinsic-dim`` on the tiny demo model's string reversal.

Pretrains the demo's tiny Llama (copying and sorting; or ``--base``), writes the reversal task's training rows and
200 held-out problems exactly as the demo does, and runs the search (``tuneforge.intrinsic_dim.search``): one full
fine-tuning run as the reference (lr 1e-3, the demo's full-fine-tuning rate), then the random-subspace method at each
``--dims`` (150 steps each, the demo's schedule) with the learning-rate rule given (``--lr-scale sqrt``: η_ref √(d_ref
/ d) with η_ref = ``--lr`` at d_ref = ``--ref-dim``). Writes the search's JSON and plot, and copies the JSON to
``results/intrinsic_dim_demo_<label>.json``.

    python benchmarks/intrinsic_dim_demo.py --said --dims 1000,3000,10000,30000 --label said_sqrt
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.demo import DemoPlan, _recipe, pretrain
from tuneforge.intrinsic_dim import search
from tuneforge.tasks import make_examples, write_jsonl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="1000,3000,10000,30000")
    ap.add_argument("--said", action="store_true")
    ap.add_argument("--lr", type=float, default=0.3, help="the rate at --ref-dim (the demo's 0.3 at d = 10000)")
    ap.add_argument("--ref-dim", type=int, default=10000)
    ap.add_argument("--lr-scale", default="sqrt", choices=["sqrt", "none"])
    ap.add_argument("--lr-factors", default="1")
    ap.add_argument("--refine", type=int, default=2)
    ap.add_argument("--base", default=None, help="an already pretrained demo base (skips pretraining)")
    ap.add_argument("--label", default=None, help="results/intrinsic_dim_demo_<label>.json")
    a = ap.parse_args()
    plan = DemoPlan()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = a.base or pretrain(tmp, plan)
        train_file, eval_file = tmp / "data" / "train.jsonl", tmp / "data" / "eval.jsonl"
        write_jsonl(make_examples(plan.task, plan.lora_rows, seed=1), train_file)
        write_jsonl(make_examples(plan.task, plan.eval_rows, seed=2), eval_file)
        method = {"name": "intrinsic", "dimension": a.ref_dim, "said": a.said}
        recipe = _recipe(base, str(train_file), tmp / "run", [method], plan.lora_steps, a.lr, plan.lora_batch)
        recipe["data"]["eval"] = str(eval_file)
        t0 = time.perf_counter()
        s = search(load_config(recipe), [int(d) for d in a.dims.split(",")], tmp / "search", full_lr=1e-3,
                   refine=a.refine, lr_scale=a.lr_scale, lr_factors=tuple(float(f) for f in a.lr_factors.split(",")),
                   log=lambda line: print(line, flush=True))
        print(f"search took {time.perf_counter() - t0:.0f} s")
        label = a.label or ("said" if a.said else "plain") + f"_{a.lr_scale}"
        out = Path(__file__).parent / "results" / f"intrinsic_dim_demo_{label}.json"
        shutil.copy(tmp / "search" / "intrinsic_dim.json", out)
        shutil.copy(tmp / "search" / "intrinsic_dim.png", out.with_suffix(".png"))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
