"""Parity of the pure loss functions with TRL's (test-only dependency) on identical random float64 tensors.

TRL computes its losses inside trainer methods that also run the model, so each test calls the TRL method unbound,
with a ``SimpleNamespace`` standing in for the trainer and a fake model whose forward returns the per-token
log-probs (or scores) drawn here:

* DPO (sigmoid, cDPO, IPO): ``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss``, reference log-probs
  passed precomputed (``precompute_ref_logps``), one pair per call to get TRL's per-pair losses.
* GRPO loss (grpo, dr_grpo; with and without the k3 KL term): ``trl/trainer/grpo_trainer.py``,
  ``GRPOTrainer._compute_loss``, with ``_get_per_token_logps_and_entropies`` returning the drawn log-probs.
* Reward model (Bradley-Terry, with and without margin): ``trl/trainer/reward_trainer.py``,
  ``RewardTrainer.compute_loss``.
* GRPO group advantages: TRL computes them inline in ``GRPOTrainer._generate_and_score_completions``, which
  generates and scores completions itself and cannot be run on given rewards. ``_trl_group_advantages`` below
  re-derives those lines (branch ``multi_objective_aggregation="sum_then_normalize"``, one reward function of
  weight 1), calling TRL's own ``nanstd``; ``test_trl_advantage_source_is_the_rederived_one`` fails if the lines
  it copies change in TRL's source.

The fakes supply exactly the attributes these methods read in TRL 1.16 (checked at 1.16.0); older TRL releases, whose
trainers are laid out differently, are skipped.

Configuration mapping: tuneforge ``clip_eps`` = TRL ``epsilon`` = ``epsilon_high`` (symmetric clipping); tuneforge
``max_len`` = TRL ``max_completion_length`` (dr_grpo's constant); ``scale_rewards`` True/False = TRL "group"/"none";
std is Bessel-corrected on both sides, + 1e-4. TRL 1.16's DPO ``sigmoid`` loss does not read ``label_smoothing``
(its config documents it only for ``robust`` and ``exo_pair``); the conservative-DPO formula tuneforge's
``label_smoothing`` implements is TRL's ``aot`` loss on a single pair (sorting one element is the identity).
"""

import inspect
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tuneforge.algorithms import dpo, grpo, reward

TRL_MIN = "1.16"
ATOL = 1e-6
F64 = torch.float64


def _trl(module: str):
    pytest.importorskip("trl", minversion=TRL_MIN, reason=f"the fakes follow TRL >= {TRL_MIN} trainer internals")
    return pytest.importorskip(module)


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, sync_gradients=True,
                           gather=lambda x: x, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m,
                           reduce=lambda x, reduction="sum": x)


def _metrics():
    return defaultdict(lambda: defaultdict(list))


# --------------------------------------------------------------------------------------------------------------- DPO
N_PAIRS, SEQ = 8, 14


def _dpo_batch(seed: int) -> dict:
    """Rows [chosen_0..chosen_{n-1}, rejected_0..rejected_{n-1}] laid out as TRL's collator does: prompt, then
    completion (completion_mask 1), then right padding; unequal prompt and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * N_PAIRS
    prompt_len = torch.randint(1, 5, (N_PAIRS,), generator=g).repeat(2)
    comp_len = torch.randint(1, SEQ - 4, (rows,), generator=g)
    pos = torch.arange(SEQ)
    completion_mask = ((pos >= prompt_len[:, None]) & (pos < (prompt_len + comp_len)[:, None])).long()
    attention_mask = (pos < (prompt_len + comp_len)[:, None]).long()
    input_ids = torch.randint(3, 50, (rows, SEQ), generator=g) * attention_mask
    shift = completion_mask[:, 1:].to(F64)
    # per-token log-probs at scored positions (zero elsewhere, as TRL's fused head returns for label -100)
    policy = -torch.rand(rows, SEQ - 1, generator=g, dtype=F64) * 3 * shift
    ref = (policy + torch.randn(rows, SEQ - 1, generator=g, dtype=F64) * 0.5).clamp(max=0) * shift
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "policy_token_logps": policy, "ref_logps": ref.sum(1), "tokens": completion_mask.sum(1).to(F64)}


class _FakeCausalLM:
    """Stands in for the model in ``DPOTrainer._compute_loss``: returns the drawn per-token log-probs."""

    def __init__(self, token_logps: torch.Tensor, completion_mask: torch.Tensor):
        self.token_logps, self.completion_mask = token_logps, completion_mask

    def __call__(self, input_ids, attention_mask=None, labels=None, **_):
        assert torch.equal(labels[:, 1:] != -100, self.completion_mask[:, 1:].bool())  # scored = completion tokens
        lp = self.token_logps
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool))


def _fake_dpo_trainer(loss_type: str, beta: float, label_smoothing: float = 0.0):
    return SimpleNamespace(
        model=SimpleNamespace(training=False), accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics=_metrics(),
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))


def _trl_dpo(batch: dict, loss_type: str, beta: float, label_smoothing: float = 0.0, pairs=None):
    """TRL's DPO loss: the batch mean over ``pairs`` (default all), plus the trainer holding its logged metrics."""
    trl_dpo = _trl("trl.trainer.dpo_trainer")
    n = N_PAIRS
    pairs = list(range(n)) if pairs is None else list(pairs)
    rows = torch.tensor(pairs + [n + i for i in pairs])
    ref = batch["ref_logps"]
    inputs = {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows],
              "completion_mask": batch["completion_mask"][rows],
              "ref_chosen_logps": ref[:n][pairs], "ref_rejected_logps": ref[n:][pairs]}
    fake = _fake_dpo_trainer(loss_type, beta, label_smoothing)
    model = _FakeCausalLM(batch["policy_token_logps"][rows], inputs["completion_mask"])
    loss = trl_dpo.DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return loss, fake


def _trl_dpo_per_pair(batch: dict, loss_type: str, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return torch.stack([_trl_dpo(batch, loss_type, beta, label_smoothing, pairs=[i])[0] for i in range(N_PAIRS)])


def _ours_dpo(batch: dict, loss_type: str, beta: float, label_smoothing: float = 0.0):
    n = N_PAIRS
    logps, ref, tokens = batch["policy_token_logps"].sum(1), batch["ref_logps"], batch["tokens"]
    return dpo.dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=beta, loss_type=loss_type,
                        label_smoothing=label_smoothing, chosen_tokens=tokens[:n], rejected_tokens=tokens[n:])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_trl(beta):
    batch = _dpo_batch(seed=0)
    ours, stats = _ours_dpo(batch, "sigmoid", beta)
    theirs = _trl_dpo_per_pair(batch, "sigmoid", beta)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0), (ours, theirs)
    mean, fake = _trl_dpo(batch, "sigmoid", beta)
    assert abs(ours.mean().item() - mean.item()) < ATOL
    logged = {k: v[0] for k, v in fake._metrics["eval"].items()}
    assert logged["rewards/chosen"] == pytest.approx(stats["reward_chosen"].mean().item(), abs=ATOL)
    assert logged["rewards/rejected"] == pytest.approx(stats["reward_rejected"].mean().item(), abs=ATOL)
    assert logged["rewards/margins"] == pytest.approx(stats["reward_margin"].mean().item(), abs=ATOL)
    assert logged["rewards/accuracies"] == pytest.approx(stats["preference_accuracy"].mean().item(), abs=ATOL)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_dpo_label_smoothing_matches_trl_conservative_dpo(label_smoothing):
    """cDPO −(1−ε) log σ(βΔ) − ε log σ(−βΔ): in TRL 1.16 this expression is the ``aot`` loss, exact for one pair."""
    batch = _dpo_batch(seed=1)
    ours, _ = _ours_dpo(batch, "sigmoid", 0.2, label_smoothing)
    theirs = _trl_dpo_per_pair(batch, "aot", 0.2, label_smoothing)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0), (ours, theirs)


def test_trl_sigmoid_ignores_label_smoothing():
    """Config mapping, not a numerical fault: a TRL 1.16 recipe with ``loss_type="sigmoid"`` and
    ``label_smoothing=ε`` trains plain DPO, i.e. tuneforge ``label_smoothing: 0``; tuneforge's ``label_smoothing``
    is conservative DPO (the sigmoid loss's meaning in earlier TRL releases)."""
    batch = _dpo_batch(seed=2)
    theirs = _trl_dpo_per_pair(batch, "sigmoid", 0.2, label_smoothing=0.2)
    plain, _ = _ours_dpo(batch, "sigmoid", 0.2, 0.0)
    smoothed, _ = _ours_dpo(batch, "sigmoid", 0.2, 0.2)
    assert torch.allclose(plain, theirs, atol=ATOL, rtol=0), (
        "TRL's sigmoid DPO with label_smoothing=0.2 no longer equals plain DPO: TRL now applies label smoothing to "
        f"the sigmoid loss; re-check the label_smoothing mapping. plain={plain}, trl={theirs}")
    assert not torch.allclose(smoothed, theirs, atol=1e-3), "expected cDPO (ε=0.2) to differ from plain DPO"


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_ipo_matches_trl(beta):
    """IPO on token-averaged log-ratios: TRL divides by ``completion_mask.sum(1)`` of each response."""
    batch = _dpo_batch(seed=3)
    ours, _ = _ours_dpo(batch, "ipo", beta)
    theirs = _trl_dpo_per_pair(batch, "ipo", beta)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0), (ours, theirs)
    assert abs(ours.mean().item() - _trl_dpo(batch, "ipo", beta)[0].item()) < ATOL


# -------------------------------------------------------------------------------------------------------------- GRPO
LENGTHS = [7, 3, 5, 1, 6, 2]  # completion lengths; padded to T = 7
MAX_COMPLETION = 10  # dr_grpo's constant: longer than any completion in the batch, as in real runs


def _grpo_tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, t = len(LENGTHS), max(LENGTHS)
    mask = (torch.arange(t) < torch.tensor(LENGTHS)[:, None]).long()
    old = -torch.rand(b, t, generator=g, dtype=F64) * 2 - 0.05
    logp = old + torch.randn(b, t, generator=g, dtype=F64) * 0.3  # ratios spread past 1 ± 0.2 both ways
    ref = old + torch.randn(b, t, generator=g, dtype=F64) * 0.3
    adv = torch.randn(b, generator=g, dtype=F64)
    return {"logp": logp, "old": old, "ref": ref, "adv": adv, "mask": mask}


def _trl_grpo_loss(x: dict, logp: torch.Tensor, loss_type: str, beta: float, eps: float):
    trl_grpo = _trl("trl.trainer.grpo_trainer")
    b, t = x["mask"].shape
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type, epsilon_low=eps,
        epsilon_high=eps, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=False), current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=_metrics(), accelerator=_accelerator())
    inputs = {"prompt_ids": torch.ones(b, 3, dtype=torch.long), "prompt_mask": torch.ones(b, 3, dtype=torch.long),
              "completion_ids": torch.ones(b, t, dtype=torch.long) * x["mask"], "completion_mask": x["mask"],
              "advantages": x["adv"], "old_per_token_logps": x["old"]}
    if beta != 0.0:
        inputs["ref_per_token_logps"] = x["ref"]
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, fake


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04, 0.3])
def test_grpo_loss_matches_trl(loss_type, beta):
    x = _grpo_tensors(seed=4)
    eps = 0.2
    theirs_logp = x["logp"].clone().requires_grad_(True)
    theirs, fake = _trl_grpo_loss(x, theirs_logp, loss_type, beta, eps)
    theirs.backward()
    ours_logp = x["logp"].clone().requires_grad_(True)
    ours, stats = grpo.grpo_loss(ours_logp, x["old"], x["ref"], x["adv"], x["mask"], clip_eps=eps, beta=beta,
                                 loss_type=loss_type, max_len=MAX_COMPLETION)
    ours.backward()
    ratio = torch.exp(x["logp"] - x["old"])[x["mask"].bool()]
    assert (ratio > 1 + eps).any() and (ratio < 1 - eps).any()  # both clip edges are exercised
    assert abs(ours.item() - theirs.item()) < ATOL, (ours.item(), theirs.item())
    assert torch.allclose(ours_logp.grad, theirs_logp.grad, atol=ATOL, rtol=0)
    if beta:
        assert stats["kl"].item() == pytest.approx(fake._metrics["eval"]["kl"][0], abs=ATOL)


def test_grpo_loss_without_reference_matches_trl_beta_zero():
    x = _grpo_tensors(seed=5)
    for loss_type in ("grpo", "dr_grpo"):
        theirs, _ = _trl_grpo_loss(x, x["logp"], loss_type, 0.0, 0.2)
        ours, _ = grpo.grpo_loss(x["logp"], x["old"], None, x["adv"], x["mask"], clip_eps=0.2, beta=0.04,
                                 loss_type=loss_type, max_len=MAX_COMPLETION)
        assert abs(ours.item() - theirs.item()) < ATOL, (loss_type, ours.item(), theirs.item())


def test_grpo_k3_kl_matches_trl_per_token_kl():
    """k3 alone: TRL logs its per-token KL's masked mean as "kl"."""
    x = _grpo_tensors(seed=6)
    ours = grpo.k3_kl(x["logp"], x["ref"])
    mask = x["mask"].bool()
    _, fake = _trl_grpo_loss(x, x["logp"], "grpo", 0.04, 0.2)
    assert fake._metrics["eval"]["kl"][0] == pytest.approx(ours[mask].mean().item(), abs=ATOL)
    assert (ours[mask] >= 0).all()


# ---------------------------------------------------------------------------------------------- GRPO advantages
def _trl_group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """Line-for-line from trl/trainer/grpo_trainer.py (1.16.0), GRPOTrainer._generate_and_score_completions,
    ``multi_objective_aggregation == "sum_then_normalize"`` with one reward function of weight 1."""
    from trl.trainer.utils import nanstd

    rewards_per_func = rewards[:, None]
    reward_weights = torch.ones(1, dtype=rewards.dtype)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    assert scale_rewards in ["group", "none"]
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


COPIED_LINES = [
    'if self.multi_objective_aggregation == "sum_then_normalize":',
    "rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)",
    "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
    "mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)",
    'if self.scale_rewards in ["group", "none"]:',
    "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
    "std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)",
    "advantages = rewards - mean_grouped_rewards",
    'if self.scale_rewards != "none":',
    "advantages = advantages / (std_rewards + 1e-4)",
    "advantages = torch.nan_to_num(advantages, nan=0.0)",
]


def test_trl_advantage_source_is_the_rederived_one():
    trl_grpo = _trl("trl.trainer.grpo_trainer")
    src = inspect.getsource(trl_grpo.GRPOTrainer._generate_and_score_completions)
    missing = [line for line in COPIED_LINES if line not in src]
    assert not missing, f"TRL's GRPO advantage code changed; re-derive _trl_group_advantages. Missing: {missing}"
    cfg_src = inspect.getsource(_trl("trl.trainer.grpo_config").GRPOConfig.__post_init__)
    assert '{True: "group", False: "none"}' in cfg_src  # scale_rewards True/False -> "group"/"none"
    assert "nanstd(" in src and "nanstd" in vars(trl_grpo)


@pytest.mark.parametrize("scale_rewards", [True, False])
@pytest.mark.parametrize("group_size", [2, 4])
def test_grpo_group_advantages_match_trl(scale_rewards, group_size):
    _trl("trl.trainer.utils")
    g = torch.Generator().manual_seed(7)
    groups = [torch.randn(group_size, generator=g, dtype=F64) * 2,  # continuous rewards
              torch.tensor([1.0, 0.0] * (group_size // 2), dtype=F64),  # pass/fail rewards
              torch.full((group_size,), 0.7, dtype=F64),  # all equal: zero advantage
              torch.rand(group_size, generator=g, dtype=F64) * 1e-3]  # tiny spread: eps dominates the std
    rewards = torch.cat(groups)
    ours = grpo.group_advantages(rewards.clone(), group_size, scale_rewards=scale_rewards)
    theirs = _trl_group_advantages(rewards.clone(), group_size, "group" if scale_rewards else "none")
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0), (ours, theirs)
    assert torch.equal(ours[2 * group_size:3 * group_size], torch.zeros(group_size, dtype=F64))


# ------------------------------------------------------------------------------------------------------------ reward
class _FakeRewardModel:
    def __init__(self, scores: torch.Tensor):
        self.scores = scores

    def __call__(self, **_):
        return SimpleNamespace(logits=self.scores[:, None])


def _trl_reward_loss(r_c: torch.Tensor, r_r: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
    trl_reward = _trl("trl.trainer.reward_trainer")
    fake = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=None),
                           accelerator=_accelerator(), _metrics=_metrics(), _total_train_tokens=0, _tp_size=1)
    n = r_c.shape[0]
    inputs = {"input_ids": torch.ones(2 * n, 4, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, 4, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return trl_reward.RewardTrainer.compute_loss(fake, _FakeRewardModel(torch.cat([r_c, r_r])), inputs)


@pytest.mark.parametrize("margin", [None, "scalar", "per_pair"])
def test_reward_bradley_terry_matches_trl(margin):
    g = torch.Generator().manual_seed(8)
    n = 16
    r_c, r_r = torch.randn(n, generator=g, dtype=F64) * 2, torch.randn(n, generator=g, dtype=F64) * 2
    m = {None: None, "scalar": torch.full((n,), 0.75, dtype=F64),
         "per_pair": torch.rand(n, generator=g, dtype=F64) * 2}[margin]
    ours, stats = reward.bradley_terry_loss(r_c, r_r, 0.75 if margin == "scalar" else (0.0 if m is None else m))
    theirs = torch.stack([_trl_reward_loss(r_c[i:i + 1], r_r[i:i + 1], None if m is None else m[i:i + 1])
                          for i in range(n)])
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0), (ours, theirs)
    assert abs(ours.mean().item() - _trl_reward_loss(r_c, r_r, m).item()) < ATOL
