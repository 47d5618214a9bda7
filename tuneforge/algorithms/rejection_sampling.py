"""Rejection-sampling fine-tuning (best-of-N): sample N completions per prompt, score them with a reward model or
function, keep the best one (optionally only when its reward clears a threshold) and train on it with the SFT loss.

This is the "rejection sampling" stage of Llama 2 (Touvron et al. 2023, https://arxiv.org/abs/2307.09288, sec.
3.2.3), RAFT (Dong et al. 2023, https://arxiv.org/abs/2304.06767) and ReST's Improve step (Gulcehre et al. 2023):
maximising E[r] by imitating the policy's own best samples, with no value model and no ratio clipping. Here it runs
batch by batch (as RAFT does): each loop step samples for its prompts with the *current* policy and trains
``sft_epochs`` updates on what it kept; R rounds over the prompt set are ``train.epochs: R``.

Loss: L = −(1/N) Σ_t log π(y_t | y_<t, x) over the N tokens of the kept completions of the whole update (the SFT
normalisation, so accumulation and processes add up exactly).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tuneforge.algorithms import _online as O
from tuneforge.algorithms import rewards as R
from tuneforge.algorithms._logps import token_cross_entropy_sum

DATA_FORMATS = ("prompt_completion", "messages")
DISABLE_DROPOUT_DEFAULT = False  # SFT's loss on kept samples: no ratio or reference to agree with


class Config(O.Sampling):
    name: Literal["rejection_sampling"] = "rejection_sampling"
    num_samples: int = Field(4, ge=1, description="N completions per prompt; the best one is kept")
    threshold: float | None = Field(None, description="keep the best only when its reward is at least this")
    sft_epochs: int = Field(1, ge=1, description="optimizer updates on each batch of kept completions")
    rewards: list[R.RewardConfig] = Field(default_factory=lambda: [R.ExactMatch()])


def prepare(model, cfg: Config, state: dict) -> None:
    state["reward_fns"] = R.reward_functions(cfg.rewards, like=model)


def best_of(rewards: torch.Tensor, valid: torch.Tensor, n: int, threshold: float | None) -> list[int]:
    """Index (into the flat row-major list) of each prompt's best valid sample, first on ties; prompts with no
    valid sample, or whose best is below ``threshold``, keep none."""
    r = torch.where(valid, rewards, torch.full_like(rewards, float("-inf"))).view(-1, n)  # (P, N)
    best = r.argmax(1)  # first maximum
    out = []
    for p, j in enumerate(best.tolist()):
        v = float(r[p, j])
        if v != float("-inf") and (threshold is None or v >= threshold):
            out.append(p * n + j)
    return out


@torch.no_grad()
def make_experience(model, rows: list[dict], cfg: Config, ctx):
    from tuneforge.train.loop import Experience

    roll, owner = O.roll_out(model, rows, cfg.num_samples, cfg, ctx)
    rewards, valid = O.score(roll, rows, owner, ctx.algo_state["reward_fns"], ctx)
    kept = best_of(rewards, valid, cfg.num_samples, cfg.threshold)
    train_rows = roll.training_rows()
    tok, dev = ctx.algo_state["tokenizer"], O.device_of(model)
    micro = [O.collate_rows([train_rows[i] for i in idx], tok, dev) for idx in O.chunks(kept, ctx.micro_batch)]
    tokens = float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro))
    best = rewards.view(-1, cfg.num_samples)
    metrics = {"reward": float(rewards[valid].sum()), "invalid_reward_rate": float((~valid).sum()),
               "kept_rate": float(len(kept) * cfg.num_samples),
               "best_reward": float(torch.where(valid.view_as(best), best, -torch.inf).max(1).values
                                    .nan_to_num(0.0, neginf=0.0).sum()) * cfg.num_samples}
    return Experience(updates=[micro] * cfg.sft_epochs, weights=[tokens] * cfg.sft_epochs, metrics=metrics,
                      samples=len(owner))


def step(model, batch: dict, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    ce_sum, n = token_cross_entropy_sum(model, batch)
    return ce_sum / max(ctx.normaliser, 1.0), {"tokens": n}
