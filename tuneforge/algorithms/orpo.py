"""ORPO: monolithic preference optimisation without a reference model (Hong et al. 2024,
https://arxiv.org/abs/2403.07691, eqs. 6–7):

    L = L_SFT(y_w) + λ · L_OR,     L_OR = −log σ(log odds(y_w|x) − log odds(y_l|x)),
    odds(y|x) = P(y|x) / (1 − P(y|x)),  with log P(y|x) the *mean* token log-prob of the response.

SFT alone raises the likelihood of rejected responses too (they share most tokens with chosen ones); the odds-ratio
term penalises that relative to the chosen response, at the cost of one extra forward of the rejected response and
no reference model at all. Computed in log space: log odds = log P − log(1 − P) with log(1 − P) = log1mexp(log P),
which stays finite as P → 1 where the naive form overflows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate everywhere (Mächler 2012: expm1 near 0, log1p far from it)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def odds_ratio_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair L_OR and the log odds ratio (for logging), from mean response log-probs (B,)."""
    c, r = chosen_mean_logp.float(), rejected_mean_logp.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return -F.logsigmoid(log_odds), log_odds.detach()


def orpo_loss(chosen_nll: torch.Tensor, chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor,
              lam: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean ORPO loss over pairs: SFT negative log-likelihood of chosen (mean per token) + λ · L_OR."""
    l_or, log_odds = odds_ratio_loss(chosen_mean_logp, rejected_mean_logp)
    loss = chosen_nll.mean() + lam * l_or.mean()
    return loss, {"sft_loss": chosen_nll.mean().detach(), "or_loss": l_or.mean().detach(),
                  "log_odds_ratio": log_odds.mean(), "preference_accuracy": (log_odds > 0).float().mean()}
