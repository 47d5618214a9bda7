"""Supervised fine-tuning / instruction tuning: next-token cross entropy on the response tokens.

L = -(1/N) sum_t log p(y_t | y_<t, x) over the N supervised tokens of the whole optimizer step (Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155, sec. 3.5; Wei et al. 2021 for instruction tuning). Normalising by the token count
of the *whole* step (every micro-batch, every rank), not per micro-batch, is what makes batch 4 equal to batch 1 with
4 accumulation steps and 2 processes equal to 1: each token weighs the same wherever it lands.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from tuneforge.algorithms._logps import token_cross_entropy_sum


DATA_FORMATS = ("text", "prompt_completion", "messages")
DISABLE_DROPOUT_DEFAULT = False  # a plain likelihood: the model's dropout stays a regulariser


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["sft"] = "sft"


def row_weight(dataset, i: int) -> int:
    """Each row counts by its supervised tokens in the step's normaliser."""
    return dataset.n_supervised(i)


def loss_fn(token_ce_sum: torch.Tensor, normaliser: float) -> torch.Tensor:
    """Mean token cross entropy over the step: summed CE of this micro-batch / tokens of the whole step."""
    return token_ce_sum / max(normaliser, 1.0)


def step(model, batch: dict, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    ce_sum, n = token_cross_entropy_sum(model, batch)
    return loss_fn(ce_sum, ctx.normaliser), {"tokens": n}
