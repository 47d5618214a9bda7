"""PPO for language models (Schulman et al. 2017, https://arxiv.org/abs/1707.06347; as used for RLHF by Ouyang et
al. 2022, https://arxiv.org/abs/2203.02155, eq. 2). Pure pieces of the update:

* per-token rewards: the reward model's score on the last response token, minus a KL penalty β (log π − log π_ref)
  on every token, which keeps the policy near the SFT model the reward model was trained on;
* GAE (Schulman et al. 2016, https://arxiv.org/abs/1506.02438, eq. 16): δ_t = r_t + γ V_{t+1} − V_t,
  Â_t = Σ (γλ)^l δ_{t+l}, returns = Â + V, computed backwards over each response's tokens;
* the clipped surrogate −min(ρ Â, clip(ρ, 1±ε) Â) and the clipped value loss
  ½ max((V − R)², (clip(V, V_old ± ε_v) − R)²), both averaged over response tokens.

PPO-ptx adds γ_ptx × the pretraining/SFT loss to keep the model's general ability (InstructGPT eq. 2).
"""

from __future__ import annotations

import torch


def kl_penalised_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """(B, T) per-token rewards: −β(log π − log π_ref) on each response token, + the score on the last one."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()
    return rewards + last.to(rewards.dtype) * scores[:, None]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T); positions outside ``mask`` are zero and do not bootstrap."""
    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
        next_value = values[:, t] * m[:, t]
    return adv, (adv + values) * m


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2) -> torch.Tensor:
    ratio = torch.exp(logp - old_logp)
    return masked_mean(-torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float = 0.2) -> torch.Tensor:
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
