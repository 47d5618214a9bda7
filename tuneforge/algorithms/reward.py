"""Reward modelling: a scalar score r(x, y) trained on human (or AI) preferences with the Bradley-Terry model
(Ouyang et al. 2022, InstructGPT, https://arxiv.org/abs/2203.02155, eq. 1):

    L = −log σ(r(x, y_w) − r(x, y_l) − m)

P(y_w ≻ y_l) = σ(r_w − r_l) is the Bradley-Terry probability that the chosen response wins; ``margin`` m (Llama 2,
Touvron et al. 2023, eq. 2) asks for a larger gap on pairs labelled as clearly better. InstructGPT collects
rankings of K responses and trains on all K-choose-2 pairs of each ranking together (``ranking_pairs``), which it
found both cheaper (one forward per response, not per pair) and less prone to over-fitting than shuffled pairs.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) and stats: pairwise accuracy (r_w > r_l) and the mean reward gap."""
    gap = r_chosen - r_rejected
    losses = -F.logsigmoid(gap - margin)
    return losses, {"pairwise_accuracy": (gap > 0).float().mean().detach(), "reward_gap": gap.mean().detach()}


def ranking_pairs(ranking: list) -> list[tuple]:
    """All K-choose-2 (better, worse) pairs of a list ordered best first: [a, b, c] -> (a,b), (a,c), (b,c)."""
    if len(ranking) < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got {len(ranking)}")
    return list(combinations(ranking, 2))
