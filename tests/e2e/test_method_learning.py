"""Every method learns the demo's held-out task (string reversal, 0% before) on the demo's pretrained base, with the
set-ups of ``tuneforge.demo.LEARNING_SETUPS`` (the table in benchmarks/method_learning.py).

Where the numbers come from: ``python benchmarks/method_learning.py --seeds 0,1,2,3,4`` (results in
benchmarks/results/method_learning.json; AMD EPYC, AVX2 kernels, 2 shared cores) ran each set-up with 5 fine-tuning
seeds. ``WORST_OF_SEEDS`` is the lowest held-out exact match of the 5. The spread is wide for the methods that only
learn part of the task (freeze 20.5–42%, bitfit 47.5–72%, ia3 21–34%, sparse 68–88.5%), and another CPU's float
rounding (AVX-512 vs AMX matmul kernels) moves a run as another seed does: a trajectory that rounds differently early
ends elsewhere in that range (diff pruning's former set-up, projected only at the end: 17.5% in the previous table,
18.5% here, 7.5% on an Intel AMX machine). So the test asserts, for seed 0, ``after >= before +
max(0.05, worst/2)``: half of the worst seed measured, at least 5 points. That leaves ≥ 10 points below the worst seed
for every method (≥ 23 for all but freeze and ia3), and still fails when a method stops learning (0% before).
"""

import pytest

from tuneforge.demo import LEARNING_SETUPS, DemoPlan, finetune

pytestmark = pytest.mark.slow

# lowest held-out exact match over fine-tuning seeds 0-4 (benchmarks/results/method_learning.json, "after_min")
WORST_OF_SEEDS = {"full": 1.0, "freeze (top 2 blocks)": 0.205, "bitfit (added biases)": 0.475,
                  "diff_pruning (5%)": 0.98, "sparse (FISH 5%)": 0.68, "lora r8": 0.99, "dora r8": 0.99,
                  "qlora r8 (nf4)": 0.985, "lokr r8": 0.965, "ia3": 0.21,
                  # benchmarks/results/method_learning_bottleneck.json (Intel Xeon, seeds 0-4)
                  "houlsby (m = d/16)": 0.815, "pfeiffer (m = d/2)": 0.39, "parallel (m = d/16; s = 4)": 0.44,
                  "scaled_parallel (m = d/16)": 0.365,
                  # benchmarks/results/method_learning_soft.json (AMD EPYC, seeds 0-4)
                  "prefix_tuning (n = 20)": 0.31, "prefix_tuning (projection; n = 20)": 0.39,
                  "p_tuning_v2 (n = 20)": 0.325}
# Input-level soft prompts barely move exact match on this 4-block model (prompt tuning 3.5-8%, P-tuning 0-4.5%:
# Lester et al.'s finding that prompt tuning needs scale), but they do learn: held-out answer loss from 4.95 to at
# worst these (method_learning_soft.json, "loss_after"). Their test asserts half of that worst drop.
LOSS_WORST = {"prompt_tuning (n = 20)": 2.1648, "p_tuning (MLP; n = 20)": 2.8853}


def margin(label: str) -> float:
    return max(0.05, WORST_OF_SEEDS[label] / 2)


def test_every_setup_has_a_measured_margin():
    assert set(WORST_OF_SEEDS) | set(LOSS_WORST) == set(LEARNING_SETUPS)
    assert not set(WORST_OF_SEEDS) & set(LOSS_WORST)


@pytest.mark.parametrize("label", list(LEARNING_SETUPS))
def test_method_lifts_held_out_exact_match(demo_base, tmp_path, label):
    base, _ = demo_base
    method, lr = LEARNING_SETUPS[label]
    r = finetune(base, tmp_path, DemoPlan(), method=method, lr=lr, log=lambda *_: None)
    assert r["exact_match_before"] < 0.05, r
    if label in LOSS_WORST:
        before = r["held_out_loss_before"]
        assert r["held_out_loss_after"] <= before - (before - LOSS_WORST[label]) / 2, (label, r)
        return
    assert r["exact_match_after"] >= r["exact_match_before"] + margin(label), (label, r["exact_match_after"],
                                                                                margin(label))
