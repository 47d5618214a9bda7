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
from tuneforge.tasks import make_examples, task_mixture, write_jsonl


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and rates of the demo. The defaults were tuned so that pretraining teaches copying and sorting to ~100%
    (what a LoRA on a held-out task builds on: with a half-learnt copy skill, reversal stays out of reach of a
    rank-8 adapter in a few hundred steps) and the whole run stays well under two minutes on 2 CPU cores."""

    preset: str = "llama-demo"
    pretrain_tasks: tuple[str, ...] = ("copy", "sort")
    task: str = "reverse"
    pretrain_rows: int = 40000
    pretrain_steps: int = 300
    pretrain_batch: int = 128
    pretrain_lr: float = 3e-3
    lora_rows: int = 3000
    lora_steps: int = 150
    lora_batch: int = 32
    lora_lr: float = 2e-3
    lora_rank: int = 8
    eval_rows: int = 200
    seed: int = 0  # the fine-tuning run's seed (data order, adapter init, noise); pretraining always uses 0


# Per-method set-ups for the demo task (label -> method config, learning rate), used by
# benchmarks/method_learning.py and the e2e learning test. The rates come from a small sweep on this task: methods
# with few parameters that scale or shift activations (IA3, BitFit) need much larger steps than LoRA.
LEARNING_SETUPS: dict[str, tuple[dict | list, float]] = {
    "full": ({"name": "full"}, 1e-3),
    "freeze (top 2 blocks)": ({"name": "freeze", "top_k": 2}, 1e-2),
    "bitfit (added biases)": ({"name": "bitfit", "add_bias": True}, 1e-1),
    "diff_pruning (5%)": ({"name": "diff_pruning", "density": 0.05, "init_log_alpha": 1.0}, 5e-3),
    "sparse (FISH 5%)": ({"name": "sparse", "density": 0.05, "selection": "gradient"}, 2e-3),
    "lora r8": ({"name": "lora", "rank": 8, "alpha": 16}, 2e-3),
    "dora r8": ({"name": "lora", "rank": 8, "alpha": 16, "dora": True}, 2e-3),
    "qlora r8 (nf4)": ({"name": "qlora", "rank": 8, "alpha": 16}, 2e-3),
    "lokr r8": ({"name": "lokr", "rank": 8, "alpha": 16}, 1e-2),
    "ia3": ({"name": "ia3"}, 3e-1),
    "houlsby (m = d/16)": ({"name": "houlsby"}, 3e-2),
    "pfeiffer (m = d/2)": ({"name": "pfeiffer", "reduction_factor": 2}, 1e-2),
    "parallel (m = d/16; s = 4)": ({"name": "parallel"}, 1e-2),
    "scaled_parallel (m = d/16)": ({"name": "scaled_parallel"}, 1e-2),
    "prompt_tuning (n = 20)": ({"name": "prompt_tuning", "num_virtual_tokens": 20}, 1e-1),
    "p_tuning (MLP; n = 20)": ({"name": "p_tuning", "num_virtual_tokens": 20}, 3e-2),
    "prefix_tuning (n = 20)": ({"name": "prefix_tuning", "num_virtual_tokens": 20}, 1e-1),
    "prefix_tuning (projection; n = 20)": ({"name": "prefix_tuning", "num_virtual_tokens": 20, "projection": True},
                                           1e-2),
    "p_tuning_v2 (n = 20)": ({"name": "p_tuning_v2", "num_virtual_tokens": 20}, 1e-1),
    "compacter (m = d/32)": ({"name": "compacter"}, 1e-1),
    "compacter_pp (m = d/2)": ({"name": "compacter_pp", "reduction_factor": 2}, 1e-1),
    "adapter_bias": ({"name": "adapter_bias"}, 3e-2),
    "houlsby + adapter_drop (robust k <= 2)": ([{"name": "houlsby"},
                                                 {"name": "adapter_drop", "drop_layers": 2, "random": True}], 3e-2),
    "houlsby + adapter_drop (k = 1)": ([{"name": "houlsby"}, {"name": "adapter_drop", "drop_layers": 1}], 3e-2),
    "intrinsic (fastfood d = 10000)": ({"name": "intrinsic", "dimension": 10000}, 3e-1),
    "intrinsic (SAID d = 10000)": ({"name": "intrinsic", "dimension": 10000, "said": True}, 3e-1),
}

QUICK = DemoPlan(pretrain_rows=2000, pretrain_steps=20, pretrain_batch=32, lora_rows=256, lora_steps=20,
                 eval_rows=32)


def _recipe(model: str, data: str, out: Path, method, steps: int, lr: float, batch: int, seed: int = 0) -> dict:
    # fp32: at hidden size 128 the casts of bf16 autocast cost more than its faster matmuls save.
    return {"model": {"path": model}, "data": {"train": data, "max_len": 64}, "method": method,
            "train": {"output_dir": str(out), "max_steps": steps, "batch_size": batch, "learning_rate": lr,
                      "warmup_steps": max(1, steps // 10), "scheduler": "cosine", "min_lr_ratio": 0.1,
                      "log_every": max(1, steps // 10), "seed": seed, "save_every": 0, "precision": "fp32"}}


def _accuracy(model_dir: str, adapter: str | None, examples: list[dict], eval_file: Path | None = None):
    """Held-out exact match; with ``eval_file``, also the held-out answer-token cross entropy (exact match, loss)."""
    whole = adapter is not None and not (Path(adapter) / "adapter_config.json").exists()  # full/freeze runs
    model, tok = load_model(ModelConfig(path=adapter if whole else model_dir))
    if adapter and not whole:
        load_adapter(model, adapter)
    em = exact_match(model, tok, examples, max_new_tokens=12)["exact_match"]
    if eval_file is None:
        return em
    from tuneforge.data import build_dataset
    from tuneforge.data.collate import collate
    from tuneforge.eval.metrics import eval_loss

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    from tuneforge.train.rollout import model_template

    ds = build_dataset(str(eval_file), tok, max_len=64, template=model_template(model))  # a P-tuning template's slots
    loss = eval_loss(model, ds, lambda rows: collate(rows, pad), 64)
    return em, loss["loss"]


def pretrain(out: Path, plan: DemoPlan) -> str:
    """Full fine-tuning of a randomly initialised model on the corpus; returns the saved model directory."""
    init = out / "init"
    save_tiny(plan.preset, init, seed=0)
    data = out / "data" / "pretrain.jsonl"
    write_jsonl(task_mixture(plan.pretrain_rows, seed=0, tasks=list(plan.pretrain_tasks)), data)
    cfg = load_config(_recipe(str(init), str(data), out / "pretrain", "full", plan.pretrain_steps,
                              plan.pretrain_lr, plan.pretrain_batch))
    return str(train(cfg).saved)


def finetune(base: str, out: Path, plan: DemoPlan, method: dict | list | None = None, log=print,
             lr: float | None = None) -> dict:
    """Fine-tune ``base`` on ``plan.task`` with ``method`` (default: the plan's LoRA) through the same ``train``
    entry point a YAML recipe uses; exact match on held-out problems before and after."""
    method = method or {"name": "lora", "rank": plan.lora_rank, "alpha": 2 * plan.lora_rank}
    name = method["name"] if isinstance(method, dict) else "+".join(m["name"] for m in method)
    train_file, eval_file = out / "data" / f"{plan.task}_train.jsonl", out / "data" / f"{plan.task}_eval.jsonl"
    held_out = make_examples(plan.task, plan.eval_rows, seed=2)
    write_jsonl(make_examples(plan.task, plan.lora_rows, seed=1), train_file)
    write_jsonl(held_out, eval_file)
    before, loss_before = _accuracy(base, None, held_out, eval_file)
    log(f"[2/3] exact match on held-out '{plan.task}' before {name}: {before:.1%}; fine-tuning "
        f"({plan.lora_steps} steps)")
    run_dir = out / name
    result = train(load_config(_recipe(base, str(train_file), run_dir, method, plan.lora_steps, lr or plan.lora_lr,
                                       plan.lora_batch, plan.seed)))
    after, loss_after = _accuracy(base, str(result.saved), held_out, eval_file)
    return {"task": plan.task, "method": name, "exact_match_before": before, "exact_match_after": after,
            "held_out_loss_before": round(loss_before, 4), "held_out_loss_after": round(loss_after, 4),
            "held_out_examples": len(held_out), "base_model": base, "adapter": str(result.saved),
            "metrics": str(run_dir / "metrics.jsonl"), "loss_curve": str(run_dir / "loss.png"),
            "tensorboard": str(run_dir / "tensorboard")}


def run_demo(out_dir: str = "runs/demo", quick: bool = False, plan: DemoPlan | None = None) -> dict:
    plan = plan or (QUICK if quick else DemoPlan())
    out = Path(out_dir)
    t0 = time.perf_counter()
    print(f"[1/3] pretraining a {plan.preset} model on {', '.join(plan.pretrain_tasks)} "
          f"({plan.pretrain_steps} steps)", flush=True)
    base = pretrain(out, plan)
    summary = finetune(base, out, plan, log=lambda line: print(line, flush=True))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[3/3] exact match on held-out '{plan.task}': {summary['exact_match_before']:.1%} -> "
          f"{summary['exact_match_after']:.1%} ({summary['held_out_examples']} problems, {summary['seconds']} s)")
    for key in ("base_model", "adapter", "metrics", "loss_curve", "tensorboard"):
        print(f"  {key:12s} {summary[key]}")
    return summary
