"""AdapterBias: a token-dependent shift of each block's FFN output (Fu, Chen, Lee & Lee 2022, "AdapterBias:
Parameter-efficient Token-dependent Representation Shift for Adapters in NLP Tasks", https://arxiv.org/abs/2205.00305,
sec. 3 and fig. 2). Where BitFit adds the same bias to every token, AdapterBias adds a vector v scaled per token:

    FFN(x) + v · α(x),        α(x) = w^T x + b  (a linear layer L_α: d -> 1),  v ∈ R^d,

reading the FFN's input x beside it, as the seed documents' table of adapter variants puts it
(LayerNorm(X + F(X)) -> LayerNorm(ADT(X) + F(X)) with ADT(X) = X W_{d x 1} W_{1 x d}); 2d + 1 numbers per block.
It is a bottleneck adapter of width 1 with no non-linearity and no output bias (``_bottleneck``, parallel
placement), so it shares their per-example selection, composition and AdapterDrop.

The paper's code starts v at ones; here v starts at zero so the model is unchanged at step 0 (α starts small and
random, so v's gradient is not zero). Not mergeable: the shift reads the FFN's input and is added to its output, and
no linear layer of the model maps one to the other (the FFN is non-linear in between).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.methods import _bottleneck as BN

MERGEABLE = False
NAME = "adapter_bias"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["adapter_bias"] = "adapter_bias"
    target_modules: list[str] | None = Field(None, description="FFN blocks to shift; None = the architecture's")
    exclude_modules: list[str] = Field(default_factory=list)


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    BN.apply_bottleneck(model, cfg, adapter, NAME, [BN.FFN_BLOCK], "parallel", width=1, act="identity",
                        up_bias=False)


_, unload, state_dict, load_state_dict = BN.method_functions(NAME)


def merge(model: nn.Module, adapter: str = "default") -> None:
    raise BN.NotMergeableError(
        "adapter_bias reads each FFN's input and shifts its output; no linear layer of the model maps one to the "
        "other (the FFN is non-linear in between), so it cannot be folded into the base weights. Keep the adapter "
        "beside the base model (tuneforge generate/serve --adapter), or train a mergeable method (lora, ia3, bitfit)")
