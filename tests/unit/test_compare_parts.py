"""``tuneforge compare``'s pure parts: the --methods syntax, the learning-rate sweep and its choice, the table and
report built from a hand-made summary, and which finished runs are reused."""

import json
import math

import pytest

from tuneforge.eval import compare_report as R
from tuneforge.eval.compare import (CompareError, DEFAULT_LR, choose_rate, default_lr, folder_of, parse_lr,
                                    parse_methods, split_top, sweep_budget, sweep_rates)
from tuneforge.eval.compare_run import throughput


# ------------------------------------------------------------------------------------------------ --methods
def test_methods_by_name_options_yaml_composition_and_label():
    es = parse_methods("full,lora:rank=4:alpha=8,ia3:{target_modules: [q_proj, v_proj]},lora+bitfit,small=lora:rank=2")
    assert [e.label for e in es] == ["full", "lora:rank=4:alpha=8", "ia3:{target_modules: [q_proj, v_proj]}",
                                     "lora+bitfit", "small"]
    assert es[0].methods == [{"name": "full"}]
    assert es[1].methods[0]["rank"] == 4 and es[1].methods[0]["alpha"] == 8
    assert es[2].methods[0]["target_modules"] == ["q_proj", "v_proj"]
    assert [m["name"] for m in es[3].methods] == ["lora", "bitfit"]
    assert es[4].methods[0]["rank"] == 2 and es[4].folder == "small"
    assert es[1].folder == "lora_rank=4_alpha=8"  # ':' is not safe in every file system


def test_split_top_keeps_brackets_and_quotes_together():
    assert split_top("a:x=[1,2],b:{k: 'v,w'},c", ",") == ["a:x=[1,2]", "b:{k: 'v,w'}", "c"]


@pytest.mark.parametrize("text, words", [
    ("lora,lorra", ["'lorra'", "unknown method", "did you mean `lora`"]),
    ("lora,lora", ["label 'lora' appears twice"]),
    ("lora:rnak=4", ["lora has no option 'rnak'", "did you mean `rank`"]),
    ("lora:rank=x", ["lora option rank", "integer"]),
    ("lora:rank", ["'rank' must look like key=value"]),
    ("intrinsic", ["intrinsic option dimension", "Field required"]),
    ("a=lora,a=ia3", ["label 'a' appears twice"]),
    ("lora:{rank: 4},lora_rank_4=ia3", ["folder 'lora_rank_4' is taken by 'lora:{rank: 4}'"]),
    ("compare=lora", ["folder 'compare' is taken by the report"]),
    (" , ", ["name one or more methods"]),
])
def test_bad_methods_say_which_method_and_option(text, words):
    with pytest.raises(CompareError) as e:
        parse_methods(text)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_folder_names_are_file_system_safe():
    assert folder_of("lora:{rank: 4}") == "lora_rank_4"
    assert folder_of("///") == "method"


def test_lr_argument():
    assert parse_lr(None) == "recipe" and parse_lr("auto") == "auto" and parse_lr("AUTO") == "auto"
    assert parse_lr("3e-4") == 3e-4 and parse_lr("Default") == "default"
    for bad in ("fast", "0", "-1e-3", "nan"):
        with pytest.raises(CompareError, match="--lr"):
            parse_lr(bad)


# ----------------------------------------------------------------------------------------- learning rates
def test_sweep_is_three_rates_a_root_ten_apart_around_the_method_default():
    rates = sweep_rates([{"name": "lora"}])
    assert rates[1] == DEFAULT_LR["lora"] and rates[2] / rates[1] == pytest.approx(math.sqrt(10), rel=1e-2)
    def spans(name, lo, hi):  # the sweep covers about [lo, hi]
        r = sweep_rates([{"name": name}])
        return 0.9 * lo <= r[0] <= 1.1 * lo * 3.2 and hi / 3.2 * 0.9 <= r[2] <= 1.1 * hi

    assert spans("full", 1e-5, 1e-4) and spans("lora", 1e-3, 1e-2) and spans("houlsby", 1e-3, 1e-2)
    assert spans("prompt_tuning", 1e-2, 1e-1) and spans("prefix_tuning", 1e-2, 1e-1)
    assert default_lr([{"name": "lora"}, {"name": "full"}]) == DEFAULT_LR["full"]  # the whole model sets the pace
    assert default_lr([{"name": "a_method_added_later"}]) > 0
    from tuneforge.methods import METHODS

    assert set(DEFAULT_LR) <= set(METHODS) and {"full", "lora", "ia3", "houlsby", "prefix_tuning"} <= set(DEFAULT_LR)


def test_sweep_budget_is_a_quarter():
    assert sweep_budget({"max_steps": 20, "epochs": 1.0}) == {"max_steps": 5}
    assert sweep_budget({"max_steps": 2, "epochs": 1.0}) == {"max_steps": 1}
    assert sweep_budget({"max_steps": None, "epochs": 2.0}) == {"epochs": 0.5}


def test_rate_choice_follows_the_metric_direction_and_ignores_failures():
    sweep = [{"lr": 1e-3, "value": 0.2, "loss": 2.0}, {"lr": 3e-3, "value": 0.5, "loss": 1.5},
             {"lr": 1e-2, "value": None, "loss": None}]
    assert choose_rate(sweep, "exact_match") == 3e-3
    losses = [{"lr": 1e-3, "value": 2.0}, {"lr": 3e-3, "value": float("nan")}, {"lr": 1e-2, "value": 1.2}]
    assert choose_rate(losses, "loss") == 1e-2
    ties = [{"lr": 1e-3, "value": 0.0, "loss": 3.0}, {"lr": 3e-3, "value": 0.0, "loss": 2.5},
            {"lr": 1e-2, "value": 0.0, "loss": float("inf")}]
    assert choose_rate(ties, "exact_match") == 3e-3  # a tie goes to the lower held-out loss
    assert choose_rate([{"lr": 1e-3, "value": None}], "loss") is None


def test_a_winning_grid_edge_extends_the_sweep_that_way():
    from tuneforge.eval.compare import edge_rate

    grid = lambda *v: [{"lr": r, "value": x, "loss": 1.0} for r, x in zip((9.49e-4, 3e-3, 9.49e-3), v)]  # noqa: E731
    assert edge_rate(grid(0.83, 0.79, 0.49), "accuracy") == 3e-4  # the lowest rate wins: one step lower
    assert edge_rate(grid(0.53, 0.74, 0.80), "accuracy") == 0.03  # the highest wins: one step higher
    assert edge_rate(grid(0.70, 0.80, 0.75), "accuracy") is None  # an inner best needs nothing
    assert edge_rate(grid(0.80, 0.80, 0.70), "accuracy") is None  # an edge that only ties its neighbour
    assert edge_rate(grid(2.0, 1.5, 1.2), "loss") == 0.03  # lower loss is better
    assert edge_rate(grid(0.9, None, None), "accuracy") == 3e-4  # a failed neighbour cannot hold the edge back
    extended = grid(0.83, 0.79, 0.49) + [{"lr": 3e-4, "value": 0.85, "loss": 1.0}]
    assert edge_rate(extended, "accuracy") == 9.49e-5  # still the edge: the next step (the caller caps how many)


# ---------------------------------------------------------------------------------------------- the report
def _run(label, value, loss, pct, status="ok", sweep=None):
    if status != "ok":
        return {"label": label, "status": "failed", "error": "TrainingAborted: 3 non-finite steps", "value": None,
                "learning_rate": 1e-2, "lr_sweep": sweep or []}
    return {"label": label, "status": "ok", "value": value, "metrics": {"exact_match": value, "loss": loss},
            "learning_rate": 3e-3, "trainable_params": int(pct * 1000), "total_params": 100000,
            "trainable_pct": pct, "peak_rss_bytes": 500 * 2**20, "start_rss_bytes": 400 * 2**20,
            "wall_s": 12.5, "tokens_per_s": 1234.5, "weights_bytes": 70000, "lr_sweep": sweep or []}


def summary(metric="exact_match"):
    sweep = [{"lr": 9.49e-4, "value": 0.25, "loss": 2.0, "status": "ok"},
             {"lr": 3e-3, "value": 0.5, "loss": 1.0, "status": "ok"},
             {"lr": 9.49e-3, "value": None, "loss": None, "status": "failed"}]
    return {"recipe": "r.yaml", "model": "tiny:llama", "data": {"train": "t.jsonl", "eval": "e.jsonl"},
            "algorithm": "sft", "seed": 0, "max_steps": 20, "epochs": None, "metric": metric,
            "metric_label": "held-out exact match", "higher_is_better": metric == "exact_match", "lr_mode": "auto",
            "metric_percent": metric == "exact_match",
            "runs": [_run("ia3", 0.25, 2.0, 0.4), _run("lora", 0.5, 1.0, 15.0, sweep=sweep),
                     _run("prefix_tuning", None, None, 1.0, "failed"), _run("bitfit", 0.25, 1.5, 0.1)]}


def test_table_is_sorted_best_first_ties_by_loss_failures_last():
    rows = R.table_rows(summary())
    assert [r["label"] for r in rows] == ["lora", "bitfit", "ia3", "prefix_tuning"]
    lora = dict(zip(R.COLUMNS, rows[0]["cells"]))
    assert lora["metric"] == "50.0%" and lora["% of model"] == "15%" and lora["trainable params"] == "15,000"
    assert lora["peak RSS"] == "500.0 MiB (+100.0 MiB)" and lora["weights on disk"] == "68.4 KiB"
    gpu = R.table_rows({**summary(), "runs": [{**summary()["runs"][0], "peak_gpu_bytes": 3 * 2**30}]})[0]["cells"]
    assert gpu[5] == "500.0 MiB (+100.0 MiB); GPU 3.0 GiB"
    assert lora["learning rate"] == "0.003 (sweep 0.000949: 25.0%, 0.003: 50.0%, 0.00949: failed)"
    assert rows[3]["cells"][2] == "failed" and not rows[3]["ok"]


def test_a_loss_table_puts_the_lowest_first():
    s = summary("loss")
    for r in s["runs"]:
        if r["status"] == "ok":
            r["value"] = r["metrics"]["loss"]
    assert [r["label"] for r in R.table_rows(s)][:3] == ["lora", "bitfit", "ia3"]
    assert "lower is better" in R.markdown(s)


def test_markdown_names_the_metric_and_its_direction():
    md = R.markdown(summary())
    assert "held-out exact match on e.jsonl: higher is better" in md
    assert md.count("\n| ") == 5  # the header and four runs
    assert "- prefix_tuning: TrainingAborted" in md


def test_html_is_self_contained(tmp_path):
    s = R.write_report(summary(), tmp_path / "compare")
    page = (tmp_path / "compare" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<script" not in page
    assert "http://" not in page and "https://" not in page and 'src="' not in page.replace('src="data:', "")
    for label in ("lora", "ia3", "bitfit", "prefix_tuning"):
        assert f"<td>{label}</td>" in page
    files = sorted(p.name for p in (tmp_path / "compare").iterdir())
    assert files == ["compare.json", "compare.md", "metric_vs_memory.png", "metric_vs_time.png",
                     "metric_vs_trainable.png", "report.html"]
    assert json.loads((tmp_path / "compare" / "compare.json").read_text())["ranking"][0] == "lora"
    assert s["files"]["html"].endswith("report.html")
    assert [p.name for p in tmp_path.iterdir()] == ["compare"]  # no temporary folder left beside it


def test_a_failed_report_leaves_the_previous_one(tmp_path, monkeypatch):
    R.write_report(summary(), tmp_path / "compare")
    before = (tmp_path / "compare" / "compare.md").read_text()

    def boom(*a):
        raise RuntimeError("disk full")

    monkeypatch.setattr(R, "html_page", boom)
    with pytest.raises(RuntimeError):
        R.write_report({**summary(), "recipe": "other.yaml"}, tmp_path / "compare")
    assert (tmp_path / "compare" / "compare.md").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["compare"]


def test_throughput_counts_this_sessions_steps():
    hist = [{"tokens_per_s": 100.0, "step_s": 0.5}, {"tokens_per_s": 300.0, "step_s": 0.5}]
    assert throughput(hist) == (200, 200.0)
    assert throughput([]) == (0, None)


# ------------------------------------------------------------------------------------------ metric registry
def test_the_metric_follows_what_the_eval_rows_hold(tmp_path):
    from conftest import base_config, write_jsonl

    from tuneforge.config import load_config
    from tuneforge.eval.runs import METRICS, pick_metric

    rows = {"pc": [{"prompt": "a", "completion": "b"}], "chat": [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
        "text": [{"text": "abc"}], "pref": [{"prompt": "a", "chosen": "b", "rejected": "c"}]}
    want = {"pc": "exact_match", "chat": "exact_match", "text": "loss", "pref": "preference_accuracy"}
    for kind, data in rows.items():
        cfg = base_config(tmp_path, write_jsonl(tmp_path / f"{kind}.jsonl", data))
        cfg["data"]["eval"] = str(tmp_path / f"{kind}.jsonl")
        assert pick_metric(load_config(cfg)) == want[kind], kind
    assert list(METRICS)[-1] == "loss"  # the fallback comes last: the first supported entry wins
    assert all(callable(m.compute) and callable(m.supports) and m.label for m in METRICS.values())


def test_step_lines_are_shortened_for_progress():
    from tuneforge.eval.compare import step_line

    line = "step 4/8 | loss 4.697 | lr 0.0001 | grad_norm 0.02 | eval_loss 4.5 | tokens_per_s 128.1 | eta 00:00:03\n"
    assert step_line(line) == "step 4/8 | loss 4.697 | eval_loss 4.5 | eta 00:00:03"
