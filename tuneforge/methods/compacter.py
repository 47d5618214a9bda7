"""Compacter: bottleneck adapters whose projections are PHM layers with shared rules and low-rank factors
(Karimi Mahabadi, Henderson & Ruder 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers",
https://arxiv.org/abs/2106.04647).

A parameterised hypercomplex multiplication (PHM) layer builds its (k x d) weight as a sum of n Kronecker products
(sec. 3, eq. 3):

    W = sum_{i=1..n} A_i ⊗ B_i,        A_i: (n x n) "rule" matrices,  B_i: (k/n x d/n),

and Compacter makes it cheaper twice (sec. 3, eq. 4-5): the A_i are *shared* by every adapter layer of the model
(one set for the down-projections, one for the up-projections: they capture what all layers have in common), and
each B_i is a rank-r product s_i t_i^T (r = 1 in the paper). A projection then costs r (k + d) numbers plus its
bias instead of k d, and the model adds 2 n^3 for the shared rules. ``compacter`` places these adapters where
Houlsby does (after attention and after the FFN); ``compacter_pp`` (Compacter++) only after the FFN, as Pfeiffer.

The up-projection's t_i start at zero, so U = 0 and the model's outputs are unchanged at step 0 (its s_i and the
down-projection start Glorot-uniform, the rules normal with std 0.01: the paper's code's choices). With
``factorized: false`` each B_i is a full matrix (the paper's "PHM-Adapter" ablation). Not mergeable: U f(D h) is
non-linear (``_bottleneck``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tuneforge.methods import _bottleneck as BN

MERGEABLE = False  # non-linear: merge refuses (``_bottleneck.refuse_merge``)
NAME = "compacter"
RULE_INIT_STD = 0.01


class Config(BN.BottleneckConfig):
    name: Literal["compacter"] = "compacter"
    non_linearity: Literal["relu", "gelu", "silu", "swish", "tanh"] = "gelu"  # the paper's
    phm_dim: int = Field(4, ge=1, description="n, the number of Kronecker products (and the rules' size n x n)")
    phm_rank: int = Field(1, ge=1, description="r, the rank of each B_i = s_i t_i^T")
    factorized: bool = Field(True, description="B_i as s_i t_i^T (Compacter); false = full B_i (PHM-Adapter)")
    shared_rules: bool = Field(True, description="one set of rule matrices A_i for all layers (Compacter); false = "
                                                 "a set per layer")

    @model_validator(mode="after")
    def _compacter_default_size(self):
        if self.bottleneck is None and self.reduction_factor is None:
            self.reduction_factor = 32.0  # the paper's and AdapterHub's Compacter default
        return self


class Rules(nn.Module):
    """The n rule matrices A_i, one (n, n, n) tensor; shared by every PHM layer that holds this module."""

    def __init__(self, n: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, n, n, device=device, dtype=dtype))
        with torch.no_grad():
            nn.init.normal_(self.weight, std=RULE_INIT_STD)


class PHMLinear(nn.Module):
    """y = x W^T + b with W = sum_i A_i ⊗ B_i (eq. 3), B_i = s_i t_i (eq. 5) when factorised."""

    def __init__(self, d_in: int, d_out: int, n: int, rank: int, factorized: bool, rules: Rules, zero: bool,
                 shared: bool, device=None, dtype=None):
        super().__init__()
        self.SHARED = ("rules",) if shared else ()  # shared rules are saved once (``_bottleneck.state_dict``)
        p, q = d_out // n, d_in // n
        self.n, self.d_in, self.d_out = n, d_in, d_out
        self.rules = rules
        kw = {"device": device, "dtype": dtype}
        if factorized:
            self.s = nn.Parameter(torch.empty(n, p, rank, **kw))
            self.t = nn.Parameter(torch.empty(n, rank, q, **kw))
        else:
            self.b = nn.Parameter(torch.empty(n, p, q, **kw))
        self.bias = nn.Parameter(torch.zeros(d_out, **kw))
        with torch.no_grad():
            for i in range(n):
                if factorized:
                    nn.init.xavier_uniform_(self.s[i])
                    nn.init.zeros_(self.t[i]) if zero else nn.init.xavier_uniform_(self.t[i])
                else:
                    nn.init.zeros_(self.b[i]) if zero else nn.init.xavier_uniform_(self.b[i])

    def weight(self) -> torch.Tensor:
        b = self.s @ self.t if hasattr(self, "s") else self.b  # (n, p, q)
        # (A_i ⊗ B_i)[a p + r, c q + u] = A_i[a, c] B_i[r, u], summed over i
        w = torch.einsum("iac,iru->arcu", self.rules.weight, b)
        return w.reshape(self.d_out, self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


def pair_factory(cfg: Config):
    """A ``(D, U)`` builder for ``_bottleneck.add_adapter`` that hands every layer the same rules (when shared)."""
    shared: dict[str, Rules] = {}

    def rules(part: str, device, dtype) -> Rules:
        if not cfg.shared_rules:
            return Rules(cfg.phm_dim, device, dtype)
        if part not in shared:
            shared[part] = Rules(cfg.phm_dim, device, dtype)
        return shared[part]

    def pair(d_src: int, width: int, d_out: int, device, dtype):
        n = cfg.phm_dim
        bad = [f"{what} {v}" for what, v in (("the sub-layer width", d_src), ("the bottleneck", width),
                                             ("the output width", d_out)) if v % n]
        if bad:
            raise ValueError(f"{NAME}: phm_dim {n} must divide {', '.join(bad)}; pick a phm_dim that divides them "
                             f"(or set bottleneck to a multiple of {n})")
        down = PHMLinear(d_src, width, n, cfg.phm_rank, cfg.factorized, rules("down", device, dtype), False,
                         cfg.shared_rules, device, dtype)
        up = PHMLinear(width, d_out, n, cfg.phm_rank, cfg.factorized, rules("up", device, dtype), True,
                       cfg.shared_rules, device, dtype)
        return down, up

    return pair


def width(cfg: Config, d: int) -> int:
    """m: ``bottleneck`` as given, or d / reduction_factor rounded up to a multiple of n (the PHM layers need n | m)."""
    if cfg.bottleneck is not None:
        return cfg.bottleneck
    n = cfg.phm_dim
    return max(n, -(-cfg.width(d) // n) * n)


def apply_compacter(model: nn.Module, cfg: Config, adapter: str, name: str, defaults: list[dict]) -> None:
    BN.apply_bottleneck(model, cfg, adapter, name, defaults, "sequential", pair=pair_factory(cfg),
                        width=width(cfg, BN._hidden(model)))


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    apply_compacter(model, cfg, adapter, NAME, [BN.ATTN_OUT, BN.FFN_OUT])


merge, unload, state_dict, load_state_dict = BN.method_functions(NAME)
