"""Learning checks for the online algorithms on the demo's model, shared by ``benchmarks/algorithm_learning.py``
(which records the figures) and the end-to-end tests (which assert half of each measured gain).

The starting point is what RL fine-tuning starts from in practice: a supervised model that sometimes solves the
task. ``sft_start`` LoRA-tunes the demo base (which copies and sorts but cannot reverse) on string reversal for a
few steps and merges the adapter, giving a policy at roughly a third held-out exact match; each online algorithm
then trains a fresh LoRA on it with an exact-match reward (online DPO adds ``char_accuracy``: with two samples
per prompt, exact match alone ties on most pairs). The RLAIF check trains a judge LM to compare two sort answers in
a rubric-style prompt and measures how often its debiased labels agree with the rule.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from tuneforge.api import train
from tuneforge.config import ModelConfig, load_config
from tuneforge.demo import _accuracy
from tuneforge.methods import load_adapter, merge_methods, read_adapter_config
from tuneforge.models.load import load_model
from tuneforge.tasks import make_examples, preference_pairs, write_jsonl

TASK = "reverse"
LORA = [{"name": "lora", "rank": 8, "alpha": 16}]
SFT_STEPS = 80
# name -> (algorithm config, optimizer steps, prompts per step, learning rate); from a small sweep on this task
ONLINE_SETUPS: dict[str, tuple[dict, int, int, float]] = {
    "grpo": ({"name": "grpo", "num_generations": 8, "max_new_tokens": 8, "beta": 0.04}, 300, 8, 3e-3),
    "ppo": ({"name": "ppo", "max_new_tokens": 8, "ppo_epochs": 2}, 150, 32, 1e-3),
    "rejection_sampling": ({"name": "rejection_sampling", "max_new_tokens": 8, "num_samples": 8, "threshold": 1.0},
                           100, 16, 2e-3),
    "online_dpo": ({"name": "online_dpo", "max_new_tokens": 8,
                    "rewards": [{"name": "exact_match"}, {"name": "char_accuracy", "weight": 0.5}]}, 200, 32, 3e-3),
}
JUDGE_TEMPLATE = "{prompt} A:{a} B:{b} better:"


def _config(model: str, data: Path, out: Path, steps: int, batch: int, lr: float, algorithm: dict | None = None,
            max_len: int = 64) -> dict:
    cfg = {"model": {"path": model}, "data": {"train": str(data), "max_len": max_len}, "method": LORA,
           "train": {"output_dir": str(out), "max_steps": steps, "batch_size": batch, "learning_rate": lr,
                     "warmup_steps": 2, "precision": "fp32", "progress": False, "tensorboard": False,
                     "log_every": max(1, steps // 10)}}
    if algorithm:
        cfg["algorithm"] = algorithm
    return cfg


def accuracy(model_dir: str, adapter: str | None = None, n: int = 200) -> float:
    return _accuracy(model_dir, adapter, make_examples(TASK, n, seed=2))


def sft_start(base: str, out: Path, steps: int = SFT_STEPS) -> str:
    """LoRA SFT on the task for ``steps`` steps, merged into a plain model directory (the RL starting point)."""
    out = Path(out)
    merged = out / "merged"
    if merged.exists():
        return str(merged)
    write_jsonl(make_examples(TASK, 2000, seed=1), out / "train.jsonl")
    saved = train(load_config(_config(base, out / "train.jsonl", out / "run", steps, 32, 2e-3))).saved
    model, tok = load_model(ModelConfig(path=base))
    load_adapter(model, saved)
    merge_methods(model, read_adapter_config(saved))
    model.save_pretrained(merged, safe_serialization=True)
    tok.save_pretrained(merged)
    return str(merged)


def online_run(start: str, out: Path, name: str) -> dict:
    """Train ``name``'s setup from ``start``; held-out exact match after, the run's history and seconds."""
    algorithm, steps, batch, lr = ONLINE_SETUPS[name]
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    write_jsonl(make_examples(TASK, 2000, seed=1), out / "prompts.jsonl")
    t0 = time.perf_counter()
    result = train(load_config(_config(start, out / "prompts.jsonl", out / "run", steps, batch, lr, algorithm)))
    seconds = time.perf_counter() - t0
    return {"algorithm": name, "exact_match_after": accuracy(start, str(result.saved)), "seconds": round(seconds, 1),
            "history": result.result.history}


def _judge_rows(n: int, seed: int, task: str) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for r in preference_pairs(task, n, seed=seed):
        first = rng.random() < 0.5
        a, b = (r["chosen"], r["rejected"]) if first else (r["rejected"], r["chosen"])
        rows.append({"prompt": JUDGE_TEMPLATE.format(prompt=r["prompt"], a=a, b=b), "completion": "A" if first else "B"})
    return rows


def judge_agreement(base: str, out: Path, task: str = "sort", steps: int = 300, n_eval: int = 200) -> dict:
    """Train a judge (LoRA) on rubric-formatted comparisons, then label held-out pairs both ways round; returns the
    share of pairs whose label matches the rule, for the trained and the untrained judge."""
    from tuneforge.algorithms.rlaif import Judge, LMJudge, label_rows

    out = Path(out)
    write_jsonl(_judge_rows(4000, 11, task), out / "judge_train.jsonl")
    saved = train(load_config(_config(base, out / "judge_train.jsonl", out / "judge", steps, 32, 2e-3,
                                      max_len=96))).saved
    held = preference_pairs(task, n_eval, seed=2)
    pairs = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]} for r in held]
    truth = {(r["prompt"], r["chosen"], r["rejected"]) for r in held}

    def agree(adapter):
        rows, _ = label_rows(LMJudge(Judge(model=base, adapter=adapter, template=JUDGE_TEMPLATE)), pairs)
        return sum((r["prompt"], r["chosen"], r["rejected"]) in truth for r in rows) / len(held)

    return {"task": task, "agreement": agree(str(saved)), "untrained_agreement": agree(None), "pairs": len(held)}
