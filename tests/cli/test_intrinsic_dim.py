"""``tuneforge intrinsic-dim`` end to end on the tiny model: the full reference run, the grid, the bisection, the
JSON and the plot; and the d90 rule on hand-made results."""

import json

import pytest
import yaml
from conftest import base_config, write_jsonl

from tuneforge.cli import main
from tuneforge.intrinsic_dim import better, d90, lr_for, target_of
from tuneforge.tasks import make_examples


def test_d90_is_the_smallest_dimension_reaching_the_target():
    assert target_of(0.0, 0.8, 0.9, "exact_match") == pytest.approx(0.72)
    assert target_of(5.0, 1.0, 0.9, "loss") == pytest.approx(1.4)  # 90% of the 4.0 reduction
    assert d90({10: 0.1, 100: 0.75, 1000: 0.8, 30: 0.73}, 0.72, "exact_match") == 30
    assert d90({10: 3.0, 100: 1.3}, 1.4, "loss") == 100
    assert d90({10: 3.0}, 1.4, "loss") is None


def test_learning_rate_keeps_the_weight_space_step_fixed():
    # Adam moves each of the d coordinates by ~lr, P's columns are unit norm: ||P dθ|| ~ lr sqrt(d), so lr ~ 1/sqrt(d)
    assert lr_for(10000, 0.3, 10000) == pytest.approx(0.3)
    assert lr_for(100, 0.3, 10000) == pytest.approx(3.0)
    assert lr_for(40000, 0.3, 10000) == pytest.approx(0.15)
    assert lr_for(40000, 0.3, 10000, "none") == 0.3
    with pytest.raises(ValueError):
        lr_for(10, 0.3, 10, "linear")


def test_a_diverged_factor_never_wins_whatever_the_order():
    nan, inf = float("nan"), float("inf")
    for metric in ("loss", "exact_match"):
        assert better(1.0, nan, metric) and not better(nan, 1.0, metric)
        assert better(4.0, inf, "loss") and not better(inf, 4.0, "loss")
    assert better(3.0, 4.0, "loss") and better(0.5, 0.4, "exact_match")


def test_intrinsic_dim_command_writes_results_and_plot(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_examples("copy", 48, seed=1))
    held = write_jsonl(tmp_path / "eval.jsonl", make_examples("copy", 16, seed=2))
    cfg = base_config(tmp_path, train, max_steps=4, learning_rate=5e-2)
    cfg["data"]["eval"] = held
    cfg["method"] = [{"name": "intrinsic", "dimension": 1, "projection": "fastfood", "seed": 3}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["intrinsic-dim", str(path), "--dims", "4,64", "--metric", "loss", "--full-lr", "1e-3",
              "--refine", "1", "--lr-factors", "0.5,1", "--out", str(tmp_path / "id")])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    res = json.loads((tmp_path / "id" / "intrinsic_dim.json").read_text())
    assert res["full"] < res["base"]  # the reference run learned
    assert {"4", "64"} <= set(res["runs"]) and res["method"]["seed"] == 3
    assert res["d90"] == d90({int(k): v for k, v in res["runs"].items()}, res["target"], "loss")
    # the recipe's rate is for its own d (1): each d's run used 5e-2 * sqrt(1 / d), times the better factor
    for d in ("4", "64"):
        assert any(res["learning_rates"][d] == pytest.approx(f * 5e-2 * (1 / int(d)) ** 0.5) for f in (0.5, 1))
    assert len(res["all_runs"]) == 4 and {r["d"] for r in res["all_runs"]} == {4, 64}
    assert (tmp_path / "id" / "d64-lr0.00313").is_dir() and (tmp_path / "id" / "d64-lr0.00625").is_dir()
    assert (tmp_path / "id" / "intrinsic_dim.png").stat().st_size > 0
    assert "d90" in out or "no d reached" in out


def test_intrinsic_dim_needs_an_eval_file(tmp_path, pc_file, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, pc_file)))
    with pytest.raises(SystemExit) as e:
        main(["intrinsic-dim", str(path), "--dims", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "data.eval" in err and "Traceback" not in err


def test_intrinsic_dim_refuses_bad_learning_rate_factors(tmp_path, pc_file, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, pc_file)))
    for bad in ("0.5,x", "0,1"):
        with pytest.raises(SystemExit) as e:
            main(["intrinsic-dim", str(path), "--dims", "4", "--lr-factors", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--lr-factors" in err and "Traceback" not in err
