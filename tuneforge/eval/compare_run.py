"""The child process of ``tuneforge compare``: train and score the runs of one job file, one after another, and
write each run's ``compare_result.json`` last and atomically: ``status`` "ok" with the figures, or "failed" with
the reason (a failed run is retried by the next ``compare``, resuming from its checkpoint).

Run as ``python -m tuneforge.eval.compare_run JOB.json``. Its own process, so that the peak resident set size
(``getrusage``'s high-water mark, which never goes down) is this run's and no other method's. The figures:

* ``peak_rss_bytes``: the process's high-water mark when training ended (before scoring), interpreter and
  libraries included, the same for every method; ``start_rss_bytes`` is the mark before the model loaded;
* ``peak_gpu_bytes``: CUDA's peak allocated memory, on a GPU;
* ``wall_s``: the ``train`` call (model load, training, saving); a resumed run counts its last session only;
* ``tokens_per_s``: input tokens over the optimizer steps' own time (no loading or saving);
* ``weights_bytes``: the saved adapter's (or full model's) weight files on disk.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def weights_bytes(folder: Path | None) -> int | None:
    if folder is None or not Path(folder).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def throughput(history: list[dict]) -> tuple[int, float | None]:
    """(input tokens, tokens per second) over this session's optimizer steps, from the loop's step records."""
    seconds = sum(r.get("step_s", 0.0) for r in history)
    tokens = sum(r.get("tokens_per_s", 0.0) * r.get("step_s", 0.0) for r in history)
    return int(round(tokens)), (tokens / seconds if seconds > 0 else None)


def run_one(cfg_dict: dict, run_dir: Path, metric: str) -> dict:
    import torch

    from tuneforge.api import train
    from tuneforge.config import RunConfig
    from tuneforge.eval.runs import finite, score_all
    from tuneforge.train.checkpoint import latest_checkpoint

    cfg = RunConfig.model_validate(cfg_dict)
    start_rss = peak_rss_bytes()
    resume = "auto" if latest_checkpoint(run_dir / "checkpoints") is not None else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = train(cfg, resume=resume)
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    t1 = time.perf_counter()
    values = score_all(cfg, out.saved, [metric], extra=("loss",) if metric != "loss" else ())
    run = json.loads((run_dir / "run.json").read_text())
    tokens, tps = throughput(out.result.history)
    return {"status": "ok", "config_hash": cfg.hash(), "metric": metric,
            "metrics": {k: finite(v) for k, v in values.items()}, "learning_rate": cfg.train.learning_rate,
            "steps": out.result.state.step, "trainable_params": run["trainable_params"],
            "total_params": run["total_params"],
            "trainable_pct": 100.0 * run["trainable_params"] / max(run["total_params"], 1),
            "peak_rss_bytes": peak, "start_rss_bytes": start_rss, "peak_gpu_bytes": gpu,
            "wall_s": wall, "score_s": time.perf_counter() - t1, "tokens_session": tokens, "tokens_per_s": tps,
            "weights_bytes": weights_bytes(out.saved), "saved": str(out.saved) if out.saved else None,
            "resumed": resume is not None}


def main(argv: list[str]) -> int:
    from tuneforge.safeio import atomic_write_text

    job = json.loads(Path(argv[0]).read_text())
    failed = 0
    for spec in job["runs"]:
        run_dir = Path(spec["dir"])
        print(f"=== {run_dir} ===", flush=True)
        try:
            result = run_one(spec["config"], run_dir, job["metric"])
        except Exception as e:  # this run failed; the report says why, the next runs of the job still go
            traceback.print_exc()
            from tuneforge.config import RunConfig

            failed += 1
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            result = {"status": "failed", "config_hash": RunConfig.model_validate(spec["config"]).hash(),
                      "metric": job["metric"], "error": f"{type(e).__name__}: {reason}"}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "compare_result.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
