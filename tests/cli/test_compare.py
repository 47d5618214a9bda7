"""``tuneforge compare`` end to end on the tiny model: every method's run, the report files, reuse of finished runs,
resuming an interrupted run, the learning-rate sweep's bookkeeping, bad input (exit 2, one ``error:`` line, nothing
written), and the HTML report rendered by a real browser."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import base_config, run_cli, write_jsonl

from tuneforge.tasks import make_examples

CHROMIUM = "/usr/bin/chromium"


def recipe(tmp_path, **train):
    data = write_jsonl(tmp_path / "train.jsonl", make_examples("copy", 24, seed=1))
    held = write_jsonl(tmp_path / "eval.jsonl", make_examples("copy", 8, seed=2))
    cfg = base_config(tmp_path, data, **{"max_steps": 2, **train})
    cfg["data"]["eval"] = held
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


run = run_cli


def test_compare_trains_each_method_writes_the_report_and_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", str(recipe(tmp_path, progress=True)), "--methods", "lora:rank=2,ia3", "--steps", "2",
            "--out", str(out)]
    code, stdout, err = run(argv, capsys)
    assert code == 0, stdout + err
    assert "[1/2] lora:rank=2: training" in stdout and "[2/2] ia3: exact_match" in stdout
    assert "[2/2] ia3:   step 2/2 | loss " in stdout  # each run's progress, as lines (no progress bar in a pipe)
    res = json.loads((out / "compare" / "compare.json").read_text())
    assert res["metric"] == "exact_match" and res["higher_is_better"] and res["lr_mode"] == "recipe"
    runs = {r["label"]: r for r in res["runs"]}
    assert set(runs) == {"lora:rank=2", "ia3"} and sorted(res["ranking"]) == sorted(runs)
    for label, r in runs.items():
        assert r["status"] == "ok" and r["steps"] == 2 and r["learning_rate"] == 1e-3
        assert 0 < r["trainable_pct"] < 100 and r["peak_rss_bytes"] >= r["start_rss_bytes"] > 0
        assert r["wall_s"] > 0 and r["tokens_per_s"] > 0 and r["weights_bytes"] > 0
        assert 0.0 <= r["metrics"]["exact_match"] <= 1.0 and r["metrics"]["loss"] > 0
        assert Path(r["saved"]).is_dir() and label in stdout
    assert runs["ia3"]["trainable_params"] < runs["lora:rank=2"]["trainable_params"]
    assert (out / "lora_rank=2" / "run" / "adapter").is_dir() and (out / "ia3" / "run.log").exists()
    md = (out / "compare" / "compare.md").read_text()
    page = (out / "compare" / "report.html").read_text()
    for label in runs:
        assert f"| {label} |" in md and f"<td>{label}</td>" in page and f"| {label} |" in stdout
    for png in ("metric_vs_trainable.png", "metric_vs_time.png", "metric_vs_memory.png"):
        assert (out / "compare" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second invocation trains nothing: every run's result is reused as it was
    marks = {p: p.stat().st_mtime_ns for p in out.glob("*/run/compare_result.json")}
    logs = {p: p.stat().st_size for p in out.glob("*/run.log")}
    code, stdout, err = run(argv, capsys)
    assert code == 0, stdout + err
    assert stdout.count("(result reused)") == 2 and "training at" in stdout
    assert {p: p.stat().st_mtime_ns for p in marks} == marks and {p: p.stat().st_size for p in logs} == logs
    again = json.loads((out / "compare" / "compare.json").read_text())
    assert all(r["reused"] for r in again["runs"])
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in res["runs"]]


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    from tuneforge.api import train
    from tuneforge.config import load_config
    from tuneforge.eval.compare_run import run_one
    from tuneforge.eval.runs import variant

    cfg = load_config(str(recipe(tmp_path)))
    run_dir = tmp_path / "cmp" / "lora" / "run"
    cfg = variant(cfg, [{"name": "lora", "rank": 2}], run_dir, save_every=1)

    def stop(loop):  # dies during step 2, after step 1's checkpoint
        if loop.state.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, hooks={"after_clip": stop})
    r = run_one(cfg.model_dump(mode="json"), run_dir, "exact_match")
    assert r["resumed"] and r["steps"] == 2 and r["status"] == "ok"
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1 and steps.count(2) == 1  # step 1 was not trained again


def test_a_folder_holding_another_configuration_is_cleared_and_a_finished_run_is_reused(tmp_path):
    from tuneforge.config import load_config
    from tuneforge.eval.compare import _reusable
    from tuneforge.eval.runs import variant

    cfg = load_config(str(recipe(tmp_path)))
    run_dir = tmp_path / "run"
    cfg = variant(cfg, [{"name": "ia3"}], run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"config_hash": cfg.hash()}))
    done = {"status": "ok", "config_hash": cfg.hash(), "metric": "loss"}
    (run_dir / "compare_result.json").write_text(json.dumps(done))
    assert _reusable(run_dir, cfg, "loss") == done
    assert _reusable(run_dir, cfg, "exact_match") is None and run_dir.is_dir()  # same run, scored otherwise
    other = variant(cfg, [{"name": "ia3"}], run_dir, lr=0.5)
    assert _reusable(run_dir, other, "loss") is None and not run_dir.exists()


def test_lr_auto_sweeps_each_method_then_trains_at_the_best_rate(tmp_path, capsys, monkeypatch):
    from tuneforge.eval import compare as C

    calls = []

    def fake_children(jobs, metric, log_file, echo=None):  # the exact match peaks at each middle rate
        calls.append((log_file.name, [(d, c.train.learning_rate, c.train.max_steps) for d, c in jobs]))
        out = []
        for d, c in jobs:
            mid = C.default_lr([m.model_dump() for m in c.method])
            value = 0.9 if abs(c.train.learning_rate - mid) < 1e-12 else 0.1
            out.append({"status": "ok", "metrics": {"exact_match": value, "loss": 1.0}, "wall_s": 1.0,
                        "peak_rss_bytes": 2**20, "start_rss_bytes": 2**19, "trainable_params": 10,
                        "total_params": 100, "trainable_pct": 10.0, "tokens_per_s": 5.0, "weights_bytes": 8,
                        "steps": c.train.max_steps})
        return out

    monkeypatch.setattr(C, "run_children", fake_children)
    out = tmp_path / "cmp"
    code, stdout, err = run(["compare", str(recipe(tmp_path)), "--methods", "full,lora", "--lr", "auto",
                             "--steps", "8", "--out", str(out)], capsys)
    assert code == 0, stdout + err
    assert [name for name, _ in calls] == ["sweep.log", "run.log", "sweep.log", "run.log"]
    full_sweep = calls[0][1]
    assert [lr for _, lr, _ in full_sweep] == C.sweep_rates([{"name": "full"}])
    assert {steps for _, _, steps in full_sweep} == {2} and calls[1][1][0][1:] == (C.DEFAULT_LR["full"], 8)
    assert full_sweep[0][0] == out / "full" / "sweep-lr9.49e-06"
    res = json.loads((out / "compare" / "compare.json").read_text())
    lora = next(r for r in res["runs"] if r["label"] == "lora")
    assert lora["learning_rate"] == C.DEFAULT_LR["lora"] and len(lora["lr_sweep"]) == 3
    assert [s["value"] for s in lora["lr_sweep"]] == [0.1, 0.9, 0.1] and res["lr_mode"] == "auto"
    assert "chose lr 0.003" in stdout and "(sweep 0.000949: 10.0%, 0.003: 90.0%, 0.00949: 10.0%)" in stdout


def test_a_run_whose_process_dies_is_reported_failed_and_its_log_kept(tmp_path, monkeypatch):
    import sys

    from tuneforge.config import load_config
    from tuneforge.eval import compare as C
    from tuneforge.eval.runs import variant

    real = subprocess.Popen
    child = "print('step 1/2 | loss 4.5 | lr 0.1 | eta 00:00:01', flush=True); raise SystemExit(137)"
    monkeypatch.setattr(C.subprocess, "Popen", lambda args, **kw: real([sys.executable, "-c", child], **kw))
    cfg = load_config(str(recipe(tmp_path)))
    run_dir = tmp_path / "cmp" / "ia3" / "run"
    seen = []
    [res] = C.run_children([(run_dir, variant(cfg, [{"name": "ia3"}], run_dir))], "loss", run_dir.parent / "run.log",
                           seen.append)
    assert res["status"] == "failed" and "exited with code 137" in res["error"] and "run.log" in res["error"]
    assert seen == ["step 1/2 | loss 4.5 | eta 00:00:01"]
    assert "step 1/2" in (run_dir.parent / "run.log").read_text()
    assert not list(run_dir.parent.glob(".*job.json"))  # the job file is removed


@pytest.mark.parametrize("args, words", [
    (["--methods", "lora,loar"], ["'loar'", "did you mean `lora`"]),
    (["--methods", "lora,ia3,lora"], ["label 'lora' appears twice"]),
    (["--methods", "lora:rank=0"], ["'lora:rank=0'", "lora option rank"]),
    (["--methods", "ia3:{target_modules: [no_such_proj]}"], ["'ia3:{target_modules: [no_such_proj]}'",
                                                             "no_such_proj"]),
    (["--methods", "lora", "--lr", "fast"], ["--lr 'fast'"]),
    (["--methods", "lora", "--steps", "0"], ["--steps 0"]),
    (["--methods", "lora", "--metric", "acuracy"], ["--metric 'acuracy'", "exact_match"]),
    (["--methods", "lora", "-o", "data.eval=null"], ["data.eval", "held-out file"]),
])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "cmp"
    code, stdout, err = run(["compare", str(recipe(tmp_path)), "--out", str(out), *args], capsys)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists() and not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
def test_the_report_renders_in_a_headless_browser(tmp_path):
    from matplotlib.image import imread

    from tuneforge.eval.compare_report import write_report

    def row(label, value, pct):
        return {"label": label, "status": "ok", "value": value, "metrics": {"exact_match": value, "loss": 1.0},
                "learning_rate": 1e-3, "trainable_params": int(pct * 1e3), "total_params": 100000,
                "trainable_pct": pct, "peak_rss_bytes": 3 * 2**28, "start_rss_bytes": 2**28, "wall_s": 3.0 * pct,
                "tokens_per_s": 900.0, "weights_bytes": 4096, "lr_sweep": []}

    summary = {"recipe": "r.yaml", "model": "tiny:llama", "data": {"train": "t.jsonl", "eval": "e.jsonl"},
               "algorithm": "sft", "seed": 0, "max_steps": 10, "epochs": None, "metric": "exact_match",
               "metric_label": "held-out exact match", "higher_is_better": True, "lr_mode": "recipe",
               "metric_percent": True,
               "runs": [row("lora", 0.75, 2.5), row("ia3", 0.5, 0.1), row("full", 0.875, 100.0)]}
    write_report(summary, tmp_path / "compare")
    page = (tmp_path / "compare" / "report.html").resolve()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    assert shot.exists() and shot.stat().st_size > 20_000, "no screenshot"
    pixels = imread(str(shot))
    assert pixels.shape[:2] == (900, 1200) and pixels[..., :3].std() > 0.05  # not a blank page
    for text in ("<td>lora</td>", "<td>ia3</td>", "<td>full</td>", "87.5%", "higher is better"):
        assert text in dom
    assert dom.count("data:image/png;base64,") == 3
