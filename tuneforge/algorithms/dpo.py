"""DPO: preference optimisation without a reward model or RL (Rafailov et al. 2023,
https://arxiv.org/abs/2305.18290, eq. 7):

    L = −log σ(β [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

The implicit reward of a response is β · log(π/π_ref); the loss is the Bradley-Terry likelihood that the chosen
response has the higher implicit reward. Variants, a dict of loss functions below rather than a chain of ifs:

* ``sigmoid`` with ``label_smoothing`` ε (conservative DPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf): the
  preference label is assumed flipped with probability ε, L = −(1−ε) log σ(βΔ) − ε log σ(−βΔ);
* ``ipo`` (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17): L = (Δ/len − 1/(2β))², a squared loss that
  does not push Δ to infinity on deterministic preferences. The log-ratios are averaged per response token, as the
  IPO authors' reported results use (and as TRL does), so β means the same for short and long responses.

This module holds the pure loss; the training step (one concatenated chosen+rejected forward, the reference model as
the base with adapters disabled) builds on it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _sigmoid(delta: torch.Tensor, beta: float, label_smoothing: float, **_) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def _ipo(delta_per_token: torch.Tensor, beta: float, **_) -> torch.Tensor:
    return (delta_per_token - 1 / (2 * beta)) ** 2


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"sigmoid": _sigmoid, "ipo": _ipo}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO losses from summed response log-probs (all shape (B,)); returns (losses, stats).

    stats: the implicit rewards β·log(π/π_ref) of chosen and rejected, their margin, and whether the chosen one is
    ahead (preference accuracy) — the metrics users watch to see DPO working.
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss averages log-ratios per token: pass chosen_tokens and rejected_tokens")
        delta = chosen_ratio / chosen_tokens.clamp_min(1) - rejected_ratio / rejected_tokens.clamp_min(1)
        losses = LOSSES["ipo"](delta, beta=beta)
    elif loss_type in LOSSES:
        losses = LOSSES[loss_type](chosen_ratio - rejected_ratio, beta=beta, label_smoothing=label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose from {sorted(LOSSES)}")
    r_c, r_r = (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
    return losses, {"reward_chosen": r_c, "reward_rejected": r_r, "reward_margin": r_c - r_r,
                    "preference_accuracy": (r_c > r_r).float()}
