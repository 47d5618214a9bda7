"""Parallel adapters: a bottleneck adapter beside each block's FFN, reading the FFN's input and added to its output
with a fixed scaling s (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
https://arxiv.org/abs/2110.04366, sec. 3.2 and eq. 6; sec. 4.4 finds the FFN placement with s = 4 the strongest):

    FFN(x) + s · U f(D x),        U = 0 at init (outputs unchanged).

Running beside the FFN rather than after it, the adapter does not lengthen the sequential path. ``scaled_parallel``
learns s instead. Not mergeable (``_bottleneck``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from tuneforge.methods import _bottleneck as BN

MERGEABLE = False  # non-linear: merge refuses (``_bottleneck.refuse_merge``)
NAME = "parallel"


class Config(BN.BottleneckConfig):
    name: Literal["parallel"] = "parallel"
    scaling: float = Field(4.0, description="s, the fixed weight of the adapter's output (He et al.: 4)")


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    BN.apply_bottleneck(model, cfg, adapter, NAME, [BN.FFN_BLOCK], "parallel", scale=cfg.scaling)


merge, unload, state_dict, load_state_dict = BN.method_functions(NAME)
