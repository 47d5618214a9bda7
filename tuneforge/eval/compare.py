"""``tuneforge compare``: one recipe (data, model, step budget, seed) trained with each of several methods, scored on
the same held-out file, and reported side by side (``compare/``: JSON, Markdown, charts, one HTML page).

Why each run is a child process (``eval/compare_run.py``): the peak resident memory of a process only grows, and
allocator caches, imported kernels and the previous model's pages would otherwise charge one method for another's
memory. A child per run (per method's sweep, for ``--lr auto``) measures each run alone, and a crash or an
out-of-memory kill fails that method only.

Why a per-method learning-rate sweep (``--lr auto``): methods want rates orders of magnitude apart (full fine-tuning
~1e-5..1e-4, LoRA and adapters ~1e-3..1e-2, soft prompts ~1e-2..1e-1), so one shared rate compares one method at
its best with another far from it. The sweep tries ``SWEEP_FACTORS`` around the method's default in ``DEFAULT_LR``
for a quarter of the budget each, and while the best is the grid's highest or lowest rate, up to ``SWEEP_EXTEND``
more rates past it; it keeps the best by the held-out metric (ties: lower held-out loss), then trains the full
budget at that rate. It chooses on the file it reports, so every figure is a best case, equally for all.

Resuming: each run writes ``compare_result.json`` last, holding its config hash; a run whose result exists with the
same hash and metric is reused, an interrupted one resumes from its latest checkpoint (``train.save_every``), and a
folder holding another configuration's run is cleared first.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from tuneforge.config import ConfigError, RunConfig
from tuneforge.eval.runs import METRICS, better, pick_metric, variant

RESULT_FILE = "compare_result.json"
REPORT_DIR = "compare"
SWEEP_FACTORS = (10 ** -0.5, 1.0, 10 ** 0.5)  # three rates, x sqrt(10) apart: a decade and a bit
SWEEP_FRACTION = 4  # each sweep run trains 1/4 of the budget
SWEEP_EXTEND = 2  # at most this many rates past the grid's end, while the best sits there
FALLBACK_LR = 1e-3
# A method's usual learning rate with AdamW: the middle of its sweep.
DEFAULT_LR: dict[str, float] = {
    "full": 3e-5, "freeze": 3e-5, "diff_pruning": 1e-4, "sparse": 1e-4,
    "lora": 3e-3, "qlora": 3e-3, "lokr": 3e-3, "ia3": 3e-3, "bitfit": 3e-3, "unipelt": 3e-3,
    "houlsby": 3e-3, "pfeiffer": 3e-3, "parallel": 3e-3, "scaled_parallel": 3e-3, "compacter": 3e-3,
    "compacter_pp": 3e-3, "adapter_bias": 3e-3, "adapter_drop": 3e-3, "adapter_fusion": 3e-3,
    "prompt_tuning": 3e-2, "prefix_tuning": 3e-2, "p_tuning": 3e-2, "p_tuning_v2": 3e-2,
    "intrinsic": 1e-1,
}


class CompareError(ValueError):
    """A bad ``compare`` argument; the message is one line naming the method or option."""


@dataclass
class Entry:
    label: str  # as the user wrote it (or chose it: label=spec)
    methods: list[dict]  # the method list of the run, each validated by its method's Config
    folder: str  # the runs' folder under the output directory


# --------------------------------------------------------------------------------------------- --methods parsing
def split_top(text: str, sep: str) -> list[str]:
    """Split ``text`` on ``sep`` outside brackets, braces and quotes (``lora:target_modules=[q,v],ia3``)."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


_LABEL = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")  # label=spec; a spec's own "=" comes after a ':'


def _options(label: str, name: str, text: str) -> dict:
    """``rank=4:alpha=8`` or a YAML flow mapping ``{rank: 4, alpha: 8}``; values are parsed as YAML."""
    if text.startswith("{"):
        try:
            opts = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CompareError(f"--methods {label!r}: {name} options {text!r} are not a YAML mapping "
                               f"({getattr(e, 'problem', e)})") from None
        if not isinstance(opts, dict):
            raise CompareError(f"--methods {label!r}: {name} options {text!r} are not a mapping")
        return opts
    opts = {}
    for item in split_top(text, ":"):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise CompareError(f"--methods {label!r}: {name} option {item!r} must look like key=value "
                               f"(e.g. {name}:rank=4)")
        try:
            opts[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            opts[key.strip()] = raw
    return opts


def _method(label: str, part: str) -> dict:
    from tuneforge.methods import METHOD_CONFIGS

    name, colon, rest = part.partition(":")
    name = name.strip()
    if name not in METHOD_CONFIGS:
        close = difflib.get_close_matches(name, list(METHOD_CONFIGS), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else f" (known: {', '.join(METHOD_CONFIGS)})"
        raise CompareError(f"--methods {label!r}: unknown method {name!r}{hint}")
    opts = _options(label, name, rest.strip()) if colon else {}
    cls = METHOD_CONFIGS[name]
    try:
        return cls.model_validate({**opts, "name": name}).model_dump(mode="json")
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or name
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(str(err["loc"][-1]), list(cls.model_fields), n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                problems.append(f"{name} has no option {key!r}{hint}")
            else:
                problems.append(f"{name} option {key}: {err['msg']}" if err["loc"] else f"{name}: {err['msg']}")
        raise CompareError(f"--methods {label!r}: {'; '.join(problems)}") from None


def folder_of(label: str) -> str:
    """A label as a folder name: the characters a file system takes everywhere, the rest as '_'."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label).strip("._") or "method"


def parse_methods(text: str) -> list[Entry]:
    """``--methods``: comma-separated, each ``[label=]name[:k=v[:k=v]]`` or ``name:{k: v}``, ``+`` composing methods
    in one run (``lora+bitfit``). Labels (default: the spec as written) must be unique, and so must their folders."""
    items = [x for x in split_top(text, ",") if x]
    if not items:
        raise CompareError("--methods: name one or more methods, e.g. --methods full,lora,ia3")
    entries, seen, folders = [], {}, {REPORT_DIR: "the report"}
    for item in items:
        m = _LABEL.match(item)
        label, spec = (m.group(1), m.group(2).strip()) if m else (item, item)
        if label in seen:
            raise CompareError(f"--methods: label {label!r} appears twice; labels must be unique (name one "
                               f"e.g. {label}_b=<spec>)")
        methods = [_method(label, p) for p in split_top(spec, "+")]
        folder = folder_of(label)
        if folder in folders:
            raise CompareError(f"--methods {label!r}: its folder {folder!r} is taken by {folders[folder]}; "
                               f"give it another label (label=spec)")
        seen[label], folders[folder] = True, repr(label)
        entries.append(Entry(label, methods, folder))
    return entries


def parse_lr(text: str | None) -> str | float:
    """``--lr``: None (the recipe's rate for every method), ``auto`` (a per-method sweep), ``default`` (each
    method's usual rate, ``DEFAULT_LR``, without a sweep) or one rate for all."""
    if text is None:
        return "recipe"
    if text.strip().lower() in ("auto", "default"):
        return text.strip().lower()
    try:
        lr = float(text)
    except ValueError:
        raise CompareError(f"--lr {text!r}: give auto, default or a positive number (e.g. 1e-3)") from None
    if not (lr > 0 and math.isfinite(lr)):
        raise CompareError(f"--lr {text!r}: a learning rate must be a positive number")
    return lr


# ------------------------------------------------------------------------------------------- learning rates
def default_lr(methods: list[dict]) -> float:
    """The sweep's centre: the smallest default of the run's methods (a whole-model method sets the pace)."""
    return min(DEFAULT_LR.get(m["name"], FALLBACK_LR) for m in methods)


def sweep_rates(methods: list[dict]) -> list[float]:
    centre = default_lr(methods)
    return [float(f"{centre * f:.3g}") for f in SWEEP_FACTORS]


def sweep_budget(train: dict) -> dict:
    """A sweep run's share of the budget: a quarter of the steps (or of the epochs)."""
    if train.get("max_steps"):
        return {"max_steps": max(1, train["max_steps"] // SWEEP_FRACTION)}
    return {"epochs": train["epochs"] / SWEEP_FRACTION}


def choose_rate(sweep: list[dict], metric: str) -> float | None:
    """The sweep run with the best metric (a diverged or failed run never wins; ties go to the lower held-out loss,
    then to the earlier run). ``sweep`` rows: ``{"lr", "value", "loss"}``; None when no run has a finite metric."""
    best = None
    for row in sweep:
        v = row.get("value")
        if v is None or not math.isfinite(v):
            continue
        if best is None or better(v, best["value"], metric):
            best = row
        elif v == best["value"] and _lower(row.get("loss"), best.get("loss")):
            best = row
    return best["lr"] if best else None


def edge_rate(sweep: list[dict], metric: str) -> float | None:
    """The next rate to try when the sweep's best sits at an end of the rates tried and strictly beats its
    neighbour (the best may lie beyond the grid: one more factor of sqrt(10) that way), else None. A grid edge that
    wins is otherwise an artefact of where the grid was centred, not the method's best rate."""
    chosen = choose_rate(sweep, metric)
    tried = sorted({row["lr"] for row in sweep})
    if chosen is None or len(tried) < 2 or chosen not in (tried[0], tried[-1]):
        return None
    neighbour = tried[1] if chosen == tried[0] else tried[-2]
    value = {row["lr"]: row.get("value") for row in sweep}
    if value[neighbour] is not None and math.isfinite(value[neighbour]) and not better(value[chosen], value[neighbour],
                                                                                        metric):
        return None
    step = SWEEP_FACTORS[-1] / SWEEP_FACTORS[1]
    return float(f"{(chosen / step if chosen == tried[0] else chosen * step):.3g}")


def _lower(a: float | None, b: float | None) -> bool:
    return a is not None and math.isfinite(a) and (b is None or not math.isfinite(b) or a < b)


# ------------------------------------------------------------------------------------------------- checking
def prepare(cfg: RunConfig, entries: list[Entry], steps: int | None, metric: str | None) -> tuple[RunConfig, str]:
    """Everything that can be wrong, before anything is trained or written: the eval file, the metric, and each
    method on this recipe (its config in the run, its targets on a weightless copy of the model)."""
    from tuneforge.api import check_targets
    from tuneforge.models.load import load_tokenizer

    if not cfg.data.eval:
        raise CompareError("data.eval: compare scores every run on a held-out file; set data.eval in the recipe "
                           "(or data.eval=FILE)")
    if steps is not None:
        if steps < 1:
            raise CompareError(f"--steps {steps}: give a positive number of optimizer steps")
        cfg = variant(cfg, [m.model_dump(mode="json") for m in cfg.method], Path(cfg.train.output_dir),
                      max_steps=steps, save_every=cfg.train.save_every)
    if metric is None:
        metric = pick_metric(cfg)
        if metric is None:
            raise CompareError(f"data.eval: no held-out metric can score {cfg.data.eval} (known: "
                               f"{', '.join(METRICS)})")
    elif metric not in METRICS:
        close = difflib.get_close_matches(metric, list(METRICS), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise CompareError(f"--metric {metric!r}: unknown metric (known: {', '.join(METRICS)}){hint}")
    elif not METRICS[metric].supports(cfg):
        raise CompareError(f"--metric {metric}: {cfg.data.eval} cannot be scored this way"
                           + (f" (use {pick_metric(cfg)})" if pick_metric(cfg) else ""))
    tok = load_tokenizer(cfg.model)
    for e in entries:
        try:
            check_targets(variant(cfg, e.methods, Path(cfg.train.output_dir)), tok)
        except ValidationError as err:
            raise CompareError(f"--methods {e.label!r}: {err.errors()[0]['msg']}") from None
        except ConfigError as err:
            raise CompareError(f"--methods {e.label!r}: " + "; ".join(f"{k}: {v}" for k, v in err.problems)) \
                from None
    return cfg, metric


# ------------------------------------------------------------------------------------------------- running
def _reusable(run_dir: Path, cfg: RunConfig, metric: str) -> dict | None:
    """The finished result of this exact run, or None; a folder holding another configuration's run is cleared."""
    f = run_dir / RESULT_FILE
    if f.exists():
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError):
            r = {}
        if r.get("config_hash") == cfg.hash() and r.get("metric") == metric and r.get("status") == "ok":
            return r
    run_json = run_dir / "run.json"
    if run_json.exists():
        try:
            stale = json.loads(run_json.read_text()).get("config_hash") != cfg.hash()
        except (OSError, ValueError):
            stale = True
        if stale:  # its checkpoints would refuse to resume into this configuration
            shutil.rmtree(run_dir)
    return None


def step_line(line: str) -> str:
    """The training loop's step line, short: ``step 40/200 | loss 1.23 | eval_loss 1.4 | eta 00:01:10``."""
    parts = line.strip().split(" | ")
    return " | ".join([parts[0]] + [p for p in parts[1:] if p.split(" ", 1)[0] in ("loss", "eval_loss", "eta")])


def run_children(jobs: list[tuple[Path, RunConfig]], metric: str, log_file: Path, echo=None) -> list[dict]:
    """Train and score ``jobs`` in one child process (results reused where finished); one result dict per job,
    ``status`` "failed" with the reason where a run did not finish. The child's output goes to ``log_file``, its
    step lines (``train.progress`` off: lines, not a progress bar) also to ``echo``."""
    from tuneforge.safeio import atomic_write_text

    results: dict[int, dict] = {}
    todo = []
    for i, (run_dir, cfg) in enumerate(jobs):
        r = _reusable(run_dir, cfg, metric)
        if r is not None:
            results[i] = {**r, "reused": True}
        else:
            todo.append(i)
    if todo:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        job = log_file.with_name(f".{log_file.stem}-job.json")
        atomic_write_text(job, json.dumps({"metric": metric, "runs": [
            {"dir": str(jobs[i][0]), "config": jobs[i][1].model_dump(mode="json")} for i in todo]}))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(log_file, "a") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "tuneforge.eval.compare_run", str(job)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in proc.stdout:
                fh.write(line)
                if echo is not None and line.startswith("step "):
                    echo(step_line(line))
            code = proc.wait()
        job.unlink(missing_ok=True)
        for i in todo:
            f = jobs[i][0] / RESULT_FILE
            r = json.loads(f.read_text()) if f.exists() else None
            if r is None or r.get("config_hash") != jobs[i][1].hash():
                r = {"status": "failed", "error": f"the run's process exited with code {code} before it finished; "
                                                  f"see {log_file}"}
            results[i] = {**r, "reused": False, "log": str(log_file)}
    return [results[i] for i in range(len(jobs))]


def _fmt(v: float | None, metric: str) -> str:
    return "n/a" if v is None else (f"{v:.1%}" if METRICS[metric].percent else f"{v:.4g}")


def _sweep(cfg: RunConfig, e: Entry, out: Path, metric: str, log, tag: str) -> tuple[float, list[dict]]:
    """``--lr auto`` for one entry: its sweep runs (one child process), each rate's metric, and the rate chosen."""
    rates, budget = sweep_rates(e.methods), sweep_budget(cfg.train.model_dump())
    log(f"{tag}: learning-rate sweep {', '.join(f'{r:g}' for r in rates)} "
        f"({', '.join(f'{k} {v:g}' for k, v in budget.items())} each)")
    sweep: list[dict] = []

    def run(rates_now: list[float]) -> None:
        jobs = [(out / e.folder / f"sweep-lr{r:g}", variant(cfg, e.methods, out / e.folder / f"sweep-lr{r:g}", r,
                                                           progress=False, **budget)) for r in rates_now]
        results = run_children(jobs, metric, out / e.folder / "sweep.log", lambda x: log(f"{tag}:     {x}"))
        for (run_dir, _), r, res in zip(jobs, rates_now, results):
            scores = res.get("metrics") or {}
            sweep.append({"lr": r, "value": scores.get(metric), "loss": scores.get("loss"), "status": res["status"],
                          "dir": str(run_dir), "error": res.get("error"), "reused": res.get("reused", False)})
            why = "" if res["status"] == "ok" else f" (failed: {res['error']})"
            log(f"{tag}:   lr {r:g}: {metric} {_fmt(scores.get(metric), metric)}{why}"
                f"{' (reused)' if res.get('reused') else ''}")

    run(rates)
    for _ in range(SWEEP_EXTEND):
        extra = edge_rate(sweep, metric)
        if extra is None:
            break
        log(f"{tag}: the best rate is the grid's edge; trying lr {extra:g}")
        run([extra])
    chosen = choose_rate(sweep, metric)
    rate = chosen if chosen is not None else default_lr(e.methods)
    log(f"{tag}: chose lr {rate:g}" + ("" if chosen is not None else " (no sweep run finished: the default)"))
    return rate, sweep


def _final(cfg: RunConfig, e: Entry, out: Path, rate: float, metric: str, log, tag: str) -> dict:
    """The entry's run on the whole budget, with periodic checkpoints as the recipe sets them (for resuming)."""
    run_dir = out / e.folder / "run"
    run_cfg = variant(cfg, e.methods, run_dir, rate, save_every=cfg.train.save_every, progress=False)
    log(f"{tag}: training at lr {rate:g} in {run_dir}")
    res = run_children([(run_dir, run_cfg)], metric, out / e.folder / "run.log", lambda x: log(f"{tag}:   {x}"))[0]
    value = (res.get("metrics") or {}).get(metric)
    if res["status"] == "ok":
        log(f"{tag}: {metric} {_fmt(value, metric)}, {res['wall_s']:.1f} s, peak RSS "
            f"{res['peak_rss_bytes'] / 2**20:.0f} MiB{' (result reused)' if res.get('reused') else ''}")
    else:
        log(f"{tag}: FAILED: {res['error']}")
    return {**res, "learning_rate": rate, "value": value}


def run_compare(cfg: RunConfig, entries: list[Entry], out: str | Path, lr: str | float = "recipe",
                metric: str = "loss", log=print, recipe: str | None = None) -> dict:
    """Train and score every entry (``prepare`` first), then write ``<out>/compare/``; returns the summary."""
    from tuneforge.eval.compare_report import write_report

    out, t = Path(out), cfg.train
    mode = lr if lr in ("auto", "default") else ("fixed" if isinstance(lr, float) else "recipe")
    budget = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epoch(s)"
    rate_text = ("auto (a sweep per method)" if mode == "auto" else f"{lr:g} for every method" if mode == "fixed"
                 else "each method's usual rate (DEFAULT_LR)" if mode == "default" else f"{t.learning_rate:g} (the recipe's)")
    direction = "higher" if METRICS[metric].higher_is_better else "lower"
    log(f"compare: {len(entries)} method(s), {budget} each, seed {t.seed}, metric {metric} ({direction} is "
        f"better), learning rate {rate_text}")
    rows = []
    for k, e in enumerate(entries, 1):
        tag = f"[{k}/{len(entries)}] {e.label}"
        rate, sweep = lr if mode == "fixed" else default_lr(e.methods) if mode == "default" else t.learning_rate, []
        if mode == "auto":
            rate, sweep = _sweep(cfg, e, out, metric, log, tag)
        rows.append({"label": e.label, "method": e.methods, "folder": str(out / e.folder), "lr_sweep": sweep,
                     **_final(cfg, e, out, rate, metric, log, tag)})
    summary = {"recipe": recipe, "model": cfg.model.path, "data": {"train": cfg.data.train, "eval": cfg.data.eval},
               "algorithm": cfg.algorithm.name, "seed": t.seed, "max_steps": t.max_steps,
               "epochs": None if t.max_steps else t.epochs, "metric": metric,
               "metric_label": METRICS[metric].label, "higher_is_better": METRICS[metric].higher_is_better,
               "metric_percent": METRICS[metric].percent, "lr_mode": mode,
               "sweep": {"factors": list(SWEEP_FACTORS), "fraction": 1 / SWEEP_FRACTION} if mode == "auto" else None,
               "runs": rows}
    return write_report(summary, out / REPORT_DIR)
