"""Full fine-tuning: every parameter of the model trains (Howard & Ruder 2018 and the seed survey's baseline).

It is the reference every parameter-efficient method is measured against, and the most memory-hungry: AdamW keeps two
moments per weight, so trainable state is ~4x the weights in fp32. Nothing to merge; the result is a plain model.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["full"] = "full"


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def merge(model: nn.Module, adapter: str = "default") -> None:
    """The weights already are the model."""


def state_dict(model: nn.Module, cfg: Config, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The trained tensors under their own parameter names."""
    return {n: p.detach() for n, p in model.named_parameters()}
