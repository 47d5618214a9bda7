"""Run logging: metrics as JSONL and TensorBoard, the row ledger, and progress (a bar on a TTY, lines otherwise).

Only rank 0 writes. On resume the JSONL files are cut back to the resumed step, so the log of a resumed run reads
exactly like the log of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _fmt(v):
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)  # inf/nan stay visible: never filtered into a pretty mean
        return f"{v:.4g}"
    return str(v)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only records with ``step <= last_step`` (atomic rewrite)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)


class RunLogger:
    """metrics.jsonl + ledger.jsonl + TensorBoard + progress, for the main process; a no-op elsewhere."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool,
                 progress: bool):
        self.enabled, self.total = enabled, total_steps
        self.metrics_path, self.ledger_path = out_dir / "metrics.jsonl", out_dir / "ledger.jsonl"
        self.tb = self.bar = None
        self.t0, self.step0 = time.perf_counter(), start_step
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.metrics_path, start_step)
        truncate_jsonl(self.ledger_path, start_step)
        self._metrics = self.metrics_path.open("a")
        self._ledger = self.ledger_path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def ledger(self, step: int, rows: list[int]) -> None:
        if self.enabled:
            self._ledger.write(json.dumps({"step": step, "rows": rows}) + "\n")
            self._ledger.flush()

    def log(self, record: dict, show: bool = True) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("eval") else f"eval/{k}", v, step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: _fmt(record[k]) for k in ("loss", "tokens_per_s", "eval_loss") if k in record},
                                 refresh=True)
        elif show:
            print(self._line(record), file=sys.stderr, flush=True)

    def _line(self, record: dict) -> str:
        step = record["step"]
        done = step - self.step0
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        parts = [f"step {step}/{self.total}"] + [f"{k} {_fmt(v)}" for k, v in record.items()
                                                 if k not in ("step", "rows")] + [f"eta {eta_s}"]
        return " | ".join(parts)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else lambda s: print(s, file=sys.stderr, flush=True))(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._ledger.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
