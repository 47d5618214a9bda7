"""Does each method learn? One table: held-out exact match before/after fine-tuning on the demo's task.

Pretrains the demo's tiny Llama once (copying and sorting), then fine-tunes it on string reversal — a skill the
base does not have (0% exact match) — with every method through ``tuneforge.api.train``, 150 steps each, and
measures exact match on 200 held-out problems. Learning rates are per method
(``tuneforge.demo.LEARNING_SETUPS``, from a small sweep: adapters that scale or shift activations need larger steps
than LoRA). Writes ``results/method_learning.json`` and a markdown table; ``--quick`` runs a tiny version (seconds)
for a smoke test. ``tests/e2e/test_method_learning.py`` asserts the same runs clear a stated margin.

    python benchmarks/method_learning.py [--quick] [--methods lora,ia3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tuneforge.demo import LEARNING_SETUPS, QUICK, DemoPlan, finetune, pretrain

METHODS = LEARNING_SETUPS  # label -> (method config, learning rate)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "method_learning.json"))
    a = ap.parse_args()
    plan = QUICK if a.quick else DemoPlan()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = pretrain(Path(tmp), plan)
        print(f"pretrained base in {time.perf_counter() - t0:.0f} s", flush=True)
        for label in a.methods.split(","):
            method, lr = METHODS[label]
            t0 = time.perf_counter()
            r = finetune(base, Path(tmp) / label.split()[0], plan, method=method, lr=lr, log=lambda *_: None)
            rows.append({"method": label, "lr": lr, "before": r["exact_match_before"],
                         "after": r["exact_match_after"], "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{label:24s} {r['exact_match_before']:6.1%} -> {r['exact_match_after']:6.1%}  "
                  f"({rows[-1]['seconds']} s)", flush=True)
    table = ["| method | lr | held-out EM before | after | seconds |", "|---|---|---|---|---|"]
    table += [f"| {r['method']} | {r['lr']:g} | {r['before']:.1%} | {r['after']:.1%} | {r['seconds']} |"
              for r in rows]
    print("\n".join(table))
    if not a.quick:
        Path(a.out).write_text(json.dumps({"task": plan.task, "steps": plan.lora_steps, "held_out": plan.eval_rows,
                                           "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
