"""AdapterDrop's saved compute, measured (Rücklé et al. 2021, https://arxiv.org/abs/2010.11918, sec. 3-4).

Two figures on a real model (SmolLM2-135M-Instruct, 30 blocks; ``--model tiny`` for the bench shape), each against
the same adapters without AdapterDrop, in one process on a quiet machine (the harness's lock and idle wait):

* **training step** (forward + backward + AdamW step; batch 4 x 128 tokens): Houlsby adapters in every block, then
  with ``adapter_drop`` k = 5 and k = 15 — the backward stops at block k, so the saving grows with k;
* **inference over 8 tasks at once** (one batch of 8 x 128 tokens, 8 Houlsby adapters): 8 forwards, one per task
  (the plain way), one forward with the batch repeated per task and per-example adapters (tuneforge's mixed
  batch), and ``adapter_drop.parallel_tasks`` with the lowest 5 blocks shared (the paper's set-up: 39% faster
  for 8 tasks with 5 of 12 BERT-base blocks dropped).

Step and forward times are medians after warm-up; ``peak_rss_mb`` is the process's high-water mark (one process
runs everything, so only the time ratios compare). The CPU model and the matmul peak go in the result.

    python benchmarks/adapter_drop.py [--model smollm2|tiny] [--dtype float32|bfloat16] [--steps 6] [--reps 3]

Writes ``results/adapter_drop_<model>_<dtype>.json``.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (LOCK_PATH, add_runner_args, cpu_model, llama_model, peak_rss_mb, real_model_dir,  # noqa: E402
                      versions, wait_quiet)


def _model(name: str, dtype):
    from transformers import AutoModelForCausalLM

    if name == "tiny":
        return llama_model().to(dtype)
    return AutoModelForCausalLM.from_pretrained(real_model_dir(name), dtype=dtype, attn_implementation="sdpa")


def _perturb(model, seed: int):
    import torch

    from tuneforge.methods._inject import trainable_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01)


def train_steps(base, dtype, drop: int, steps: int, seq: int, batch: int) -> list[float]:
    import torch

    from tuneforge.methods import METHODS, apply_methods
    from tuneforge.methods._inject import trainable_parameters

    model = copy.deepcopy(base)
    cfgs = [METHODS["houlsby"].Config()] + ([METHODS["adapter_drop"].Config(drop_layers=drop)] if drop else [])
    apply_methods(model, cfgs)
    model.train()
    opt = torch.optim.AdamW(list(trainable_parameters(model).values()), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (batch, seq), generator=g)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def eight_tasks(base, tasks: int, shared: int, reps: int, seq: int) -> dict[str, list[float]]:
    import torch

    from tuneforge.methods import METHODS, adapter_drop, adapter_scope, apply_methods

    model = copy.deepcopy(base)
    names = [f"task{i}" for i in range(tasks)]
    for name in names:  # robust AdapterDrop: every block keeps its adapter, inference picks k
        apply_methods(model, [METHODS["houlsby"].Config(), METHODS["adapter_drop"].Config(
            drop_layers=shared, random=True, inference_drop_layers=0)], adapter=name)
    _perturb(model, 1)
    model.eval()
    ids = torch.randint(100, model.config.vocab_size, (tasks, seq), generator=torch.Generator().manual_seed(1))
    layers = [m for m in model.modules() if hasattr(m, "drop_below")]

    def set_k(k):
        for layer in layers:
            for ks in layer.drop_below.values():
                ks["eval"] = k

    out = {"one_forward_per_task": [], "mixed_batch": [], "one_forward_per_task_k": [], "parallel_tasks_k": []}

    def per_task():
        for name in names:
            with adapter_scope(model, name):
                model(input_ids=ids, use_cache=False)

    def mixed():
        with adapter_scope(model, [n for n in names for _ in range(tasks)]):
            model(input_ids=ids.repeat(tasks, 1), use_cache=False)

    runs = [("one_forward_per_task", 0, per_task), ("mixed_batch", 0, mixed), ("one_forward_per_task_k", shared,
            per_task), ("parallel_tasks_k", shared, lambda: adapter_drop.parallel_tasks(model, ids, names, shared))]
    with torch.no_grad():
        for _ in range(reps + 1):  # the first round warms up
            for key, k, fn in runs:
                set_k(k)
                t0 = time.perf_counter()
                fn()
                out[key].append(time.perf_counter() - t0)
    return {k: v[1:] for k, v in out.items()}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=None)
    add_runner_args(ap)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, a.dtype)
    base = _model(a.model, torch.float32)  # adapters train in fp32; bf16 runs under autocast
    with open(LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        quiet = wait_quiet(a)
        train = {}
        n = base.config.num_hidden_layers
        ks = (0, 5, 15) if n > 15 else (0, 2, n // 2)  # the tiny shape has 8 blocks
        for k in ks:
            t = train_steps(base, dtype, k, a.steps + a.warmup, a.seq, 4)[a.warmup:]
            train[f"k={k}"] = round(statistics.median(t), 4)
            print(f"train step, houlsby, adapter_drop k={k}: {train[f'k={k}']:.3f} s", flush=True)
        if dtype == torch.bfloat16:
            base = base.to(torch.bfloat16)
        shared = 5 if n > 15 else 2
        infer = {k: round(statistics.median(v), 4) for k, v in eight_tasks(base, 8, shared, a.reps, a.seq).items()}
        fcntl.flock(lock, fcntl.LOCK_UN)
    for k, v in infer.items():
        print(f"8 tasks, {k}: {v:.3f} s", flush=True)
    ratios = {f"train_speedup_k{k}": round(train["k=0"] / train[f"k={k}"], 3) for k in ks[1:]}
    ratios.update({
              "infer_speedup_parallel_vs_per_task": round(infer["one_forward_per_task"] / infer["parallel_tasks_k"],
                                                          3),
              "infer_speedup_parallel_vs_mixed_batch": round(infer["mixed_batch"] / infer["parallel_tasks_k"], 3),
              "infer_speedup_per_task_k_vs_per_task": round(infer["one_forward_per_task"]
                                                            / infer["one_forward_per_task_k"], 3)})
    print(json.dumps(ratios, indent=1))
    res = {"model": a.model, "dtype": a.dtype, "blocks": base.config.num_hidden_layers, "seq": a.seq,
           "train_batch": 4, "tasks": 8, "shared_layers": shared, "train_step_s": train, "eight_task_forward_s": infer,
           "ratios": ratios, "peak_rss_mb": round(peak_rss_mb(), 1), "cpu": cpu_model(), "versions": versions(),
           "runner": quiet}
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"adapter_drop_{a.model}_{a.dtype}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
