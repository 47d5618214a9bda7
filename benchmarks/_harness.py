"""What the side-by-side benchmarks share: the benchmark model, one subprocess per run under an exclusive lock on a
quiet CPU, step-interval clocks for tuneforge and TRL, and the small measurement helpers.

Timing hygiene (the reference machine has 2 cores; anything else running ruins the figures): every child runs under
``flock /tmp/anchor-bench.lock`` (the lock the anchor benchmarks in ../shared/bench use too); before each one we wait
until the 1-minute load average is below --max-load and the CPU was idle (< --idle busy cores) for --idle-for seconds
in a row (bounded by --max-wait); during the run we measure foreign CPU (system busy CPU minus the child's own) and
repeat a run whose foreign load exceeds --clean cores (up to --retries times), keeping the cleanest. A run that stayed
disturbed is marked ``noisy``. Children inherit the environment unchanged (glibc malloc variables included), so both
sides of a comparison run under the same allocator settings.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOCK_PATH = "/tmp/anchor-bench.lock"
SEED = 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every Llama projection
# the shape of tuneforge's tiny:llama-bench preset (checked against the preset by check_bench_preset)
SHAPE = {"hidden": 512, "intermediate": 1376, "layers": 8, "heads": 8, "kv_heads": 4, "vocab": 32000}


# ------------------------------------------------------------------------------------------------- measurements
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def busy_cpu_s() -> float:
    """Seconds of CPU time the whole machine has spent busy since boot (/proc/stat, all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def step_stats(times: list[float], warmup: int) -> dict:
    t = times[warmup:] if len(times) > warmup else times
    return {"median_step_s": round(statistics.median(t), 4), "mean_step_s": round(statistics.fmean(t), 4),
            "min_step_s": round(min(t), 4), "max_step_s": round(max(t), 4), "timed_steps": len(t)}


def rusage_delta(ru0, ru1) -> dict:
    """User / kernel CPU seconds and minor page faults between two getrusage(RUSAGE_SELF) snapshots."""
    return {"cpu_user_s": round(ru1.ru_utime - ru0.ru_utime, 2), "cpu_sys_s": round(ru1.ru_stime - ru0.ru_stime, 2),
            "minor_faults": ru1.ru_minflt - ru0.ru_minflt}


def median(xs):
    return statistics.median(xs) if xs else None


def cpu_model() -> str:
    """The CPU's model name (results differ between CPUs of one kind: float rounding, bf16/AMX paths)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "cpu": cpu_model()}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "tuneforge"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------------------ the model
def check_bench_preset() -> None:
    """tuneforge's tiny:llama-bench must be the shape the other libraries rebuild from a LlamaConfig."""
    from tuneforge.models.tiny import PRESETS

    p = PRESETS["llama-bench"]
    want = {"hidden": p["hidden_size"], "intermediate": p["intermediate_size"], "layers": p["num_hidden_layers"],
            "heads": p["num_attention_heads"], "kv_heads": p["num_key_value_heads"], "vocab": p["vocab_size"]}
    if want != SHAPE:
        raise SystemExit(f"tiny:llama-bench is {want}, this benchmark expects {SHAPE}")


def llama_model(attn: str = "sdpa"):
    """The benchmark shape from a plain LlamaConfig (what PEFT and TRL users would build)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                      num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                      num_key_value_heads=SHAPE["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    return model


def real_model_dir(name: str) -> str:
    """The Hugging Face folder of a packaged real model (``smollm2``: SmolLM2-135M-Instruct from its GGUF package,
    dequantised once into tuneforge's cache), which every library then loads the same way."""
    from tuneforge.models.gguf import local_folder, packaged_file

    return str(local_folder(packaged_file(name)))


def shape_of(model_dir: str) -> dict:
    """The SHAPE keys of a model folder's config.json (for the FLOP count)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    return {"hidden": c["hidden_size"], "intermediate": c["intermediate_size"], "layers": c["num_hidden_layers"],
            "heads": c["num_attention_heads"], "kv_heads": c.get("num_key_value_heads", c["num_attention_heads"]),
            "vocab": c["vocab_size"]}


def bench_model(model_dir: str | None, attn: str = "sdpa"):
    """The benchmark's model for PEFT and TRL: the tiny shape from a LlamaConfig, or a real model's folder."""
    if not model_dir:
        return llama_model(attn)
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)


WORDS = ("the model reads each record and writes a short answer in the format the user asked for while the "
         "assistant explains why a city name is written in capitals and the year follows the name of the person "
         "who was born there we check every field twice before sending the reply because small errors add up over "
         "many rows of data and a careful summary helps the next reader understand what changed and what stayed "
         "the same").split()  # English words, each one token (with its leading space) in SmolLM2's tokenizer


def matmul_params(shape: dict, rank: int) -> dict:
    """Weights a token meets in matmuls: ``n_mm`` (every projection plus the d x V output head, tied or not) and
    ``n_adapter`` (LoRA of ``rank`` on all seven projections), for the FLOP counts (2 per weight forward)."""
    d, f, L, h, kv, V = (shape[k] for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"))
    kv_dim = d // h * kv
    dims = {"q_proj": (d, d), "k_proj": (d, kv_dim), "v_proj": (d, kv_dim), "o_proj": (d, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}  # (in, out)
    return {"n_mm": L * sum(i * o for i, o in dims.values()) + d * V,
            "n_adapter": L * sum(rank * (i + o) for i, o in dims.values())}


def parse_peak(spec: str | None) -> dict | None:
    """--peak-gflops: 'fp32=200,bf16=848' -> figures, 'skip' -> {}, None -> measure (returns None)."""
    if spec == "skip":
        return {}
    if spec:
        return {k: float(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    return None


def matmul_peak(a, script: str, emit) -> dict:
    """--peak-gflops as given, or the peak measured by ``script --child peak`` (a ``child_peak`` run) on a quiet CPU,
    its record passed to ``emit``."""
    peak = parse_peak(a.peak_gflops)
    if peak is None:
        log("measuring the matmul peak ...")
        pk = run_isolated(a, [sys.executable, os.path.abspath(script), "--child", "peak"], "matmul peak")
        peak = pk["peak_gflops"]
        emit(pk)
    return peak


def load_rows(path: str) -> list[list[int]]:
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------------- clocks
class StepClock:
    """Wall time and this process's rusage at the end of every optimizer step (``tick``)."""

    def __init__(self):
        self.ends: list[float] = []
        self.usage: list = []

    def tick(self) -> None:
        self.ends.append(time.perf_counter())
        self.usage.append(resource.getrusage(resource.RUSAGE_SELF))

    def timed_usage(self, warmup: int) -> dict:
        """rusage_delta over the timed steps only (from the end of the last warm-up step to the end of the run), so
        model building and warm-up do not count; keys get a ``timed_`` prefix."""
        first = max(0, warmup - 1)
        if len(self.usage) < first + 2:
            return {}
        d = rusage_delta(self.usage[first], self.usage[-1])
        return {"timed_" + k: v for k, v in d.items()} | {"timed_usage_steps": len(self.usage) - 1 - first}


def tuneforge_clock() -> tuple[StepClock, dict]:
    """A StepClock ticked once per optimizer step, and the ``hooks`` for ``tuneforge.api.train``.

    The tick comes after clipping, so consecutive ticks are one full step apart (data, forward, backward, optimizer,
    logging). Interval k (ends[k+1] - ends[k]) is the period of step k+2; step 1 has none."""
    clock = StepClock()
    return clock, {"after_clip": lambda loop: clock.tick()}


def tuneforge_intervals(stamps: list[float], warmup: int) -> dict:
    """step_stats of the intervals between ``tuneforge_clock`` ticks, the warm-up steps left out."""
    intervals = [b - c for c, b in zip(stamps[:-1], stamps[1:])]
    return step_stats(intervals, max(0, warmup - 1))


def trl_clock():
    """A transformers TrainerCallback that is a StepClock ticked at every ``on_step_end``."""
    from transformers import TrainerCallback

    class Clock(StepClock, TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            self.tick()

    return Clock()


def trl_intervals(t0: float, ends: list[float], warmup: int) -> dict:
    """step_stats of the step periods from train() start ``t0`` and the ``trl_clock`` ticks."""
    stamps = [t0] + ends
    return step_stats([b - c for c, b in zip(stamps[:-1], stamps[1:])], warmup)


# ------------------------------------------------------------------------------------- isolated, clean child runs
def add_runner_args(p) -> None:
    p.add_argument("--max-load", type=float, default=1.0, help="wait until the 1-min load average is below this")
    p.add_argument("--idle", type=float, default=0.2, help="busy cores below which a second counts as idle")
    p.add_argument("--idle-for", type=float, default=5.0, help="idle seconds in a row before a run starts")
    p.add_argument("--max-wait", type=float, default=600.0, help="give up waiting after this (run is noisy)")
    p.add_argument("--clean", type=float, default=0.1, help="foreign cores above which a run is repeated")
    p.add_argument("--retries", type=int, default=2, help="extra attempts for a disturbed run")


def wait_quiet(a) -> dict:
    """Wait (holding the lock) until loadavg(1 min) < max_load and the CPU stayed idle for idle_for seconds."""
    t0, quiet = time.time(), 0.0
    while True:
        b0 = busy_cpu_s()
        time.sleep(1.0)
        busy = busy_cpu_s() - b0
        load1 = os.getloadavg()[0]
        quiet = quiet + 1.0 if busy < a.idle and load1 < a.max_load else 0.0
        waited = time.time() - t0
        if quiet >= a.idle_for or waited >= a.max_wait:
            return {"waited_s": round(waited, 1), "loadavg_1m_before": round(load1, 2),
                    "busy_cores_before": round(busy, 2), "gave_up_waiting": quiet < a.idle_for}


def run_isolated(a, cmd: list[str], label: str, rate: tuple[str, str, str] | None = None) -> dict:
    """Run ``cmd`` (a child that prints its result as the last JSON line on stdout) under the lock on a quiet CPU,
    repeating it while foreign load disturbs it; returns the cleanest attempt with a ``runner`` record and ``noisy``.

    ``rate`` = (result key, unit, format) of the figure shown in the progress line, e.g. ("pairs_per_s", "pairs/s",
    ".2f")."""
    attempts = []
    with open(LOCK_PATH, "a") as lock:
        for attempt in range(1 + a.retries):
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                env_state = wait_quiet(a)
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                b0, t0 = busy_cpu_s(), time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True)  # inherits os.environ unchanged
                wall, b1 = time.time() - t0, busy_cpu_s()
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            own = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            foreign = max(0.0, (b1 - b0) - own) / max(wall, 1e-9)
            line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
            if proc.returncode != 0 or line is None:
                log(proc.stderr[-4000:])
                raise SystemExit(f"{label.strip()} failed (rc {proc.returncode})")
            res = json.loads(line)
            res["runner"] = {"attempt": attempt + 1, "child_wall_s": round(wall, 1), "foreign_cores_avg":
                             round(foreign, 3), **env_state}
            attempts.append(res)
            shown = (f"{res[rate[0]]:{rate[2]}} {rate[1]}, " if rate and rate[0] in res else "")
            log(f"  {label} attempt {attempt + 1}: {shown}foreign {foreign:.2f} cores, "
                f"waited {env_state['waited_s']} s")
            if foreign <= a.clean and not env_state["gave_up_waiting"]:
                break
            time.sleep(random.uniform(5, 20))
    best = min(attempts, key=lambda r: r["runner"]["foreign_cores_avg"])
    best["runner"]["attempts_foreign_cores"] = [r["runner"]["foreign_cores_avg"] for r in attempts]
    best["noisy"] = best["runner"]["foreign_cores_avg"] > a.clean or best["runner"]["gave_up_waiting"]
    return best


class JsonLines:
    """Print each result as a JSON line on stdout and, with a path, append it to that file too."""

    def __init__(self, path: str | None):
        self.sink = open(path, "w") if path else None

    def __call__(self, obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if self.sink:
            self.sink.write(line + "\n")
            self.sink.flush()

    def close(self) -> None:
        if self.sink:
            self.sink.close()


# ---------------------------------------------------------------------------------------------- the matmul peak
def child_peak(a) -> dict:
    """Best torch.matmul GFLOP/s (C = A @ B, 2 n^3 FLOPs) per dtype over square sizes, best of a few batches."""
    import torch

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in (1024, 2048):
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
            z = torch.empty(n, n, dtype=dt)
            for _ in range(2):
                torch.matmul(x, y, out=z)
            t0 = time.perf_counter()
            torch.matmul(x, y, out=z)
            iters = max(1, int(0.5 / max(time.perf_counter() - t0, 1e-6)))
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(iters):
                    torch.matmul(x, y, out=z)
                best = max(best, 2.0 * n**3 * iters / (time.perf_counter() - t0) / 1e9)
        out[name] = round(best, 1)
    return {"bench": "matmul_peak", "peak_gflops": out, "torch_threads": torch.get_num_threads()}


def locked_json_child(cmd: list[str], max_wait: float, label: dict) -> dict:
    """Run ``cmd`` under the benchmark lock once the machine is quiet; its last stdout line that is a JSON object,
    plus ``waited`` (how the wait went), or ``label`` with the error when it failed."""
    import fcntl
    import subprocess
    from types import SimpleNamespace

    quiet = SimpleNamespace(idle=0.3, max_load=1.0, idle_for=3.0, max_wait=max_wait)
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
        return {**label, "error": proc.stderr.strip().splitlines()[-1:]}
    return {**json.loads(line), "waited": env_state}
