"""Scaled parallel adapters: the parallel adapter of ``parallel`` with its scaling s learned, one scalar per adapted
block, starting at ``scaling`` (He et al. 2022, https://arxiv.org/abs/2110.04366, sec. 3.2: the "scaled PA" whose
scalar sets how much the adapter's output counts against the FFN's). U = 0 at init, so the model starts unchanged
whatever s is. Not mergeable (``_bottleneck``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from tuneforge.methods import _bottleneck as BN

MERGEABLE = False  # non-linear: merge refuses (``_bottleneck.refuse_merge``)
NAME = "scaled_parallel"


class Config(BN.BottleneckConfig):
    name: Literal["scaled_parallel"] = "scaled_parallel"
    scaling: float = Field(1.0, description="initial value of the learned scaling s")


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    BN.apply_bottleneck(model, cfg, adapter, NAME, [BN.FFN_BLOCK], "parallel", scale=cfg.scaling, learn_scale=True)


merge, unload, state_dict, load_state_dict = BN.method_functions(NAME)
