"""PPO for language models (Schulman et al. 2017, https://arxiv.org/abs/1707.06347; as used for RLHF by Ouyang et
al. 2022, https://arxiv.org/abs/2203.02155, eq. 2). Pure pieces of the update:

* per-token rewards: the reward model's score on the last response token, minus a KL penalty β (log π − log π_ref)
  on every token, which keeps the policy near the SFT model the reward model was trained on;
* GAE (Schulman et al. 2016, https://arxiv.org/abs/1506.02438, eq. 16): δ_t = r_t + γ V_{t+1} − V_t,
  Â_t = Σ (γλ)^l δ_{t+l}, returns = Â + V, computed backwards over each response's tokens;
* the clipped surrogate −min(ρ Â, clip(ρ, 1±ε) Â) and the clipped value loss
  ½ max((V − R)², (clip(V, V_old ± ε_v) − R)²), both averaged over response tokens.

PPO-ptx adds γ_ptx × the pretraining/SFT loss to keep the model's general ability (InstructGPT eq. 2).

Choices that make the update the one the equations describe:

* π, π_old and π_ref are scored at the sampling temperature T (log softmax(z / T)), so ρ is on-policy and the KL
  penalty compares the distributions that were sampled (as TRL does; top-k/top-p truncation is not renormalised, a
  documented bias). Dropout is off by default (``train.disable_dropout``): π_old and π_ref are computed without it.
* Advantages are whitened with the statistics of the whole global rollout batch (sums over processes), and the
  minibatches of each epoch are a seeded split of the global batch's completions, not of one process's: 2
  processes take exactly the updates 1 process takes (DT-2).
* The critic is a value head on the policy's own trunk (one forward gives log-probs and values), as in TRL's
  former ``AutoModelForCausalLMWithValueHead``: its loss, weighted by ``vf_coef``, also trains the policy's adapters
  (or weights, under full fine-tuning), so keep ``vf_coef`` small. InstructGPT and TRL's later PPO trainer train a
  separate value model (initialised from the reward model) instead: no interference between the two losses, at the
  cost of a second network's memory and forward per step; tuneforge does not offer that.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tuneforge.algorithms import _online as O
from tuneforge.algorithms import rewards as R
from tuneforge.algorithms._logps import token_cross_entropy_sum, token_logps_and_hidden
from tuneforge.algorithms._reference import prepare_reference
from tuneforge.train import dist as D
from tuneforge.train.rollout import request_seed

DATA_FORMATS = ("prompt_completion", "messages")  # prompts; their completions are the ptx (SFT) data
DISABLE_DROPOUT_DEFAULT = True  # ρ = π/π_old and the KL penalty compare forwards that must agree at equal weights
PER_TOKEN = ("old_logps", "old_values", "returns", "advantages", "response_mask")  # (B, T-1) experience


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
    num_minibatches: int = Field(1, ge=1, description="optimizer updates per pass (a seeded split of the global "
                                                      "batch's completions)")
    whiten_advantages: bool = Field(True, description="normalise advantages over the global rollout batch")
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


def global_mean_std(x: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of values spread over processes; ``reduce`` sums a tensor over processes.

    Two passes in float64 (sum and count, then the sum of squared deviations) rather than one pass of sums of
    squares: the same two small collectives, without the cancellation of E[x²] − E[x]². With one process this is
    ``x.mean()``, ``x.std()``; with several, the statistics of all their values together.
    """
    s = reduce(torch.stack([x.double().sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                              device=x.device)]))
    n = float(s[1])
    mean = s[0] / max(n, 1.0)
    ss = reduce((x.double() - mean).square().sum().reshape(1))[0]
    std = (ss / (n - 1)).sqrt() if n > 1 else torch.zeros_like(ss)
    return mean.to(x.dtype), std.to(x.dtype)


def minibatch_of(ids: list[int], num_minibatches: int, seed: int) -> dict[int, int]:
    """The minibatch (0 .. num_minibatches−1) of every completion id of an update: the ids ordered by a seeded key,
    cut into near-equal contiguous parts. A function of the set of ids only — the global batch — so every process
    assigns its completions exactly as a single process holding them all would."""
    order = sorted(set(ids), key=lambda i: (request_seed(seed, i), i))
    return {i: p * num_minibatches // len(order) for p, i in enumerate(order)}


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
    state["reward_fns"] = R.reward_functions(cfg.rewards, like=model)


def policy_and_values(model, batch: dict, temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs at the sampling temperature (B, T-1), response mask (B, T-1) and values V(s_t)
    (B, T-1), from one forward."""
    logp, mask, hidden = token_logps_and_hidden(model, batch, temperature)
    values = model.value_head(hidden.float()).squeeze(-1)  # (B, T-1)
    return logp, mask, values


def _experience_batch(model, rows: list[dict], scores: torch.Tensor, cfg: Config, ctx) -> dict:
    tok, dev = ctx.algo_state["tokenizer"], O.device_of(model)
    batch = O.collate_rows(rows, tok, dev)
    old_logp, mask, old_values = policy_and_values(model, batch, cfg.temperature)
    ref = O.reference_token_logps(model, batch, ctx.algo_state, cfg.temperature)
    rewards = kl_penalised_rewards(scores.to(dev, old_logp.dtype), old_logp, ref, mask, cfg.kl_coef)
    adv, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
    batch.update(old_logps=old_logp, old_values=old_values, returns=returns, advantages=adv, response_mask=mask)
    batch["kl"] = ((old_logp - ref) * mask).sum(1)  # (B,) per-sequence KL estimate to the reference
    return batch


def whiten_(batches: list[dict], dist: D.Dist) -> None:
    """(Â − mean) / std over every response token of the global rollout batch, in place."""
    flat = [b["advantages"][b["response_mask"].bool()] for b in batches]
    x = torch.cat(flat) if flat else torch.zeros(0, device=dist.device)
    mean, std = global_mean_std(x, lambda t: D.all_reduce_sum_(t, dist))
    for b in batches:
        b["advantages"] = (b["advantages"] - mean) / (std + 1e-8) * b["response_mask"]


def split_samples(batch: dict, rows: list[dict], ptx_rows: list[dict] | None = None) -> list[dict]:
    """One record per completion: its training row (and ptx row) and its per-token experience cut to its length,
    so that any set of completions can be laid into micro-batches again (``join_samples``)."""
    lengths = batch["attention_mask"].sum(1).tolist()
    out = []
    for i, n in enumerate(lengths):
        s = {"row": rows[i], **{k: batch[k][i, :n - 1] for k in PER_TOKEN}}
        if ptx_rows is not None:
            s["ptx_row"] = ptx_rows[i]
        out.append(s)
    return out


def join_samples(samples: list[dict], tok, device) -> dict:
    """A right-padded micro-batch of completion records (padding: zero experience, outside the response mask)."""
    batch = O.collate_rows([s["row"] for s in samples], tok, device)
    width = batch["input_ids"].shape[1] - 1
    for k in PER_TOKEN:
        batch[k] = torch.stack([F.pad(s[k], (0, width - s[k].shape[0])) for s in samples])  # (B, T-1)
    if "ptx_row" in samples[0]:
        ptx = O.collate_rows([s["ptx_row"] for s in samples], tok, device)
        batch.update({f"ptx_{k}": v for k, v in ptx.items()})
    return batch


@torch.no_grad()
def make_experience(model, rows: list[dict], cfg: Config, ctx):
    """One completion per prompt, scored; per-token KL-penalised rewards; GAE advantages (whitened over the global
    rollout batch); then ``ppo_epochs`` passes of ``num_minibatches`` updates over its completions."""
    from tuneforge.train.loop import Experience

    roll, owner = O.roll_out(model, rows, 1, cfg, ctx)
    scores, valid = O.score(roll, rows, owner, ctx.algo_state["reward_fns"], ctx)
    train_rows = roll.training_rows()
    keep = [i for i in range(len(owner)) if valid[i]]
    parts = O.chunks(keep, ctx.micro_batch)
    micro = [_experience_batch(model, [train_rows[i] for i in idx], scores[idx].float(), cfg, ctx) for idx in parts]
    if cfg.whiten_advantages:  # every process joins the sums, with or without completions of its own
        whiten_(micro, ctx.dist)
    samples = []
    for b, idx in zip(micro, parts):  # the ptx data of a completion is its prompt's own training row
        samples += split_samples(b, [train_rows[i] for i in idx], [rows[owner[i]] for i in idx] if cfg.ptx_coef
                                 else None)
    ids = [rows[owner[i]].get("row_id", owner[i]) for i in keep]  # (the seeds' row ids: unique in a global batch)
    updates, weights = _schedule(samples, ids, cfg, ctx, O.device_of(model))
    metrics = {"reward": float(scores[valid].sum()), "invalid_reward_rate": float((~valid).sum()),
               "kl": float(sum(b["kl"].sum() for b in micro)), "completion_len": float(roll.mask.sum())}
    return Experience(updates=updates, weights=weights, metrics=metrics, samples=len(owner))


def _schedule(samples: list[dict], ids: list[int], cfg: Config, ctx, device
              ) -> tuple[list[list[dict]], list[float]]:
    """ppo_epochs × num_minibatches updates. Each epoch splits the *global* batch's completions into minibatches by
    a seed of (run, step, epoch); a process trains its own completions of each minibatch, in micro-batches. Always
    the same number of updates on every process (the loop's collectives depend on it)."""
    tok = ctx.algo_state["tokenizer"]
    everyone = O.gather_ids(ids, ctx.dist)
    updates, weights = [], []
    for epoch in range(cfg.ppo_epochs):
        part = minibatch_of(everyone, cfg.num_minibatches, request_seed(ctx.seed, ctx.step, epoch))
        for k in range(cfg.num_minibatches):
            mine = [s for s, i in zip(samples, ids) if part[i] == k]
            updates.append([join_samples(c, tok, device) for c in O.chunks(mine, ctx.micro_batch)])
            weights.append(float(sum(s["response_mask"].sum() for s in mine)))
    if cfg.ptx_coef:
        _count_ptx_tokens(updates, ctx.dist)
    return updates, weights


def _count_ptx_tokens(updates: list[list[dict]], dist: D.Dist) -> None:
    """Give every micro-batch its update's ptx (SFT) token count over all processes, the SFT term's normaliser."""
    local = [sum(int((b["ptx_labels"][:, 1:] != -100).sum()) for b in micro) for micro in updates]
    total = D.all_reduce_sum_(torch.tensor(local, dtype=torch.float64, device=dist.device), dist).tolist()
    for micro, n in zip(updates, total):
        for b in micro:
            b["ptx_tokens"] = n


def step(model, batch: dict, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss + vf_coef × clipped value loss (+ ptx_coef × SFT loss): token sums over the update's
    response-token total (the SFT term: over its ptx-token total), so micro-batches and processes add up to the
    update's token means."""
    logp, mask, values = policy_and_values(model, batch, cfg.temperature)
    n = mask.sum()
    share = n / max(ctx.normaliser, 1.0)
    pl = policy_loss(logp, batch["old_logps"], batch["advantages"], mask, cfg.clip_eps)
    vl = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip_eps)
    loss = (pl + cfg.vf_coef * vl) * share
    ratio = torch.exp(logp - batch["old_logps"]).detach()
    clipped = float((((ratio - 1).abs() > cfg.clip_eps).float() * mask).sum()) / max(ctx.normaliser, 1.0)
    metrics = {"policy_loss": float(pl.detach() * share), "value_loss": float(vl.detach() * share),
               "clip_fraction": clipped}
    if cfg.ptx_coef and "ptx_input_ids" in batch:  # token sum over the update's ptx tokens (all processes)
        ptx = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_") and k != "ptx_tokens"}
        ce, _ = token_cross_entropy_sum(model, ptx)
        ptx_loss = ce / max(batch["ptx_tokens"], 1.0)
        loss = loss + cfg.ptx_coef * ptx_loss
        metrics["ptx_loss"] = float(ptx_loss.detach())
    return loss, metrics
