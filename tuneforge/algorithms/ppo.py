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

import random
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tuneforge.algorithms import _online as O
from tuneforge.algorithms import rewards as R
from tuneforge.algorithms._logps import token_cross_entropy_sum, token_logps_and_hidden
from tuneforge.algorithms._reference import prepare_reference, reference_token_logps
from tuneforge.train.rollout import request_seed

DATA_FORMATS = ("prompt_completion", "messages")  # prompts; their completions are the ptx (SFT) data


class Config(O.Sampling):
    name: Literal["ppo"] = "ppo"
    rewards: list[R.RewardConfig] = Field(default_factory=lambda: [R.ExactMatch()],
                                          description="reward functions and/or a reward model, weighted")
    kl_coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty to the reference")
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_eps: float = Field(0.2, gt=0)
    value_clip_eps: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    num_minibatches: int = Field(1, ge=1, description="optimizer updates per pass")
    whiten_advantages: bool = True
    ptx_coef: float = Field(0.0, ge=0, description="γ of PPO-ptx: weight of the SFT loss on the prompt rows")
    reference: Literal["auto", "adapters_off", "copy"] = "auto"


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


# ------------------------------------------------------------------------------------------------- training step
def attach_value_head(model: nn.Module) -> nn.Linear:
    """The critic: a linear head ``model.value_head`` on the policy's last hidden state (fp32, zero init, so
    V = 0 before training and the first advantages are the plain returns)."""
    if not hasattr(model, "value_head"):
        dev = next(model.parameters()).device
        model.value_head = nn.Linear(model.config.hidden_size, 1, device=dev, dtype=torch.float32)
        nn.init.zeros_(model.value_head.weight)
        nn.init.zeros_(model.value_head.bias)
    model.value_head.requires_grad_(True)
    return model.value_head


def prepare(model, cfg: Config, state: dict) -> None:
    prepare_reference(model, cfg.reference, state, "ppo")
    attach_value_head(model)
    state["reward_fns"] = R.reward_functions(cfg.rewards)


def policy_and_values(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, T-1), response mask (B, T-1) and values V(s_t) (B, T-1), from one forward."""
    logp, mask, hidden = token_logps_and_hidden(model, batch)
    values = model.value_head(hidden.float()).squeeze(-1)  # (B, T-1)
    return logp, mask, values


def _experience_batch(model, rows: list[dict], scores: torch.Tensor, cfg: Config, ctx) -> dict:
    tok, dev = ctx.algo_state["tokenizer"], O.device_of(model)
    batch = O.collate_rows(rows, tok, dev)
    old_logp, mask, old_values = policy_and_values(model, batch)
    ref = reference_token_logps(model, batch, ctx.algo_state)
    rewards = kl_penalised_rewards(scores.to(dev, old_logp.dtype), old_logp, ref, mask, cfg.kl_coef)
    adv, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
    batch.update(old_logps=old_logp, old_values=old_values, returns=returns, advantages=adv, response_mask=mask)
    batch["kl"] = ((old_logp - ref) * mask).sum(1)  # (B,) per-sequence KL estimate to the reference
    return batch


@torch.no_grad()
def make_experience(model, rows: list[dict], cfg: Config, ctx):
    """One completion per prompt, scored; per-token KL-penalised rewards; GAE advantages (whitened over the whole
    rollout batch); then ``ppo_epochs`` passes of ``num_minibatches`` updates over its micro-batches."""
    from tuneforge.train.loop import Experience

    roll, owner = O.roll_out(model, rows, 1, cfg, ctx)
    scores, valid = O.score(roll, rows, owner, ctx.algo_state["reward_fns"], ctx)
    train_rows = roll.training_rows()
    keep = [i for i in range(len(owner)) if valid[i]]
    micro = [_experience_batch(model, [train_rows[i] for i in idx], scores[idx].float(), cfg, ctx)
             for idx in O.chunks(keep, ctx.micro_batch)]
    if cfg.whiten_advantages and micro:  # (Â − mean) / std over every response token of the rollout batch
        flat = torch.cat([b["advantages"][b["response_mask"].bool()] for b in micro])
        mean = flat.mean()
        std = flat.std().nan_to_num(0.0) if flat.numel() > 1 else flat.new_tensor(0.0)
        for b in micro:
            b["advantages"] = (b["advantages"] - mean) / (std + 1e-8) * b["response_mask"]
    if cfg.ptx_coef:
        for b, idx in zip(micro, O.chunks(keep, ctx.micro_batch)):
            ptx = O.collate_rows([rows[owner[i]] for i in idx], ctx.algo_state["tokenizer"], O.device_of(model))
            b.update({f"ptx_{k}": v for k, v in ptx.items()})
    updates, weights = _schedule(micro, cfg, ctx)
    metrics = {"reward": float(scores[valid].sum()), "invalid_reward_rate": float((~valid).sum()),
               "kl": float(sum(b["kl"].sum() for b in micro)), "completion_len": float(roll.mask.sum())}
    return Experience(updates=updates, weights=weights, metrics=metrics, samples=len(owner))


def _schedule(micro: list[dict], cfg: Config, ctx) -> tuple[list[list[dict]], list[float]]:
    """ppo_epochs × num_minibatches updates; micro-batches reshuffled each epoch by a seed of (run, step, epoch).
    Always the same number of updates on every process (the loop's collectives depend on it)."""
    updates, weights = [], []
    for epoch in range(cfg.ppo_epochs):
        order = list(range(len(micro)))
        random.Random(request_seed(ctx.seed, ctx.step, epoch)).shuffle(order)
        for k in range(cfg.num_minibatches):
            part = [micro[i] for i in order[k::cfg.num_minibatches]]
            updates.append(part)
            weights.append(float(sum(b["response_mask"].sum() for b in part)))
    return updates, weights


def step(model, batch: dict, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss + vf_coef × clipped value loss (+ ptx_coef × SFT loss), token sums over the update's
    response-token total, so micro-batches and processes add up to the update's token mean."""
    logp, mask, values = policy_and_values(model, batch)
    n = mask.sum()
    share = n / max(ctx.normaliser, 1.0)
    pl = policy_loss(logp, batch["old_logps"], batch["advantages"], mask, cfg.clip_eps)
    vl = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip_eps)
    loss = (pl + cfg.vf_coef * vl) * share
    ratio = torch.exp(logp - batch["old_logps"]).detach()
    clipped = float((((ratio - 1).abs() > cfg.clip_eps).float() * mask).sum()) / max(ctx.normaliser, 1.0)
    metrics = {"policy_loss": float(pl) * float(share), "value_loss": float(vl) * float(share),
               "clip_fraction": clipped}
    if cfg.ptx_coef and "ptx_input_ids" in batch:
        ptx = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")}
        ce, k = token_cross_entropy_sum(model, ptx)
        ptx_loss = ce / max(k, 1)
        loss = loss + cfg.ptx_coef * ptx_loss * share
        metrics["ptx_loss"] = float(ptx_loss) * float(share)
    return loss, metrics
