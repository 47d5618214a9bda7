"""Pfeiffer adapters: one bottleneck adapter per block, after the FFN output only (Pfeiffer et al. 2021,
"AdapterFusion: Non-Destructive Task Composition for Transfer Learning", https://arxiv.org/abs/2005.00247, sec. 2.2 and
appendix: the architecture search found the FFN position alone as good as Houlsby's two at half the parameters):
h ← h + U f(D h) on the FFN output, U = 0 at init. Not mergeable (``_bottleneck``).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from tuneforge.methods import _bottleneck as BN

MERGEABLE = False  # non-linear: merge refuses (``_bottleneck.refuse_merge``)
NAME = "pfeiffer"


class Config(BN.BottleneckConfig):
    name: Literal["pfeiffer"] = "pfeiffer"


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    BN.apply_bottleneck(model, cfg, adapter, NAME, [BN.FFN_OUT], "sequential")


merge, unload, state_dict, load_state_dict = BN.method_functions(NAME)
