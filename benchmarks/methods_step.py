"""Per-method step time and peak memory: every tuneforge method against tuneforge's LoRA on the same model and
batch, and against PEFT's implementation where PEFT has the method (LoRA, DoRA, LoKr, IA3).

Model, data and batch are those of ``lora_sft.py`` (tiny Llama hidden 512 x 8 layers, vocab 32000; batch 4 x 256
tokens, every token supervised; fp32; AdamW lr 1e-4). tuneforge runs go through ``tuneforge.api.train`` (the real
loop: clipping, metrics, checkpoint and adapter save); PEFT runs are ``get_peft_model`` + a plain AdamW loop, as in
``lora_sft.py``. Every run is its own subprocess (``peak_rss_mb`` = that child's ru_maxrss) and waits for a quiet
machine under the same lock as ``lora_sft.py``. Step time = median wall time between consecutive optimizer steps
after warm-up.

    python benchmarks/methods_step.py [--methods lora,ia3,...] [--steps 12] [--warmup 3]

Writes ``results/methods_step_cpu.json`` and prints a table with ratios to tuneforge LoRA and to PEFT.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (LOCK_PATH, SEED, TARGETS, llama_model, load_rows, peak_rss_mb, step_stats,  # noqa: E402
                      versions, wait_quiet)
from lora_sft import ALPHA, BATCH, LR, RANK, SEQ, make_data  # noqa: E402

# key -> tuneforge method list (None = no tuneforge run) and PEFT config builder (None = PEFT lacks it)
METHODS = {
    "lora": ([{"name": "lora", "rank": RANK, "alpha": ALPHA, "target_modules": TARGETS}],
             lambda p: p.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS))),
    "dora": ([{"name": "lora", "rank": RANK, "alpha": ALPHA, "target_modules": TARGETS, "dora": True}],
             lambda p: p.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                                    use_dora=True)),
    "lokr": ([{"name": "lokr", "rank": RANK, "alpha": ALPHA, "target_modules": TARGETS}],
             lambda p: p.LoKrConfig(r=RANK, alpha=ALPHA, target_modules=list(TARGETS))),
    "ia3": ([{"name": "ia3"}], lambda p: p.IA3Config()),
    "bitfit": ([{"name": "bitfit", "add_bias": True}], None),
    "sparse": ([{"name": "sparse", "density": 0.005, "selection": "magnitude"}], None),
    "diff_pruning": ([{"name": "diff_pruning", "density": 0.005}], None),
    "freeze": ([{"name": "freeze", "top_k": 2}], None),
    "full": ([{"name": "full"}], None),
    "qlora": ([{"name": "qlora", "rank": RANK, "alpha": ALPHA, "target_modules": TARGETS}],
              lambda p: p.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS))),
}


def bnb_nf4_model(workdir: str):
    """The benchmark model loaded the way PEFT users run QLoRA: transformers + bitsandbytes NF4 with double
    quantisation (the head stays in float, as in tuneforge)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = os.path.join(workdir, "bnb-base")
    if not os.path.exists(path):
        llama_model().save_pretrained(path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"])
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32, device_map="cpu")


def child_tuneforge(a) -> dict:
    from tuneforge.api import train
    from tuneforge.config import load_config

    cfg = load_config({
        "model": {"path": "tiny:llama-bench", "dtype": "float32"},
        "data": {"train": a.jsonl, "format": "text", "max_len": SEQ, "truncation": "error"},
        "method": METHODS[a.method][0],
        "train": {"output_dir": os.path.join(a.workdir, f"tf-{a.method}-{os.getpid()}"), "seed": SEED,
                  "max_steps": a.warmup + a.steps, "batch_size": BATCH, "learning_rate": LR, "weight_decay": 0.0,
                  "scheduler": "constant", "precision": "fp32", "progress": False, "tensorboard": False,
                  "log_every": 10**6},
    })
    stamps: list[float] = []
    with contextlib.redirect_stdout(sys.stderr):
        out = train(cfg, hooks={"after_clip": lambda loop: stamps.append(time.perf_counter())})
    intervals = [b - c for c, b in zip(stamps[:-1], stamps[1:])]
    import json as _j
    trainable = _j.loads(open(os.path.join(out.out_dir, "run.json")).read())["trainable_params"]
    return {**step_stats(intervals, max(0, a.warmup - 1)), "trainable_params": trainable,
            "losses": [h["loss"] for h in out.result.history]}


def child_peft(a) -> dict:
    import peft
    import torch

    torch.manual_seed(SEED)
    base = bnb_nf4_model(a.workdir) if a.method == "qlora" else llama_model()
    model = peft.get_peft_model(base, METHODS[a.method][1](peft))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    rows = load_rows(a.ids)
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        ids = torch.tensor(rows[step * BATCH:(step + 1) * BATCH], dtype=torch.long)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return {**step_stats(times, a.warmup), "trainable_params": sum(p.numel() for p in params), "losses": losses}


def spawn(a, lib: str, method: str, paths: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib, "--method", method, "--workdir",
           paths["workdir"], "--jsonl", paths["jsonl"], "--ids", paths["ids"], "--steps", str(a.steps),
           "--warmup", str(a.warmup)]
    quiet = SimpleNamespace(idle=0.3, max_load=1.0, idle_for=3.0, max_wait=a.max_wait)
    with open(LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            env_state = wait_quiet(quiet)
            proc = subprocess.run(cmd, capture_output=True, text=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"lib": lib, "method": method, "error": proc.stderr.strip().splitlines()[-1:]}
    return {**json.loads(line), "waited": env_state}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workdir")
    ap.add_argument("--jsonl")
    ap.add_argument("--ids")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-wait", type=float, default=120)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "methods_step_cpu.json"))
    a = ap.parse_args()
    if a.child:
        res = {"tuneforge": child_tuneforge, "peft": child_peft}[a.child](a)
        res.update(lib=a.child, method=a.method, peak_rss_mb=round(peak_rss_mb(), 1))
        print(json.dumps(res), flush=True)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, ids, _ = make_data(tmp, BATCH * (a.warmup + a.steps + 2))
        paths = {"workdir": tmp, "jsonl": jsonl, "ids": ids}
        for m in a.methods.split(","):
            for lib in ("tuneforge", "peft"):
                if (lib == "peft" and METHODS[m][1] is None) or (lib == "tuneforge" and METHODS[m][0] is None):
                    continue
                r = spawn(a, lib, m, paths)
                runs.append(r)
                print(f"{lib:9s} {m:13s} " + (f"{r['median_step_s']:.3f} s/step, {r['peak_rss_mb']:.0f} MB"
                                                if "error" not in r else f"FAILED {r['error']}"), file=sys.stderr,
                      flush=True)
    ok = {(r["lib"], r["method"]): r for r in runs if "error" not in r}
    ref = ok.get(("tuneforge", "lora"))
    rows = ["| method | trainable | tuneforge s/step | vs tuneforge LoRA | peak RSS MB | PEFT s/step | "
            "tuneforge speed-up vs PEFT | PEFT peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for m in a.methods.split(","):
        t, p = ok.get(("tuneforge", m)), ok.get(("peft", m))
        if t is None:
            continue
        rows.append(f"| {m} | {t['trainable_params']:,} | {t['median_step_s']:.3f} | "
                    f"{t['median_step_s'] / ref['median_step_s']:.2f}x | {t['peak_rss_mb']:.0f} | "
                    + (f"{p['median_step_s']:.3f} | {p['median_step_s'] / t['median_step_s']:.2f}x | "
                       f"{p['peak_rss_mb']:.0f} |" if p else "– | – | – |") if ref else "")
    print("\n".join(rows))
    with open(a.out, "w") as f:
        json.dump({"versions": versions(), "batch": BATCH, "seq": SEQ, "precision": "fp32", "runs": runs,
                   "table": rows}, f, indent=2)


if __name__ == "__main__":
    main()
