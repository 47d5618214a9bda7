"""Houlsby adapters: a bottleneck adapter after the attention output and after the FFN output of every block
(Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", https://arxiv.org/abs/1902.00751, sec. 2.1,
fig. 2): h ← h + U f(D h) on each sub-layer's output, before the residual connection. U = 0 at init, so the model
starts unchanged. Two adapters per block, 2 d m + m + d parameters each (``_bottleneck``); not mergeable.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from tuneforge.methods import _bottleneck as BN

MERGEABLE = False  # non-linear: merge refuses (``_bottleneck.refuse_merge``)
NAME = "houlsby"


class Config(BN.BottleneckConfig):
    name: Literal["houlsby"] = "houlsby"
    non_linearity: Literal["relu", "gelu", "silu", "swish", "tanh"] = "swish"  # AdapterHub's Houlsby default


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    BN.apply_bottleneck(model, cfg, adapter, NAME, [BN.ATTN_OUT, BN.FFN_OUT], "sequential")


merge, unload, state_dict, load_state_dict = BN.method_functions(NAME)
