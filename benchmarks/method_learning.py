"""Does each method learn? One table: held-out exact match before/after fine-tuning on the demo's task, over seeds.

Pretrains the demo's tiny Llama once (copying and sorting), then fine-tunes it on string reversal — a skill the
base does not have (0% exact match) — with every method through ``tuneforge.api.train``, 150 steps each, and
measures exact match on 200 held-out problems. Each method runs once per fine-tuning seed (data order, adapter
init, dropout/gate noise; ``DemoPlan.seed``), and the table gives the mean and the range over seeds: the spread is
the honest error bar of one run, and a different CPU's float rounding (AVX-512 vs AMX kernels) moves a run about as
much as a different seed does. Learning rates are per method (``tuneforge.demo.LEARNING_SETUPS``, from a small
sweep: adapters that scale or shift activations need larger steps than LoRA). Writes ``results/method_learning.json``
and a markdown table; ``--quick`` runs a tiny version (seconds) for a smoke test.
``tests/e2e/test_method_learning.py`` asserts seed 0's run clears half of the worst seed measured here.

    python benchmarks/method_learning.py [--quick] [--methods lora,ia3] [--seeds 0,1,2] [--base DIR] [--fusion]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from tuneforge.demo import LEARNING_SETUPS, QUICK, DemoPlan, finetune, pretrain

# Set-ups this benchmark measures beyond ``LEARNING_SETUPS`` (label -> (method config, learning rate)). UniPELT
# (Mao et al. 2022) with the paper's sizes: gated LoRA r 8 on W_q/W_v, a 10-token prefix, a gated Pfeiffer adapter
# (m = d/16), and the same mixture without its gates (the paper's ablation); results in
# results/method_learning_unipelt.json. One learning rate for all three parts, from seed 0 at 3e-3 / 1e-2 / 3e-2:
# 66% / 99% / 93% held-out exact match.
EXTRA_SETUPS: dict[str, tuple[dict | list, float]] = {
    "unipelt (r 8; n = 10; m = d/16)": ({"name": "unipelt"}, 1e-2),
    "unipelt without gates": ({"name": "unipelt", "gate": False}, 1e-2),
}
METHODS = {**LEARNING_SETUPS, **EXTRA_SETUPS}  # label -> (method config, learning rate)


def summarise(label: str, lr: float, runs: list[dict]) -> dict:
    """One table row from a method's runs (one per seed): held-out exact match after, as mean / min / max."""
    after = [r["after"] for r in runs]
    loss_after = [r["loss_after"] for r in runs]
    return {"method": label, "lr": lr, "seeds": [r["seed"] for r in runs],
            "before": max(r["before"] for r in runs), "after": after,
            "after_mean": round(statistics.fmean(after), 4), "after_min": min(after), "after_max": max(after),
            "loss_before": runs[0]["loss_before"], "loss_after": loss_after, "loss_after_max": max(loss_after),
            "seconds": round(statistics.fmean(r["seconds"] for r in runs), 1)}


def table(rows: list[dict]) -> str:
    lines = ["| method | lr | held-out EM before | after: mean (min – max) | held-out loss before → after (worst) "
             "| seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['lr']:g} | {r['before']:.1%} | {r['after_mean']:.1%} "
              f"({r['after_min']:.1%} – {r['after_max']:.1%}) | {r['loss_before']:.3f} → {r['loss_after_max']:.3f} "
              f"| {r['seconds']} |" for r in rows]
    return "\n".join(lines)


def run_method(base: str, tmp: Path, plan: DemoPlan, label: str, seeds: list[int]) -> dict:
    method, lr = METHODS[label]
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        r = finetune(base, tmp / f"{label.split()[0]}-{seed}", dataclasses.replace(plan, seed=seed), method=method,
                     lr=lr, log=lambda *_: None)
        runs.append({"seed": seed, "before": r["exact_match_before"], "after": r["exact_match_after"],
                     "loss_before": r["held_out_loss_before"], "loss_after": r["held_out_loss_after"],
                     "seconds": time.perf_counter() - t0})
        print(f"{label:24s} seed {seed}: {r['exact_match_before']:6.1%} -> {r['exact_match_after']:6.1%}  "
              f"({runs[-1]['seconds']:.1f} s)", flush=True)
    return summarise(label, lr, runs)


def run_fusion(base: str, tmp: Path, plan: DemoPlan, seeds: list[int]) -> dict:
    """AdapterFusion (Pfeiffer et al. 2021): per seed, a Houlsby adapter trained on the task and one on another task
    ("max"), then a fusion of the two trained on the task; held-out exact match of the task's member and the fusion."""
    runs = []
    quiet = lambda *_: None  # noqa: E731
    for seed in seeds:
        t0 = time.perf_counter()
        p = dataclasses.replace(plan, seed=seed)
        member = finetune(base, tmp / f"fusion-task-{seed}", p, method={"name": "houlsby"}, lr=3e-2, log=quiet)
        other = finetune(base, tmp / f"fusion-other-{seed}", dataclasses.replace(p, task="max"),
                         method={"name": "houlsby"}, lr=3e-2, log=quiet)
        fused = finetune(base, tmp / f"fusion-{seed}", p, method={"name": "adapter_fusion", "adapters": [
            member["adapter"], other["adapter"]]}, lr=1e-3, log=quiet)
        runs.append({"seed": seed, "before": fused["exact_match_before"], "member": member["exact_match_after"],
                     "other_member_on_its_task": other["exact_match_after"], "fusion": fused["exact_match_after"],
                     "fusion_loss": fused["held_out_loss_after"], "seconds": time.perf_counter() - t0})
        print(f"adapter_fusion seed {seed}: task member {runs[-1]['member']:6.1%}, fusion {runs[-1]['fusion']:6.1%}",
              flush=True)
    return {"method": "adapter_fusion (houlsby members: the task + max)", "lr": 1e-3, "runs": runs,
            "fusion_min": min(r["fusion"] for r in runs), "member_min": min(r["member"] for r in runs),
            "gain_min": round(min(r["fusion"] - r["member"] for r in runs), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds, comma-separated")
    ap.add_argument("--base", default=None, help="an already pretrained demo base (skips pretraining)")
    ap.add_argument("--fusion", action="store_true", help="also the AdapterFusion experiment (run_fusion)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "method_learning.json"))
    a = ap.parse_args()
    plan = QUICK if a.quick else DemoPlan()
    seeds = [int(s) for s in a.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = a.base or pretrain(Path(tmp), plan)
        print(f"pretrained base in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = [run_method(base, Path(tmp), plan, label, seeds) for label in a.methods.split(",") if label]
        fusion = run_fusion(base, Path(tmp), plan, seeds) if a.fusion else None
    print(table(rows))
    if not a.quick:
        res = {"task": plan.task, "steps": plan.lora_steps, "held_out": plan.eval_rows, "seeds": seeds, "rows": rows}
        Path(a.out).write_text(json.dumps({**res, **({"fusion": fusion} if fusion else {})}, indent=2) + "\n")


if __name__ == "__main__":
    main()
