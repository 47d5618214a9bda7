"""Per-method step time and peak memory: every tuneforge method against tuneforge's LoRA on the same model and
batch, and against PEFT's implementation where PEFT has the method (LoRA, DoRA, LoKr, IA3, prompt tuning,
P-tuning, prefix tuning; P-tuning v2 against PEFT's prefix tuning without projection, which is what it is).

Model, data and batch are those of ``lora_sft.py`` (tiny Llama hidden 512 x 8 layers, vocab 32000; batch 4 x 256
tokens, every token supervised; fp32; AdamW lr 1e-4). tuneforge runs go through ``tuneforge.api.train`` (the real
loop: clipping, metrics, checkpoint and adapter save); PEFT runs are ``get_peft_model`` + a plain AdamW loop, as in
``lora_sft.py``. Every run is its own subprocess (``peak_rss_mb`` = that child's ru_maxrss) and waits for a quiet
machine under the same lock as ``lora_sft.py``. Step time = median wall time between consecutive optimizer steps
after warm-up.

    python benchmarks/methods_step.py [--methods lora,ia3,...] [--steps 12] [--warmup 3]

Writes ``results/methods_step_cpu.json`` and prints a table with ratios to tuneforge LoRA and to PEFT.

**The ceiling.** The run also measures torch.matmul's fp32 peak (``_harness.child_peak``, under the same lock) and
reports, per run, the GFLOP/s its step reaches on the frozen base's work: 4·N_mm FLOPs per token (each base weight's
forward product and the input-gradient product of the backward; a frozen weight needs no weight gradient) plus
12·L·T·d for attention, N_mm and the shape as in ``lora_sft.py``. A method that trains only a few tensors on a frozen
base cannot do less than that work, so ``peak / anchor GFLOP/s`` is the most any implementation could gain over the
anchor: when an anchor already runs at 80% of the matmul peak, 1.25x is the ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (SEED, SHAPE, TARGETS, child_peak, llama_model, load_rows, locked_json_child,  # noqa: E402
                      matmul_params, peak_rss_mb, step_stats, versions)
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
    # soft prompts, 20 virtual tokens (the anchors' setting in shared/bench/RESULTS.md)
    "prompt_tuning": ([{"name": "prompt_tuning", "num_virtual_tokens": 20}],
                      lambda p: p.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "p_tuning": ([{"name": "p_tuning", "num_virtual_tokens": 20}],
                 lambda p: p.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "prefix_tuning": ([{"name": "prefix_tuning", "num_virtual_tokens": 20}],
                      lambda p: p.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "prefix_projection": ([{"name": "prefix_tuning", "num_virtual_tokens": 20, "projection": True}],
                          lambda p: p.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                         prefix_projection=True, encoder_hidden_size=512)),
    "p_tuning_v2": ([{"name": "p_tuning_v2", "num_virtual_tokens": 20}],
                    lambda p: p.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    # bottleneck adapters (PEFT has none): against AdapterHub's ``adapters`` (ADAPTERHUB below)
    "houlsby": ([{"name": "houlsby"}], None), "pfeiffer": ([{"name": "pfeiffer"}], None),
    "parallel": ([{"name": "parallel"}], None), "scaled_parallel": ([{"name": "scaled_parallel"}], None),
}
# AdapterHub configs of the same adapters (m = d/16 everywhere, tuneforge's defaults): Houlsby = DoubleSeqBn (after
# attention and FFN, swish), Pfeiffer = SeqBn (after the FFN, relu), parallel = ParBn (beside the FFN, s = 4) and
# its learned-scaling form. AdapterHub pins transformers 4.57, so it runs in its own venv (--adapterhub-python).
ADAPTERHUB = {
    "houlsby": lambda A: A.DoubleSeqBnConfig(reduction_factor=16),
    "pfeiffer": lambda A: A.SeqBnConfig(reduction_factor=16),
    "parallel": lambda A: A.ParBnConfig(reduction_factor=16, scaling=4.0),
    "scaled_parallel": lambda A: A.ParBnConfig(reduction_factor=16, scaling="learned"),
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
    return plain_loop(model, a)


def plain_loop(model, a) -> dict:
    """What the anchors' users write: AdamW over the trainable tensors, forward with labels, backward, step."""
    import torch

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


def child_adapterhub(a) -> dict:
    """AdapterHub's own training recipe: ``adapters.init``, ``add_adapter``, ``train_adapter`` (freezes the rest),
    then the same plain AdamW loop as the PEFT child."""
    import adapters
    import torch

    torch.manual_seed(SEED)
    model = llama_model()
    adapters.init(model)
    model.add_adapter("bench", config=ADAPTERHUB[a.method](adapters))
    model.train_adapter("bench")
    return {**plain_loop(model, a),
            "versions": {"adapters": adapters.__version__, "transformers": __import__("transformers").__version__}}


def base_flops_per_step() -> float:
    """The frozen base's FLOPs in one step: (4·N_mm + 12·L·T·d) per token (see the module docstring)."""
    per_token = 4 * matmul_params(SHAPE, 0)["n_mm"] + 12 * SHAPE["layers"] * SEQ * SHAPE["hidden"]
    return float(per_token * BATCH * SEQ)


def spawn(a, lib: str, method: str, paths: dict) -> dict:
    python = a.adapterhub_python if lib == "adapterhub" else sys.executable
    cmd = [python, os.path.abspath(__file__), "--child", lib, "--method", method, "--workdir",
           paths["workdir"], "--jsonl", paths["jsonl"], "--ids", paths["ids"], "--steps", str(a.steps),
           "--warmup", str(a.warmup)]
    return locked_json_child(cmd, a.max_wait, {"lib": lib, "method": method})


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
    ap.add_argument("--adapterhub-python", default=None, help="python of a venv with AdapterHub's adapters "
                    "(python -m venv V && V/bin/pip install torch==2.13.0 adapters); bottleneck runs are compared "
                    "with it when given")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "methods_step_cpu.json"))
    a = ap.parse_args()
    if a.child == "peak":
        print(json.dumps(child_peak(a)), flush=True)
        return
    if a.child:
        res = {"tuneforge": child_tuneforge, "peft": child_peft, "adapterhub": child_adapterhub}[a.child](a)
        res.update(lib=a.child, method=a.method, peak_rss_mb=round(peak_rss_mb(), 1))
        print(json.dumps(res), flush=True)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, ids, _ = make_data(tmp, BATCH * (a.warmup + a.steps + 2))
        paths = {"workdir": tmp, "jsonl": jsonl, "ids": ids}
        peak = spawn(a, "peak", "-", paths)
        runs.append(peak)
        fp32_peak = peak.get("peak_gflops", {}).get("fp32")
        print(f"matmul peak: {peak.get('peak_gflops')}", file=sys.stderr, flush=True)
        for m in a.methods.split(","):
            for lib in ("tuneforge", "peft", "adapterhub"):
                if (lib == "peft" and METHODS[m][1] is None) or (lib == "tuneforge" and METHODS[m][0] is None):
                    continue
                if lib == "adapterhub" and (m not in ADAPTERHUB or not a.adapterhub_python):
                    continue
                r = spawn(a, lib, m, paths)
                runs.append(r)
                print(f"{lib:9s} {m:13s} " + (f"{r['median_step_s']:.3f} s/step, {r['peak_rss_mb']:.0f} MB"
                                                if "error" not in r else f"FAILED {r['error']}"), file=sys.stderr,
                      flush=True)
    flops = base_flops_per_step()
    for r in runs:
        if "median_step_s" in r:
            r["base_gflops"] = round(flops / r["median_step_s"] / 1e9, 1)
            r["fraction_of_peak"] = round(r["base_gflops"] / fp32_peak, 3) if fp32_peak else None
    ok = {(r["lib"], r["method"]): r for r in runs if "error" not in r and "lib" in r}
    ref = ok.get(("tuneforge", "lora"))
    rows = ["| method | trainable | tuneforge s/step | vs tuneforge LoRA | peak RSS MB | anchor | anchor s/step | "
            "tuneforge speed-up vs anchor | anchor peak RSS MB | base GFLOP/s tuneforge / anchor (% of peak) | "
            "ceiling vs anchor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in a.methods.split(","):
        t = ok.get(("tuneforge", m))
        p = ok.get(("peft", m)) or ok.get(("adapterhub", m))
        if t is None:
            continue
        anchor = p["lib"] if p else "–"
        rows.append(f"| {m} | {t['trainable_params']:,} | {t['median_step_s']:.3f} | "
                    + (f"{t['median_step_s'] / ref['median_step_s']:.2f}x" if ref else "–")
                    + f" | {t['peak_rss_mb']:.0f} | {anchor} | "
                    + (f"{p['median_step_s']:.3f} | {p['median_step_s'] / t['median_step_s']:.2f}x | "
                       f"{p['peak_rss_mb']:.0f} |" if p else "– | – | – |")
                    + (f" {t['base_gflops']:.0f} ({t['fraction_of_peak']:.0%}) / {p['base_gflops']:.0f} "
                       f"({p['fraction_of_peak']:.0%}) | {1 / p['fraction_of_peak']:.2f}x |"
                       if p and fp32_peak else " – | – |"))
    print("\n".join(rows))
    with open(a.out, "w") as f:
        json.dump({"versions": versions(), "batch": BATCH, "seq": SEQ, "precision": "fp32", "runs": runs,
                   "matmul_peak_gflops": peak.get("peak_gflops"), "base_flops_per_step": flops, "table": rows},
                  f, indent=2)


if __name__ == "__main__":
    main()
