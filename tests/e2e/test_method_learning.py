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
                  "p_tuning_v2 (n = 20)": 0.325,
                  # benchmarks/results/method_learning_adapters.json (AMD EPYC, seeds 0-4)
                  "compacter (m = d/32)": 0.32, "compacter_pp (m = d/2)": 0.09,
                  "houlsby + adapter_drop (robust k <= 2)": 0.115, "intrinsic (SAID d = 10000)": 0.875}
# Input-level soft prompts barely move exact match on this 4-block model (prompt tuning 3.5-8%, P-tuning 0-4.5%:
# Lester et al.'s finding that prompt tuning needs scale), but they do learn: held-out answer loss from 4.95 to at
# worst these (method_learning_soft.json, "loss_after"). Their test asserts half of that worst drop.
LOSS_WORST = {"prompt_tuning (n = 20)": 2.1648, "p_tuning (MLP; n = 20)": 2.8853,
              # AdapterBias (2d + 1 numbers per block) moves exact match 3.5-9.5% on this model, its loss reliably
              "adapter_bias": 1.7843}
# Set-ups the benchmark reports but no test asserts, with why: on this 4-block model, dropping block 0's adapters
# (a fixed k = 1) leaves reversal unlearnable (0-0.5%; Houlsby without block 0's adapters and no AdapterDrop does the
# same, LoRA without block 0 falls from 99% to 23%), and a plain random subspace of d = 10000 at one learning rate
# spreads from 6% to 76.5% over seeds (SAID's per-layer scales make it 87.5-96%: that row is tested)
BENCHMARK_ONLY = {"houlsby + adapter_drop (k = 1)", "intrinsic (fastfood d = 10000)"}


def margin(label: str) -> float:
    return max(0.05, WORST_OF_SEEDS[label] / 2)


def test_every_setup_has_a_measured_margin():
    assert set(WORST_OF_SEEDS) | set(LOSS_WORST) | BENCHMARK_ONLY == set(LEARNING_SETUPS)
    assert not set(WORST_OF_SEEDS) & set(LOSS_WORST)


@pytest.mark.parametrize("label", [k for k in LEARNING_SETUPS if k not in BENCHMARK_ONLY])
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


# UniPELT (Mao et al. 2022), a set-up of the benchmark's own (benchmarks/method_learning.py, EXTRA_SETUPS):
# benchmarks/results/method_learning_unipelt.json (AMD EPYC, seeds 0-4, about 10 s a run) has 88-99.5%, the same
# mixture without gates 96.5-99.5% and LoRA r8 95-99% on the same base. Same rule: half of the worst seed.
UNIPELT = ({"name": "unipelt"}, 1e-2)
UNIPELT_WORST = 0.88


def test_unipelt_lifts_held_out_exact_match(demo_base, tmp_path):
    base, _ = demo_base
    method, lr = UNIPELT
    r = finetune(base, tmp_path, DemoPlan(), method=method, lr=lr, log=lambda *_: None)
    assert r["exact_match_before"] < 0.05, r
    assert r["exact_match_after"] >= r["exact_match_before"] + max(0.05, UNIPELT_WORST / 2), r


# AdapterFusion (benchmarks/results/method_learning_adapters.json, "fusion"): two Houlsby members, one trained on
# reversal and one on "max"; the fusion, trained on reversal, reached 81-90.5% and beat the reversal member alone
# (74.5-85%) on every seed 0-4, by 4 to 9.5 points.
FUSION_WORST = {"fusion": 0.81, "gain_over_member": 0.04}


def test_fusion_of_two_trained_adapters_learns_the_task(demo_base, tmp_path):
    import dataclasses

    base, _ = demo_base
    plan, quiet = DemoPlan(), (lambda *_: None)
    rev = finetune(base, tmp_path / "rev", plan, method={"name": "houlsby"}, lr=3e-2, log=quiet)
    other = finetune(base, tmp_path / "max", dataclasses.replace(plan, task="max"), method={"name": "houlsby"},
                     lr=3e-2, log=quiet)
    fused = finetune(base, tmp_path / "fusion", plan, method={"name": "adapter_fusion",
                                                              "adapters": [rev["adapter"], other["adapter"]]},
                     lr=1e-3, log=quiet)
    assert fused["exact_match_after"] >= fused["exact_match_before"] + FUSION_WORST["fusion"] / 2, fused
    # it does not lose what the reversal member knows (the paper's claim is that it gains; a margin for rounding)
    assert fused["exact_match_after"] >= rev["exact_match_after"] - 0.1, (fused, rev)
