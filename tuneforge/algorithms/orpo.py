"""ORPO: monolithic preference optimisation without a reference model (Hong et al. 2024,
https://arxiv.org/abs/2403.07691, eqs. 6–7):

    L = L_SFT(y_w) + λ · L_OR,     L_OR = −log σ(log odds(y_w|x) − log odds(y_l|x)),
    odds(y|x) = P(y|x) / (1 − P(y|x)),  with log P(y|x) the *mean* token log-prob of the response.

SFT alone raises the likelihood of rejected responses too (they share most tokens with chosen ones); the odds-ratio
term penalises that relative to the chosen response, at the cost of one extra forward of the rejected response and
no reference model at all. Computed in log space: log odds = log P − log(1 − P) with log(1 − P) = log1mexp(log P),
which, unlike the naive form (and TRL's ``log1p(−exp(log P))``), keeps the loss and its gradient finite as P → 1.

The SFT term here is each pair's mean token NLL of the chosen response, averaged over pairs (TRL averages over all
chosen tokens of the batch instead); per pair keeps the step's mean independent of how pairs fall into micro-batches.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.algorithms._logps import sequence_logps_from_model
from tuneforge.data.collate import pair_index

DATA_FORMATS = ("preference",)
DISABLE_DROPOUT_DEFAULT = True  # as TRL's ORPO: chosen and rejected are scored without dropout noise in the odds


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["orpo"] = "orpo"
    lam: float = Field(0.1, ge=0, description="λ, the weight of the odds-ratio term")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate everywhere (Mächler 2012: expm1 near 0, log1p far from it), with a
    finite value and gradient at and near x = 0 (a response the policy is certain of).

    Two things make the textbook ``where`` NaN there. ``torch.where`` differentiates both branches, and the unused
    ``log1p(−exp(x))`` is −inf with an infinite slope once exp(x) rounds to 1 (|x| ≲ 6e-8 in fp32): 0 × inf = NaN.
    Each branch therefore only ever sees inputs from its own half. And at x = 0 itself log(1 − p) is −inf for real:
    x is capped at log(1 − ε) (ε = the dtype's machine epsilon), i.e. P is taken as at most one ulp below 1 — the
    resolution of the fp32 token log-probs x is averaged from, so no distinguishable value changes.
    """
    x = x.clamp_max(math.log1p(-torch.finfo(x.dtype).eps))
    near = x > -math.log(2)
    safe_near, safe_far = torch.where(near, x, -1.0), torch.where(near, -1.0, x)
    return torch.where(near, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


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


def row_weight(dataset, i: int) -> int:
    return 1


def step(model, batch: dict, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    """One micro-batch of preference rows (``collate_preference``); a ranking's pairs are averaged (``pair_weight``)."""
    logps, counts = sequence_logps_from_model(model, batch)  # (N,)
    c, r, w = pair_index(batch)  # (P,) each
    mean = logps / counts.clamp_min(1)
    l_or, log_odds = odds_ratio_loss(mean[c], mean[r])
    per_pair = -mean[c] + cfg.lam * l_or
    norm = max(ctx.normaliser, 1.0)
    metrics = {"sft_loss": float((w * -mean[c].detach()).sum()) / norm,
               "or_loss": float((w * l_or.detach()).sum()) / norm,
               "log_odds_ratio": float((w * log_odds.detach()).sum()) / norm,
               "preference_accuracy": float((w * (log_odds > 0)).sum()) / norm, "pairs": int(c.numel())}
    return (w * per_pair).sum() / norm, metrics
