"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300,
eqs. 3–4): PPO without a value model. For each prompt, G responses are sampled and each one's advantage is its
reward relative to the group,

    Â_i = (r_i − mean(r)) / (std(r) + ε)          (``scale_rewards=False``: r_i − mean(r), as in Dr. GRPO)

and every token of response i is trained with the clipped surrogate plus a KL penalty to the reference policy,

    L = −(1/|o_i|) Σ_t [min(ρ_t Â_i, clip(ρ_t, 1−ε, 1+ε) Â_i) − β D_KL],     ρ_t = π(o_t)/π_old(o_t),

with the unbiased, always-positive k3 estimator D_KL = π_ref/π − log(π_ref/π) − 1 (Schulman 2020,
http://joschu.net/blog/kl-approx.html). Loss normalisation is a local dict of variants:

* ``grpo``: mean over each response's tokens, then over responses (the paper's eq. 3);
* ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-Like Training", https://arxiv.org/abs/2503.20783): sum over
  tokens divided by a constant (the maximum completion length), removing the per-response length bias that makes
  long wrong answers cheap, and (with ``scale_rewards=False``) the std division that overweights easy prompts.

π, π_old and π_ref are all scored at the sampling temperature T (log softmax(z / T)), the distribution the
completions were drawn from: otherwise ρ would be an off-policy ratio with no correction and the KL would compare
other distributions than the sampled one (TRL tempers both the same way; top-k/top-p truncation is not
renormalised, a documented bias). Dropout is off by default (``train.disable_dropout``): π_old and π_ref are
computed without it, so with it on ρ ≠ 1 and KL ≠ 0 at identical weights.

A group's G responses follow one prompt: the rollout prefills it once and repeats its KV cache (``rollout._prefill``),
and π, π_old and π_ref score the group as one packed row with the prompt computed once (``_prefix``), the same
log-probs as G separate rows.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field

from tuneforge.algorithms import _online as O
from tuneforge.algorithms import rewards as R
from tuneforge.algorithms._logps import token_logps_from_model
from tuneforge.algorithms._reference import prepare_reference

DATA_FORMATS = ("prompt_completion", "messages")  # prompts, with reference answers for exact-match rewards
DISABLE_DROPOUT_DEFAULT = True  # ρ = π/π_old and the KL to π_ref compare forwards that must agree at equal weights


class Config(O.Sampling):
    name: Literal["grpo"] = "grpo"
    num_generations: int = Field(4, ge=2, description="G completions sampled per prompt (the group)")
    beta: float = Field(0.04, ge=0, description="weight of the k3 KL penalty to the reference policy")
    clip_eps: float = Field(0.2, gt=0)
    loss_type: Literal["grpo", "dr_grpo"] = "grpo"
    scale_rewards: bool = Field(True, description="divide group advantages by the group's reward std")
    num_iterations: int = Field(1, ge=1, description="optimizer updates per rollout batch (μ in the paper)")
    rewards: list[R.RewardConfig] = Field(default_factory=lambda: [R.ExactMatch()])
    reference: Literal["auto", "adapters_off", "copy"] = "auto"


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True, eps: float = 1e-4
                     ) -> torch.Tensor:
    """(B,) rewards laid out as consecutive groups of ``group_size`` -> (B,) advantages. Equal rewards -> 0."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.view(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale_rewards:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref): exp(ref − logp) − (ref − logp) − 1 (≥ 0, zero when equal)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _grpo_norm(per_token: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    return ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()


def _dr_grpo_norm(per_token: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    return (per_token * mask).sum() / (per_token.shape[0] * max_len)


NORMALISERS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "grpo": _grpo_norm, "dr_grpo": _dr_grpo_norm}


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04, loss_type: str = "grpo",
              max_len: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token log-probs (B, T) of the current, sampling-time and reference policies; advantages (B,); mask (B, T)."""
    if loss_type not in NORMALISERS:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose from {sorted(NORMALISERS)}")
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    stats = {}
    if ref_logp is not None and beta:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        stats["kl"] = ((kl * mask).sum() / mask.sum().clamp_min(1)).detach()
    m = mask.to(per_token.dtype)
    loss = NORMALISERS[loss_type](per_token, m, max_len or mask.shape[1])
    clipped = ((ratio - 1).abs() > clip_eps).to(m.dtype)
    stats["clip_fraction"] = ((clipped * m).sum() / m.sum().clamp_min(1)).detach()
    return loss, stats


# ------------------------------------------------------------------------------------------------- training step
def prepare(model, cfg: Config, state: dict) -> None:
    if cfg.beta:
        prepare_reference(model, cfg.reference, state, "grpo")
    state["reward_fns"] = R.reward_functions(cfg.rewards, like=model)


@torch.no_grad()
def make_experience(model, rows: list[dict], cfg: Config, ctx):
    """Sample G completions per prompt, score them, turn rewards into group advantages, and lay the completions of
    ``ctx.micro_batch`` prompts per micro-batch; groups with any non-finite reward are dropped (counted)."""
    from tuneforge.train.loop import Experience

    G, tok, dev = cfg.num_generations, ctx.algo_state["tokenizer"], O.device_of(model)
    roll, owner = O.roll_out(model, rows, G, cfg, ctx)
    rewards, valid = O.score(roll, rows, owner, ctx.algo_state["reward_fns"], ctx)
    group_ok = valid.view(-1, G).all(1)  # (P,)
    adv = group_advantages(torch.where(valid, rewards, 0.0).float(), G, cfg.scale_rewards)  # (P*G,)
    train_rows = roll.training_rows()
    micro = []
    for groups in O.chunks([g for g in range(len(rows)) if group_ok[g]], ctx.micro_batch):
        idx = [g * G + j for g in groups for j in range(G)]
        batch = O.collate_rows([train_rows[i] for i in idx], tok, dev)
        batch["advantages"] = adv[idx].to(dev)
        if cfg.beta:
            batch["ref_logps"] = O.reference_token_logps(model, batch, ctx.algo_state, cfg.temperature)
        if cfg.num_iterations > 1:  # π_old must be the sampling policy, fixed across the μ updates
            batch["old_logps"] = token_logps_from_model(model, batch, cfg.temperature)[0]
        micro.append(batch)
    n_ok = int(group_ok.sum()) * G
    ok = valid.view(-1, G) & group_ok[:, None]
    metrics = {"reward": float(rewards[ok.flatten()].sum()), "invalid_reward_rate": float((~valid).sum()),
               "completion_len": float(roll.mask.sum()),
               # per completion, its group's reward spread (the loop divides by completions: mean within-group std)
               "reward_std": float(rewards.view(-1, G).float().std(1).nan_to_num(0.0)[group_ok].sum()) * G}
    return Experience(updates=[micro] * cfg.num_iterations, weights=[float(n_ok)] * cfg.num_iterations,
                      metrics=metrics, samples=len(owner))


def step(model, batch: dict, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO objective on one micro-batch of completions, scaled by its share of the update's
    completions so that micro-batches and processes add up to the loss of the whole update."""
    logp, mask = token_logps_from_model(model, batch, cfg.temperature)  # (B, T-1) each, at the sampling T
    old = batch.get("old_logps")
    loss, stats = grpo_loss(logp, logp.detach() if old is None else old, batch.get("ref_logps"),
                            batch["advantages"], mask, cfg.clip_eps, cfg.beta, cfg.loss_type, cfg.max_new_tokens)
    share = logp.shape[0] / max(ctx.normaliser, 1.0)
    return loss * share, {k: float(v) * share for k, v in stats.items()}
