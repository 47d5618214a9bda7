"""Compacter++: Compacter's PHM adapters after the FFN only (Karimi Mahabadi et al. 2021,
https://arxiv.org/abs/2106.04647, sec. 3 "Compacter++": dropping the adapter after attention, as Pfeiffer et al.
do, keeps the quality at half the adapter layers). Everything else as ``compacter``.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from tuneforge.methods import _bottleneck as BN
from tuneforge.methods import compacter

MERGEABLE = False  # non-linear: merge refuses (``_bottleneck.refuse_merge``)
NAME = "compacter_pp"


class Config(compacter.Config):
    name: Literal["compacter_pp"] = "compacter_pp"


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    compacter.apply_compacter(model, cfg, adapter, NAME, [BN.FFN_OUT])


merge, unload, state_dict, load_state_dict = BN.method_functions(NAME)
