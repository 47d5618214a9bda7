"""The online algorithms learn: from an SFT'd tiny model at ~1/3 held-out exact match on string reversal, GRPO,
PPO, rejection sampling and online DPO with an exact-match reward each raise held-out exact match (the figures
measured by ``benchmarks/algorithm_learning.py`` are in ``benchmarks/results/algorithm_learning.json``; each test
asks for a third of its measured gain, because the SFT start itself moves with the CPU's float rounding: 25.5% on
an AMD EPYC, 33.5% on an Intel Xeon, 18% on another machine of this kind); PPO's reward rises while its KL to the reference stays bounded; and an RLAIF
judge LM labels held-out preference pairs in agreement with the rule far above chance."""

import json
import statistics
from pathlib import Path

import pytest

from tuneforge.eval.learning import accuracy, judge_agreement, online_run, sft_start

pytestmark = pytest.mark.slow
MEASURED = {r["algorithm"]: r for r in json.loads(
    (Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "algorithm_learning.json").read_text())["rows"]}


@pytest.fixture(scope="module")
def start(demo_base, tmp_path_factory):
    base, _ = demo_base
    model = sft_start(base, tmp_path_factory.mktemp("sft_start"))
    return model, accuracy(model)


@pytest.mark.parametrize("name", ["grpo", "ppo", "rejection_sampling", "online_dpo"])
def test_online_algorithm_raises_held_out_exact_match(start, tmp_path, name):
    model, before = start
    r = online_run(model, tmp_path / name, name)
    gain = MEASURED[name]["exact_match_after"] - MEASURED[name]["before"]
    assert r["exact_match_after"] >= before + max(0.05, gain / 3), (name, before, r["exact_match_after"])
    if name == "ppo":
        h = r["history"]
        k = len(h) // 5
        first, last = statistics.fmean(x["reward"] for x in h[:k]), statistics.fmean(x["reward"] for x in h[-k:])
        assert last > first, (first, last)
        assert max(x["kl"] for x in h) < 10.0  # nats per completion of ≤ 8 tokens: bounded by the KL penalty


def test_rlaif_judge_recovers_the_rule_better_than_chance(demo_base, tmp_path):
    base, _ = demo_base
    r = judge_agreement(base, tmp_path)
    assert r["agreement"] >= 0.70, r
