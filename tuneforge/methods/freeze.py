"""Layer freezing: train only chosen transformer blocks and/or named modules, keep the rest frozen.

Lower layers of a pretrained transformer hold general features and upper layers task-specific ones (Howard & Ruder
2018, ULMFiT; Lee et al. 2019, "What would Elsa do? Freezing layers during transformer fine-tuning",
https://arxiv.org/abs/1911.03090, which found training only the top quarter of blocks keeps ~90% of full fine-tuning
quality). Training the top-k blocks therefore buys most of the quality for a fraction of the gradient and optimizer
memory. ``blocks`` picks block indices directly (``[0, -1]``: the first and last). ``modules`` adds any parameter whose name matches a regular expression (e.g. ``lm_head``, ``norm``).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tuneforge.models import arch


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["freeze"] = "freeze"
    top_k: int = Field(0, ge=0, description="train the last k transformer blocks")
    bottom_k: int = Field(0, ge=0, description="train the first k transformer blocks")
    blocks: list[int] = Field(default_factory=list, description="train these block indices (negative = from the top)")
    modules: list[str] = Field(default_factory=list, description="regexes searched in parameter names")

    @model_validator(mode="after")
    def _something_trains(self):
        if not (self.top_k or self.bottom_k or self.blocks or self.modules):
            raise ValueError("freeze trains nothing: set top_k, bottom_k, blocks or modules")
        return self


def selected_parameters(model: nn.Module, cfg: Config) -> dict[str, nn.Parameter]:
    blocks = arch.blocks(model)
    if cfg.top_k > len(blocks) or cfg.bottom_k > len(blocks):
        raise ValueError(f"freeze: top_k={cfg.top_k}/bottom_k={cfg.bottom_k} but the model has {len(blocks)} blocks")
    chosen = blocks[len(blocks) - cfg.top_k:] if cfg.top_k else []
    chosen += blocks[: cfg.bottom_k]
    bad = [i for i in cfg.blocks if not -len(blocks) <= i < len(blocks)]
    if bad:
        raise ValueError(f"freeze.blocks: {bad} out of range for a model with {len(blocks)} blocks")
    chosen += [blocks[i] for i in cfg.blocks]
    from tuneforge.methods import adapter_tensors

    prefixes = tuple(name + "." for name, _ in chosen)
    added = adapter_tensors(model)  # another method's tensors are not the model's (frozen fusion members stay so)
    own = [(n, p) for n, p in model.named_parameters() if id(p) not in added]
    out = {n: p for n, p in own if n.startswith(prefixes)}
    for pattern in cfg.modules:
        hits = {n: p for n, p in own if re.search(pattern, n)}
        if not hits:
            names = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()})
            raise ValueError(f"freeze.modules: {pattern!r} matches no parameter; modules include: "
                             f"{', '.join(names[:12])} ...")
        out.update(hits)
    return out


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    for p in selected_parameters(model, cfg).values():
        p.requires_grad_(True)


def merge(model: nn.Module, adapter: str = "default") -> None:
    """The trained blocks are the model's own weights."""


def state_dict(model: nn.Module, cfg: Config, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The trained tensors under their own parameter names."""
    return {n: p.detach() for n, p in selected_parameters(model, cfg).items()}
