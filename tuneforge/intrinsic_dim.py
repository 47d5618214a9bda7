"""``tuneforge intrinsic-dim``: how many free directions does a task need? The search for d90 (Li et al. 2018,
https://arxiv.org/abs/1804.08838, sec. 2; Aghajanyan et al. 2021, https://arxiv.org/abs/2012.13255, sec. 4):
the smallest dimension d of a random subspace (``methods/intrinsic.py``) whose fine-tuning reaches 90% of full
fine-tuning's metric on the task.

It fine-tunes the recipe's model once with ``full`` (the reference), then with ``intrinsic`` at each d of a grid,
then bisects (geometrically) between the largest d below the target and the smallest above it. Every run goes
through ``api.train`` with the recipe's data, algorithm and training settings (only the method, the output folder
and, for the full run, the learning rate change), and is scored on the recipe's ``data.eval`` file:

* ``exact_match``: greedy answers against the rows' completions (or chat rows' last assistant turn); the target
  is ``threshold`` x full fine-tuning's exact match;
* ``loss``: held-out loss; the target is reaching ``threshold`` of full fine-tuning's loss reduction.

**One learning rate per d.** With Adam every coordinate of θ^d moves by about the learning rate η per step, and
the projection's columns have unit norm and are nearly orthogonal, so the step in weight space is
||P Δθ^d|| ≈ η √d: each of the D weights moves by about η √(d/D). A rate that suits one d therefore over-steps at
100x that d by 10x (the search on the demo task fell from 87.5% at d = 10^4 to 43% at 3·10^4 with one rate). The
search keeps the weight-space step fixed instead: η(d) = η_ref √(d_ref / d) (``lr_scale="sqrt"``, the default),
with η_ref the recipe's learning rate and d_ref the recipe's own ``intrinsic`` dimension (1000 when it has none).
``lr_factors`` tries several multiples of η(d) per d and keeps the best by the held-out metric (a small per-d
sweep, as Aghajanyan et al. tune hyper-parameters per run; it costs one run per factor and chooses on the file that
is also reported, so the figures are a best case for each d).

Writes ``intrinsic_dim.json`` (every run's metric and learning rate, the target, d90) and ``intrinsic_dim.png``
(metric against d on a log axis, with full fine-tuning and the target drawn in) to the output folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tuneforge.config import ConfigError, RunConfig
from tuneforge.eval.runs import better, finite as _finite, score as _score, variant as _variant

__all__ = ["search", "lr_for", "better", "reached", "target_of", "d90"]


LR_SCALES = ("sqrt", "none")
DEFAULT_REF_DIM = 1000


def lr_for(d: int, lr_ref: float, d_ref: int, scale: str = "sqrt") -> float:
    """The learning rate of the run at dimension d: η_ref √(d_ref / d) (a fixed step in weight space), or η_ref."""
    if scale not in LR_SCALES:
        raise ValueError(f"lr_scale must be one of {LR_SCALES}, not {scale!r}")
    return lr_ref * math.sqrt(d_ref / d) if scale == "sqrt" else lr_ref


def reached(value: float, target: float, metric: str) -> bool:
    return value >= target if metric == "exact_match" else value <= target


def target_of(before: float, full: float, threshold: float, metric: str) -> float:
    """exact match: threshold x full's; loss: before minus threshold x full's reduction."""
    return threshold * full if metric == "exact_match" else before - threshold * (before - full)


def d90(results: dict[int, float], target: float, metric: str) -> int | None:
    """The smallest d whose metric reached the target (None if none did)."""
    ok = [d for d, v in sorted(results.items()) if reached(v, target, metric)]
    return ok[0] if ok else None


def search(cfg: RunConfig, dims: list[int], out_dir: str | Path, threshold: float = 0.9,
           metric: str = "exact_match", full_lr: float | None = None, refine: int = 2, log=print,
           lr_scale: str = "sqrt", lr_factors: tuple[float, ...] = (1.0,)) -> dict:
    from tuneforge.api import train

    if not dims or min(dims) < 1:
        raise ConfigError([("--dims", "give one or more dimensions >= 1, e.g. 10,100,1000")], "arguments")
    if lr_scale not in LR_SCALES:
        raise ConfigError([("--lr-scale", f"{lr_scale!r}: choose {' or '.join(LR_SCALES)}")], "arguments")
    if not lr_factors or min(lr_factors) <= 0:
        raise ConfigError([("--lr-factors", "give one or more positive multiples, e.g. 0.5,1,2")], "arguments")
    if not cfg.data.eval:
        raise ConfigError([("data.eval", "intrinsic-dim scores every run on a held-out file; set data.eval")],
                          "config")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_method = next((m.model_dump(mode="json") for m in cfg.method if m.name == "intrinsic"),
                       {"name": "intrinsic"})
    d_ref = base_method.get("dimension") or DEFAULT_REF_DIM
    before = _score(cfg, None, metric)
    log(f"base model: {metric} {before:.4g}")
    full = _score(cfg, train(_variant(cfg, [{"name": "full"}], out / "full", full_lr)).saved, metric)
    target = target_of(before, full, threshold, metric)
    log(f"full fine-tuning: {metric} {full:.4g}; target ({threshold:.0%}): {target:.4g}")
    results: dict[int, float] = {}
    lrs: dict[int, float] = {}
    tried: list[dict] = []  # every run: d, learning rate, metric

    def run(d: int) -> float:
        if d in results:
            return results[d]
        base_lr = lr_for(d, cfg.train.learning_rate, d_ref, lr_scale)
        for f in lr_factors:
            lr = base_lr * f
            tag = f"d{d}" if len(lr_factors) == 1 else f"d{d}-lr{lr:.3g}"
            saved = train(_variant(cfg, [{**base_method, "dimension": d}], out / tag, lr)).saved
            v = _score(cfg, saved, metric)
            tried.append({"d": d, "lr": lr, metric: _finite(v)})
            log(f"d = {d}, lr {lr:.3g}: {metric} {v:.4g}{'  (reached)' if reached(v, target, metric) else ''}")
            if d not in results or better(v, results[d], metric):
                results[d], lrs[d] = v, lr
        return results[d]

    for d in sorted(set(dims)):
        run(d)
    for _ in range(refine):  # geometric bisection between the last miss and the first hit
        hit = d90(results, target, metric)
        misses = [d for d in results if d < (hit or 0) and not reached(results[d], target, metric)]
        if hit is None or not misses:
            break
        lo = max(misses)
        mid = int(round(math.sqrt(lo * hit)))
        if mid in (lo, hit):
            break
        run(mid)
    found = d90(results, target, metric)
    summary = {"metric": metric, "threshold": threshold, "base": before, "full": full, "target": target,
               "d90": found, "runs": {str(d): _finite(v) for d, v in sorted(results.items())},
               "learning_rates": {str(d): lrs[d] for d in sorted(lrs)},
               "lr_rule": {"scale": lr_scale, "lr_ref": cfg.train.learning_rate, "d_ref": d_ref,
                           "factors": list(lr_factors)}, "all_runs": tried,
               "method": base_method, "plot": str(out / "intrinsic_dim.png")}
    (out / "intrinsic_dim.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _plot(summary, out / "intrinsic_dim.png")
    log(f"d90 = {found}" if found else f"no d reached {target:.4g}; try larger dimensions")
    return summary


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(int(d), v) for d, v in summary["runs"].items() if v is not None]  # diverged runs are not drawn
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([d for d, _ in points], [v for _, v in points], "o-", label="intrinsic (random subspace)")
    ax.axhline(summary["full"], color="k", lw=1, label="full fine-tuning")
    ax.axhline(summary["target"], color="k", lw=1, ls="--", label=f"{summary['threshold']:.0%} target")
    ax.axhline(summary["base"], color="grey", lw=1, ls=":", label="base model")
    if summary["d90"]:
        ax.axvline(summary["d90"], color="tab:red", lw=1, ls="--", label=f"d90 = {summary['d90']}")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(summary["metric"].replace("_", " "))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
