"""Online (iterative) DPO: each loop step samples two completions per prompt from the *current* policy, labels which
is better with a reward model, a reward function or an AI judge, and takes DPO updates on those fresh pairs.

This is the online/iterative RLHF loop of Guo et al. 2024 ("Direct Language Model Alignment from Online AI
Feedback", https://arxiv.org/abs/2402.04792, Algorithm 1) and Xiong et al. 2024 (iterative DPO,
https://arxiv.org/abs/2312.11456): offline DPO learns from responses of another policy, whose distribution drifts
away from the one being trained; labelling on-policy samples keeps the preference data where the policy is. The loss
is DPO's (Rafailov et al. 2023, eq. 7, ``dpo.dpo_loss``), with the same reference choices.

Pairs with no preference — equal rewards, a judge at exactly 0.5, identical completions, a non-finite reward — are
skipped and counted (``skipped_pair_rate``): they would add a zero-gradient term to the mean.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tuneforge.algorithms import _online as O
from tuneforge.algorithms import dpo
from tuneforge.algorithms import rewards as R
from tuneforge.algorithms._reference import prepare_reference

DATA_FORMATS = ("prompt_completion", "messages")
DISABLE_DROPOUT_DEFAULT = True  # DPO's: policy and reference agree at equal weights (as TRL's online DPO)


class Config(O.Sampling):
    name: Literal["online_dpo"] = "online_dpo"
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    reference: Literal["auto", "adapters_off", "copy"] = "auto"
    rewards: list[R.RewardConfig] = Field(default_factory=lambda: [R.ExactMatch()],
                                          description="label pairs by reward (higher wins), unless a judge is set")


def dpo_config(cfg) -> dpo.Config:
    return dpo.Config(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                      reference=cfg.reference)


def prepare(model, cfg: Config, state: dict) -> None:
    prepare_reference(model, cfg.reference, state, cfg.name)
    state["labeler"] = reward_labeler(R.reward_functions(cfg.rewards, like=model))


def reward_labeler(fns: list[tuple]):
    """Labels pairs by combined reward: P(first better) = 1, 0, or 0.5 on a tie; NaN when a reward is not finite."""

    def label(roll, rows, owner, ctx) -> torch.Tensor:
        r, valid = O.score(roll, rows, owner, fns, ctx)
        r, valid = r.view(-1, 2), valid.view(-1, 2).all(1)
        p = (r[:, 0] > r[:, 1]).double() + 0.5 * (r[:, 0] == r[:, 1]).double()
        return torch.where(valid, p, torch.full_like(p, float("nan")))

    return label


def pair_rows(roll, prefs: torch.Tensor) -> tuple[list[tuple[dict, dict]], int]:
    """(chosen, rejected) training rows of every pair with a preference, and how many pairs had none."""
    rows = roll.training_rows()
    pairs, skipped = [], 0
    for k, p in enumerate(prefs.tolist()):
        a, b = rows[2 * k], rows[2 * k + 1]
        if p != p or p == 0.5 or a["input_ids"] == b["input_ids"]:
            skipped += 1
            continue
        pairs.append((a, b) if p > 0.5 else (b, a))
    return pairs, skipped


@torch.no_grad()
def make_experience(model, rows: list[dict], cfg: Config, ctx):
    from tuneforge.train.loop import Experience

    roll, owner = O.roll_out(model, rows, 2, cfg, ctx)
    prefs = ctx.algo_state["labeler"](roll, rows, owner, ctx)  # (P,) P(first completion better)
    pairs, skipped = pair_rows(roll, prefs)
    tok, dev = ctx.algo_state["tokenizer"], O.device_of(model)
    micro = [O.collate_rows([c for c, _ in part] + [r for _, r in part], tok, dev)
             for part in O.chunks(pairs, ctx.micro_batch)]
    metrics = {"skipped_pair_rate": float(skipped) * 2, "completion_len": float(roll.mask.sum()),
               "preference_strength": float((prefs.nan_to_num(0.5) - 0.5).abs().sum()) * 2}
    return Experience(updates=[micro], weights=[float(len(pairs))], metrics=metrics, samples=len(owner))


def step(model, batch: dict, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    """DPO's step on a batch of fresh pairs (chosen rows first, rejected after)."""
    if "dpo_config" not in ctx.algo_state:
        ctx.algo_state["dpo_config"] = dpo_config(cfg)
    return dpo.step(model, batch, ctx.algo_state["dpo_config"], ctx)
