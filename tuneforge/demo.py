"""``tuneforge demo``: the whole pipeline on a model small enough for a laptop CPU, with no download.

1. Build a small Llama-architecture model and a character tokenizer in code.
2. "Pretrain" it (full fine-tuning) on a generated corpus of some tasks, and save it as a real Hugging Face model
   directory: from here on it is loaded like any local checkpoint a user would bring.
3. Measure exact match on held-out problems of a task it never saw, LoRA-fine-tune on that task through the same
   ``train`` entry point a YAML recipe uses, and measure again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.api import train
from tuneforge.config import ModelConfig, load_config
from tuneforge.eval.metrics import exact_match
from tuneforge.methods import load_adapter
from tuneforge.models.load import load_model
from tuneforge.models.tiny import save_tiny
from tuneforge.tasks import make_examples, pretraining_corpus, write_jsonl


@dataclass(frozen=True)
class DemoPlan:
    preset: str = "llama-demo"
    pretrain_tasks: tuple[str, ...] = ("copy", "sort", "add")
    task: str = "reverse"
    pretrain_rows: int = 20000
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    lora_rows: int = 3000
    lora_steps: int = 250
    lora_lr: float = 3e-3
    lora_rank: int = 16
    eval_rows: int = 200
    batch_size: int = 32


QUICK = DemoPlan(pretrain_rows=2000, pretrain_steps=30, lora_rows=256, lora_steps=20, eval_rows=32)


def _recipe(model: str, data: str, out: Path, method, steps: int, lr: float, plan: DemoPlan) -> dict:
    return {"model": {"path": model}, "data": {"train": data, "max_len": 64}, "method": method,
            "train": {"output_dir": str(out), "max_steps": steps, "batch_size": plan.batch_size,
                      "learning_rate": lr, "warmup_steps": max(1, steps // 20), "scheduler": "cosine",
                      "log_every": max(1, steps // 10), "seed": 0, "save_every": 0}}


def _accuracy(model_dir: str, adapter: str | None, examples: list[dict]) -> float:
    model, tok = load_model(ModelConfig(path=model_dir))
    if adapter:
        load_adapter(model, adapter)
    return exact_match(model, tok, examples, max_new_tokens=12)["exact_match"]


def pretrain(out: Path, plan: DemoPlan) -> str:
    """Full fine-tuning of a randomly initialised model on the corpus; returns the saved model directory."""
    init = out / "init"
    save_tiny(plan.preset, init, seed=0)
    data = out / "data" / "pretrain.jsonl"
    write_jsonl(pretraining_corpus(plan.pretrain_rows, seed=0, tasks=list(plan.pretrain_tasks)), data)
    cfg = load_config(_recipe(str(init), str(data), out / "pretrain", "full", plan.pretrain_steps,
                              plan.pretrain_lr, plan))
    return str(train(cfg).saved)


def run_demo(out_dir: str = "runs/demo", quick: bool = False, plan: DemoPlan | None = None) -> dict:
    plan = plan or (QUICK if quick else DemoPlan())
    out = Path(out_dir)
    t0 = time.perf_counter()
    print(f"[1/3] pretraining a {plan.preset} model on {', '.join(plan.pretrain_tasks)} "
          f"({plan.pretrain_steps} steps)", flush=True)
    base = pretrain(out, plan)
    train_rows = make_examples(plan.task, plan.lora_rows, seed=1)
    held_out = make_examples(plan.task, plan.eval_rows, seed=2)
    write_jsonl(train_rows, out / "data" / f"{plan.task}_train.jsonl")
    write_jsonl(held_out, out / "data" / f"{plan.task}_eval.jsonl")
    before = _accuracy(base, None, held_out)
    print(f"[2/3] exact match on held-out '{plan.task}' before LoRA: {before:.1%}; LoRA fine-tuning "
          f"({plan.lora_steps} steps)", flush=True)
    method = {"name": "lora", "rank": plan.lora_rank, "alpha": 2 * plan.lora_rank}
    cfg = load_config(_recipe(base, str(out / "data" / f"{plan.task}_train.jsonl"), out / "lora", method,
                              plan.lora_steps, plan.lora_lr, plan))
    result = train(cfg)
    after = _accuracy(base, str(result.saved), held_out)
    summary = {"task": plan.task, "exact_match_before": before, "exact_match_after": after,
               "held_out_examples": len(held_out), "base_model": base, "adapter": str(result.saved),
               "metrics": str(out / "lora" / "metrics.jsonl"), "loss_curve": str(out / "lora" / "loss.png"),
               "tensorboard": str(out / "lora" / "tensorboard"), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[3/3] exact match on held-out '{plan.task}': {before:.1%} -> {after:.1%} "
          f"({len(held_out)} problems, {summary['seconds']} s)")
    for key in ("base_model", "adapter", "metrics", "loss_curve", "tensorboard"):
        print(f"  {key:12s} {summary[key]}")
    return summary
