"""Pfeiffer adapters: one bottleneck adapter per block, after the FFN output only (Pfeiffer et al. 2021,
"AdapterFusion: Non-Destructive Task Composition for Transfer Learning", https://arxiv.org/abs/2005.00247, sec. 2.2 and
appendix: the architecture search found the FFN position alone as good as Houlsby's two at half the parameters):
h ← h + U f(D h) on the FFN output, U = 0 at init. Not mergeable (``_bottleneck``).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from tuneforge.methods import _bottleneck as BN

NAME = "pfeiffer"


class Config(BN.BottleneckConfig):
    name: Literal["pfeiffer"] = "pfeiffer"


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    BN.apply_bottleneck(model, cfg, adapter, NAME, [BN.FFN_OUT], "sequential")


def merge(model: nn.Module, adapter: str = "default") -> None:
    BN.refuse_merge(NAME)


def unload(model: nn.Module) -> None:
    BN.unload(model)


def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default"):
    return BN.state_dict(model, NAME, adapter)


def load_state_dict(model: nn.Module, cfg: Config | None, tensors, adapter: str = "default") -> None:
    BN.load_state_dict(model, NAME, tensors, adapter)
