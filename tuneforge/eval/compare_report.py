"""The report of ``tuneforge compare``: ``compare.json`` (every figure, every sweep run), ``compare.md`` (the table),
three charts (the held-out metric against trainable share, wall time and peak memory) and ``report.html``, one page
with the table and the charts inlined as data URIs, so it can be mailed or archived and opens without a network
or JavaScript.

The folder is built beside its final place and swapped in whole (``safeio.replace_dir``): a crash mid-report leaves
the previous report, never half of a new one. Table building is pure (``table_rows``, ``markdown``), so it is
tested without training anything.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import shutil
from pathlib import Path

CHARTS = {  # file -> (x key of a table row, x axis label, log x)
    "metric_vs_trainable.png": ("trainable_pct", "trainable parameters (% of the model, log scale)", True),
    "metric_vs_time.png": ("wall_s", "wall time of the run (s)", False),
    "metric_vs_memory.png": ("peak_rss_mib", "peak memory, RSS high-water mark (MiB)", False),
}
NOTE = ("Peak RSS is each run's own process high-water mark (interpreter and libraries included; in brackets its "
        "rise over the process before the model loaded; on a GPU, the peak allocated GPU memory follows); wall time "
        "covers loading, training and saving (a resumed run: its last session); tokens/s counts input tokens over "
        "the optimizer steps; weights on disk are the saved adapter's (or full model's) weight files.")
COLUMNS = ["#", "method", "metric", "trainable params", "% of model", "peak RSS", "wall time", "tokens/s",
           "weights on disk", "learning rate"]


def headers(summary: dict) -> list[str]:
    """``COLUMNS`` with the metric's own name and direction in place of "metric"."""
    name = f"{summary['metric'].replace('_', ' ')} {'↑' if summary['higher_is_better'] else '↓'}"
    return [name if c == "metric" else c for c in COLUMNS]


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def metric_text(v: float | None, percent: bool) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1%}" if percent else f"{v:.4g}"


def _sweep_text(row: dict, percent: bool) -> str:
    return ", ".join(f"{s['lr']:g}: " + (metric_text(s["value"], percent) if s["status"] == "ok" else "failed")
                     for s in row.get("lr_sweep") or [])


def ordered(summary: dict) -> list[dict]:
    """Runs best first by the held-out metric (its direction from the summary); failed or unscored runs last."""
    sign = -1.0 if summary["higher_is_better"] else 1.0
    ok = [r for r in summary["runs"] if r.get("status") == "ok" and r.get("value") is not None]
    rest = [r for r in summary["runs"] if r not in ok]

    def key(r):  # ties (exact match often ties on short runs) go to the lower held-out loss
        loss = (r.get("metrics") or {}).get("loss")
        return sign * r["value"], loss if loss is not None else math.inf

    return sorted(ok, key=key) + rest


def table_rows(summary: dict) -> list[dict]:
    """One display row per run (strings, in ``COLUMNS`` order), plus the raw figures the charts use."""
    percent, out = summary.get("metric_percent", False), []
    for i, r in enumerate(ordered(summary), 1):
        ok = r.get("status") == "ok"
        lr = f"{r['learning_rate']:g}" if r.get("learning_rate") else "n/a"
        if r.get("lr_sweep"):
            lr += f" (sweep {_sweep_text(r, percent)})"
        cells = [str(i) if ok else "–", r["label"], metric_text(r.get("value"), percent) if ok else "failed",
                 f"{r['trainable_params']:,}" if ok else "n/a", f"{r['trainable_pct']:.3g}%" if ok else "n/a",
                 _rss(r) if ok else "n/a",
                 f"{r['wall_s']:.1f} s" if ok else "n/a",
                 f"{r['tokens_per_s']:,.0f}" if ok and r.get("tokens_per_s") else "n/a",
                 human_bytes(r.get("weights_bytes")) if ok else "n/a", lr]
        out.append({"cells": cells, "label": r["label"], "ok": ok, "value": r.get("value"),
                    "trainable_pct": r.get("trainable_pct"), "wall_s": r.get("wall_s"),
                    "peak_rss_mib": r["peak_rss_bytes"] / 2**20 if ok else None, "error": r.get("error")})
    return out


def _rss(r: dict) -> str:
    """The peak, and in brackets its rise over the process before the model loaded (the run's own share)."""
    text = human_bytes(r.get("peak_rss_bytes"))
    if r.get("start_rss_bytes") is not None and r.get("peak_rss_bytes") is not None:
        text += f" (+{human_bytes(r['peak_rss_bytes'] - r['start_rss_bytes'])})"
    if r.get("peak_gpu_bytes"):
        text += f"; GPU {human_bytes(r['peak_gpu_bytes'])}"
    return text


def direction_text(summary: dict) -> str:
    better = "higher" if summary["higher_is_better"] else "lower"
    return (f"{summary['metric_label']} on {summary['data']['eval']}: {better} is better; rows are sorted best "
            "first")


def _budget(summary: dict) -> str:
    b = f"{summary['max_steps']} steps" if summary["max_steps"] else f"{summary['epochs']:g} epoch(s)"
    lr = {"auto": "learning rate per method from a sweep (each rate on a quarter of the budget, chosen on the "
                  "held-out metric)", "fixed": "one learning rate for every method",
          "recipe": "the recipe's learning rate for every method",
          "default": "each method's usual learning rate (no sweep)"}[summary["lr_mode"]]
    return f"{summary['model']}, {summary['algorithm']}, {b} per run, seed {summary['seed']}; {lr}"


def markdown_table(summary: dict) -> str:
    lines = ["| " + " | ".join(headers(summary)) + " |",
             "|" + "|".join("---" if c in ("method", "learning rate") else "---:" for c in COLUMNS) + "|"]
    for row in table_rows(summary):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row["cells"]) + " |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    lines = ["# tuneforge compare", "", f"Recipe: {summary['recipe'] or 'n/a'} — {_budget(summary)}.", "",
             f"Metric: {direction_text(summary)}.", "", markdown_table(summary)]
    failed = [r for r in table_rows(summary) if not r["ok"]]
    if failed:
        lines += ["", "Failed:"] + [f"- {r['label']}: {r['error']}" for r in failed]
    lines += ["", NOTE, ""]
    return "\n".join(lines)


def charts(summary: dict) -> dict[str, bytes]:
    """PNG bytes of each chart in ``CHARTS``: one point per finished run, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, PercentFormatter

    rows = [r for r in table_rows(summary) if r["ok"]]
    ylabel = f"{summary['metric'].replace('_', ' ')} ({'higher' if summary['higher_is_better'] else 'lower'} " \
             "is better)"
    out = {}
    for name, (key, xlabel, logx) in CHARTS.items():
        pts = [(r[key], r["value"], r["label"]) for r in rows if r[key] is not None and (r[key] > 0 or not logx)]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for x, y, label in pts:
            ax.scatter([x], [y], s=36)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if logx and pts:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if summary.get("metric_percent"):
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(0.15)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;font-size:14px}
th{background:#f0f0f0}td.n{text-align:right;white-space:nowrap}tr.failed td{color:#a00}
.charts{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-weight:bold;font-size:15px}
img{max-width:100%}.note{color:#555;font-size:13px}"""


def html_page(summary: dict, images: dict[str, bytes]) -> str:
    esc = html.escape
    rows = table_rows(summary)
    numeric = {0, 2, 3, 4, 5, 6, 7, 8}
    head = "".join(f"<th>{esc(c)}</th>" for c in headers(summary))
    body = "\n".join("<tr" + ("" if r["ok"] else ' class="failed"') + ">" + "".join(
        f"<td{' class=n' if i in numeric else ''}>{esc(c)}</td>" for i, c in enumerate(r["cells"])) + "</tr>"
        for r in rows)
    failed = "".join(f"<li>{esc(r['label'])}: {esc(str(r['error']))}</li>" for r in rows if not r["ok"])
    what = esc(summary["metric"].replace("_", " "))
    imgs = "\n".join(f'<figure><figcaption>{what} against {esc(CHARTS[n][1])}</figcaption>\n<img alt="{esc(n)}" '
                     f'src="data:image/png;base64,{base64.b64encode(b).decode()}"></figure>'
                     for n, b in images.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tuneforge compare</title><style>{_CSS}</style></head>
<body><h1>tuneforge compare</h1>
<p>Recipe: {esc(str(summary['recipe'] or 'n/a'))} — {esc(_budget(summary))}.</p>
<p><b>Metric:</b> {esc(direction_text(summary))}.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
{f'<p>Failed:</p><ul>{failed}</ul>' if failed else ''}
<p class="note">{esc(NOTE)}</p>
<h2>Charts</h2>
<div class="charts">
{imgs}
</div>
</body></html>
"""


def write_report(summary: dict, folder: str | Path) -> dict:
    """Write the report folder whole (built beside it, then swapped in); returns the summary with its files."""
    from tuneforge.safeio import replace_dir

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        images = charts(summary)
        summary = {**summary, "ranking": [r["label"] for r in table_rows(summary)],
                   "files": {"json": str(folder / "compare.json"), "markdown": str(folder / "compare.md"),
                             "html": str(folder / "report.html"), "charts": [str(folder / n) for n in images]}}
        for name, data in images.items():
            (tmp / name).write_bytes(data)
        (tmp / "compare.md").write_text(markdown(summary))
        (tmp / "report.html").write_text(html_page(summary, images))
        (tmp / "compare.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
