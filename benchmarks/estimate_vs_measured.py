"""``tuneforge estimate`` (detailed mode) against the peak memory of real tuneforge training runs on this CPU.

Each configuration (model x method x batch x seq) trains for a few steps, fp32, through ``tuneforge.api.train`` --
the real loop: data pipeline, chunked head, AdamW, clipping -- in a fresh subprocess, which measures:

    baseline  VmRSS after importing everything *and* a 2-step warm-up run on ``tiny:llama`` (so the code pages of
              the kernels, the thread pools and the allocator arenas are already resident), then gc + malloc_trim;
    peak      VmHWM, reset (``echo 5 > /proc/self/clear_refs``) when ``Loop.run`` starts and read when the loop
              calls ``Loop.save`` for the final checkpoint, i.e. the highest resident set over every step's forward,
              backward and optimizer update (step 2 onwards runs with the AdamW moments allocated);
    measured  peak - baseline: the model, its adapters, gradients, optimizer state, activations and temporaries --
              what the estimate claims to count (tokenizer, data and Python objects are in it too; they are small).

RSS is what the operating system gives the process, so it also holds glibc's cached free blocks; torch's CPU
allocator has no cache of its own, so there is no "reserved vs allocated" gap as on a GPU. The estimate is called
with ``device="cpu"`` (AdamW's per-tensor temporaries) and nothing is tuned per case. Tiny presets come from
``tuneforge.models.tiny``; the two larger Llamas are registered as extra presets in the child only.

    python benchmarks/estimate_vs_measured.py                   # every case, writes results/estimate_vs_measured.json
    python benchmarks/estimate_vs_measured.py --only bench-lora-b4-t256 --steps 3
    python benchmarks/estimate_vs_measured.py --rescore   # re-run only the estimates against the stored measurements
                                                          # (and measure only cases not stored yet)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRA_PRESETS = {  # Llama shapes registered in the child (tiny.PRESETS is a plain dict)
    "est-110m": {"model_type": "llama", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "num_key_value_heads": 4, "intermediate_size": 2048, "max_position_embeddings": 4096,
                 "vocab_size": 32000, "tie_word_embeddings": False},
}
# glibc malloc: "pinned" fixes the mmap threshold at its initial 128 KiB (setting it turns off glibc's dynamic
# raising of it), so every tensor over 128 KiB is its own mapping, returned to the kernel when freed; "default" lets
# glibc raise the threshold up to 32 MiB after such frees and keep freed blocks in its heap for reuse.
MALLOC = {"pinned": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "default": {}}
# name: (preset, method config or list of them, batch, seq)
LORA = {"name": "lora", "rank": 16, "alpha": 32, "dropout": 0.0}
# AdapterFusion's members come as configs (``members``): fresh adapters, which is all memory depends on
FUSION = {"name": "adapter_fusion", "adapters": ["member0", "member1", "member2"],
          "members": [{"name": "pfeiffer"}] * 3}
CASES = {
    "demo-full-b8-t512": ("llama-demo", {"name": "full"}, 8, 512),
    "demo-lora-b8-t512": ("llama-demo", LORA, 8, 512),
    "bench-full-b4-t256": ("llama-bench", {"name": "full"}, 4, 256),
    "bench-lora-b4-t256": ("llama-bench", LORA, 4, 256),
    "bench-lora-b2-t1024": ("llama-bench", LORA, 2, 1024),
    "bench-freeze2-b4-t512": ("llama-bench", {"name": "freeze", "top_k": 2}, 4, 512),
    "110m-full-b2-t256": ("est-110m", {"name": "full"}, 2, 256),
    "110m-lora-b4-t512": ("est-110m", LORA, 4, 512),
    "demo-intrinsic-b8-t512": ("llama-demo", {"name": "intrinsic", "dimension": 1000}, 8, 512),
    "demo-adapterdrop2-b8-t512": ("llama-demo", [{"name": "houlsby"}, {"name": "adapter_drop", "drop_layers": 2}], 8,
                                  512),
    "demo-fusion3-b8-t512": ("llama-demo", FUSION, 8, 512),
    "demo-unipelt-b8-t500": ("llama-demo", {"name": "unipelt"}, 8, 500),  # + 10 prefix positions <= 512
}


def last_method(method) -> dict:
    """The method a case is named by (a list ends with it: [houlsby, adapter_drop])."""
    return method[-1] if isinstance(method, list) else method


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def write_rows(path: str, seq: int, n: int, seed: int = 0) -> None:
    """Rows of seq-2 printable characters: exactly ``seq`` tokens with <s> and </s> under the char tokenizer."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(33, 127)]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(seq - 2))}) + "\n")


def warmup_method(method):
    """The case's method as the 2-block warm-up model takes it (freeze as full; AdapterDrop dropping 1 block)."""
    if last_method(method)["name"] == "freeze":
        return {"name": "full"}
    if last_method(method)["name"] == "adapter_drop":
        return [*method[:-1], {**method[-1], "drop_layers": 1}]
    return method


def run_config(preset: str, method: dict, batch: int, seq: int, steps: int, workdir: str, tag: str):
    from tuneforge.config import load_config

    data = os.path.join(workdir, f"{tag}.jsonl")
    write_rows(data, seq, batch * steps)
    return load_config({
        "model": {"path": f"tiny:{preset}", "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"train": data, "format": "text", "max_len": seq, "truncation": "error"},
        "method": method if isinstance(method, list) else [method], "algorithm": {"name": "sft"},
        "train": {"output_dir": os.path.join(workdir, tag), "seed": 0, "max_steps": steps, "batch_size": batch,
                  "learning_rate": 1e-4, "weight_decay": 0.0, "scheduler": "constant", "precision": "fp32",
                  "progress": False, "tensorboard": False, "log_every": 10**6, "save_every": 0},
    })


def child(a) -> dict:
    import torch

    from tuneforge import api
    from tuneforge.models import tiny
    from tuneforge.train.loop import Loop

    torch.set_num_threads(2)
    tiny.PRESETS.update(EXTRA_PRESETS)
    preset, method, batch, seq = CASES[a.child]
    with tempfile.TemporaryDirectory() as wd, contextlib.redirect_stdout(sys.stderr):
        api.train(run_config("llama", warmup_method(method), 2, 32, 2, wd, "warmup"))
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        baseline = status_kib("VmRSS")
        marks: dict = {}
        run, save = Loop.run, Loop.save

        def run_marked(self, *args, **kw):
            marks["loop_start"] = status_kib("VmRSS")
            marks["params"] = {"trainable": sum(p.numel() for p in self.params.values()),
                               "total": sum(p.numel() for p in self.model.parameters())}
            reset_peak()
            return run(self, *args, **kw)

        def save_marked(self):
            marks.setdefault("peak", status_kib("VmHWM"))
            return save(self)

        Loop.run, Loop.save = run_marked, save_marked
        t0 = time.perf_counter()
        api.train(run_config(preset, method, batch, seq, a.steps, wd, "run"))
        wall = time.perf_counter() - t0
    return {"case": a.child, "preset": preset, "method": method, "batch": batch, "seq": seq, "steps": a.steps,
            "baseline_rss_mib": round(baseline / 1024, 1),
            "loop_start_mib": round((marks["loop_start"] - baseline) / 1024, 1),
            "measured_mib": round((marks["peak"] - baseline) / 1024, 1), "params": marks["params"],
            "wall_s": round(wall, 1), "torch": torch.__version__}


def estimate_for(case: str) -> dict:
    from tuneforge.estimate import Arch, arch_from_config, estimate

    preset, method, batch, seq = CASES[case]
    spec = dict(EXTRA_PRESETS[preset]) if preset in EXTRA_PRESETS else None
    if spec is not None:
        from transformers import AutoConfig

        arch: Arch | str = arch_from_config(AutoConfig.for_model(spec.pop("model_type"), **spec), preset)
    else:
        arch = f"tiny:{preset}"
    last = last_method(method)
    e = estimate(arch, method=last["name"], bits=32, batch=batch, seq=seq, optimizer="adamw", device="cpu",
                 **method_options(method))
    return e.to_dict()


# a method config's field -> the ``estimate`` option it is (only those a config sets are passed: ``estimate``
# refuses the options of another method)
EST_OPTIONS = {"rank": "rank", "top_k": "top_k", "dimension": "intrinsic_dim", "drop_layers": "drop_layers",
               "num_virtual_tokens": "virtual_tokens", "bottleneck": "bottleneck", "gate": "gate"}


def method_options(method) -> dict:
    """``estimate``'s options for a case's method config(s)."""
    last = last_method(method)
    opts = {EST_OPTIONS[k]: v for k, v in last.items() if k in EST_OPTIONS}
    if last["name"] == "adapter_drop":
        opts["adapter_method"] = method[0]["name"]
    if last["name"] == "adapter_fusion":
        opts.update(fusion_adapters=len(last["adapters"]), adapter_method=last["members"][0]["name"])
    return opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json-out", default=os.path.join(HERE, "results", "estimate_vs_measured.json"))
    ap.add_argument("--rescore", action="store_true", help="keep the measurements in --json-out, redo the estimates "
                    "(cases not stored yet are measured; with --only, the other stored rows are kept)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return
    cases = [c for c in (a.only.split(",") if a.only else CASES)]
    stored = {}
    if a.rescore:
        with open(a.json_out) as f:
            stored = {r["case"]: r for r in json.load(f)["rows"]}
    rows = []
    for case in cases:
        keep = ("measured_", "baseline", "loop_", "params", "wall", "torch", "case", "preset", "method", "batch", "seq",
                "steps")
        res = {k: v for k, v in stored.get(case, {}).items() if k.startswith(keep)}
        for malloc, env in ({} if res else MALLOC).items():
            print(f"running {case} ({malloc} malloc) ...", file=sys.stderr, flush=True)
            p = subprocess.run([sys.executable, __file__, "--child", case, "--steps", str(a.steps)],
                               capture_output=True, text=True, env={**os.environ, **env}, check=False)
            if p.returncode != 0:
                sys.exit(f"{case} failed:\n{p.stderr[-4000:]}")
            one = json.loads(p.stdout.strip().splitlines()[-1])
            res = {**one, **res, f"measured_{malloc}_mib": one.pop("measured_mib")}
        est = estimate_for(case)
        added = est["adapter"] // 4  # adapter tensors (fp32) are new parameters, fusion members frozen ones
        if (est["params_trainable"], est["params_total"] + added) != (res["params"]["trainable"],
                                                                     res["params"]["total"]):
            sys.exit(f"{case}: the estimator counts {est['params_trainable']}/{est['params_total'] + added} "
                     f"parameters, the model has {res['params']}")
        res["estimate_mib"] = round(est["training"] / 2**20, 1)
        res["estimate_parts_mib"] = {k: round(est[k] / 2**20, 1) for k in
                                     ("weights", "adapter", "projection", "gradients", "optimizer_state",
                                      "activations", "workspace")}
        for malloc in MALLOC:
            got = res[f"measured_{malloc}_mib"]
            res[f"error_{malloc}_pct"] = round(100 * (res["estimate_mib"] - got) / got, 1)
        rows.append(res)
        print(json.dumps(res), flush=True)
    print("\n| case | params (trainable) | estimate | measured (pinned) | error | measured (glibc default) | error |"
          "\n|---|---:|---:|---:|---:|---:|---:|")
    if a.rescore and a.only:  # the stored rows, with the ones just scored replaced or added, in CASES order
        done = {r["case"]: r for r in rows}
        rows = [done.get(c) or stored[c] for c in CASES if c in done or c in stored]
    for r in rows:
        print(f"| {r['case']} | {r['params']['total'] / 1e6:.1f}M ({r['params']['trainable'] / 1e6:.2f}M) | "
              f"{r['estimate_mib']:.0f} MiB | {r['measured_pinned_mib']:.0f} MiB | {r['error_pinned_pct']:+.1f}% | "
              f"{r['measured_default_mib']:.0f} MiB | {r['error_default_pct']:+.1f}% |")
    if a.json_out and (a.rescore or not a.only):
        import transformers

        os.makedirs(os.path.dirname(a.json_out), exist_ok=True)
        with open(a.json_out, "w") as f:
            json.dump({"setup": "fp32, CPU, 2 threads, 3 steps, tuneforge.api.train; measured = VmHWM over the "
                                "training loop - VmRSS after imports and a warm-up run (see the module docstring); "
                                "pinned = MALLOC_MMAP_THRESHOLD_=131072, default = glibc's own policy",
                       "versions": {"python": sys.version.split()[0], "torch": rows[0]["torch"],
                                    "transformers": transformers.__version__},
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
