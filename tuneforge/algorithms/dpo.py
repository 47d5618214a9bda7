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

The training step scores chosen and rejected responses in one concatenated forward (``collate_preference``), the
prompt they share computed once (``_prefix``: the pair is packed into one row, with the same log-probs). The
reference model π_ref is, with ``reference: auto``: the same model with its adapters switched off when every trainable
parameter lives in an adapter (LoRA, IA3, LoKr, ...: no second copy of the weights), otherwise a frozen copy taken
before training (full fine-tuning, freeze, BitFit). Its log-probs are computed in eval mode (no dropout), so the
reference is a fixed function as the derivation assumes. ``reference: precomputed`` scores every pair once with the
starting model before training: no reference forward per step and, for full fine-tuning, no second copy in memory.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.algorithms._logps import sequence_logps_from_model
from tuneforge.algorithms._reference import (precompute_sequence_logps, prepare_reference,
                                             reference_sequence_logps)
from tuneforge.data.collate import pair_index


DATA_FORMATS = ("preference",)  # {"prompt", "chosen", "rejected"}
DISABLE_DROPOUT_DEFAULT = True  # policy and reference must agree at equal weights (L = log 2 at the start), as TRL


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the reference")
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: assumed probability a label is flipped")
    reference: Literal["auto", "adapters_off", "copy", "precomputed"] = Field(
        "auto", description="adapters_off = the base under the adapters; copy = a frozen copy made before training; "
                            "precomputed = every pair scored once by the starting model before training")


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
    ahead (preference accuracy) — the metrics users watch to see DPO working. A tie counts ½ (a coin flip), so the
    accuracy starts at exactly 0.5 where policy = reference (TRL counts a tie as wrong, starting at 0).
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
                    "preference_accuracy": (r_c > r_r).float() + 0.5 * (r_c == r_r).float()}


# ------------------------------------------------------------------------------------------------- training step
def row_weight(dataset, i: int) -> int:
    """Each preference pair counts once in the step's mean."""
    return 1


def prepare(model, cfg: Config, state: dict) -> None:
    """Decide the reference model before training (and before any resume loads trained weights)."""
    prepare_reference(model, cfg.reference, state, "dpo")


def precompute(model, cfg: Config, state: dict, data, collate, batch_size: int) -> None:
    """``reference: precomputed``: score every pair once with the starting model, before training (and before a
    resume loads trained weights), so steps need no reference forward and full fine-tuning no frozen copy."""
    if state.get("reference_mode") == "precomputed":
        precompute_sequence_logps(model, data, collate, batch_size, state)


def reference_logps(model, batch: dict, state: dict) -> torch.Tensor:
    return reference_sequence_logps(model, batch, state)


def step(model, batch: dict, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    """One micro-batch of preference rows (``collate_preference``: each response once, pairs by index; a ranking's
    pairs averaged through ``pair_weight`` so every row counts once)."""
    if "reference_mode" not in ctx.algo_state:
        prepare(model, cfg, ctx.algo_state)
    logps, counts = sequence_logps_from_model(model, batch)  # (N,), (N,)
    ref = reference_logps(model, batch, ctx.algo_state)
    c, r, w = pair_index(batch)  # (P,) each
    losses, stats = dpo_loss(logps[c], logps[r], ref[c], ref[r], beta=cfg.beta, loss_type=cfg.loss_type,
                             label_smoothing=cfg.label_smoothing, chosen_tokens=counts[c], rejected_tokens=counts[r])
    norm = max(ctx.normaliser, 1.0)
    metrics = {k: float((w * v).sum()) / norm for k, v in stats.items()}
    metrics["pairs"] = int(c.numel())
    return (w * losses).sum() / norm, metrics
