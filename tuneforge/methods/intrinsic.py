"""Intrinsic-dimension (random-subspace) fine-tuning: train d numbers θ^d and move all D weights along a fixed random
projection of them (Li, Farkhoor, Liu & Yosinski 2018, "Measuring the Intrinsic Dimension of Objective
Landscapes", https://arxiv.org/abs/1804.08838, sec. 2, eq. 1; Aghajanyan, Zettlemoyer & Gupta 2021, "Intrinsic
Dimensionality Explains the Effectiveness of Language Model Fine-Tuning", https://arxiv.org/abs/2012.13255, sec. 3):

    θ^D = θ^D_0 + P θ^d,        P: (D x d), fixed, random; θ^d starts at 0, so the model starts unchanged.

The smallest d that reaches 90% of full fine-tuning's metric (d90) measures how many free directions the task
really needs: Aghajanyan et al. find a few hundred suffice for RoBERTa on MRPC, and that larger pretrained models
need fewer. ``tuneforge intrinsic-dim`` searches d on a task (``tuneforge.intrinsic_dim``).

P is never stored: it is regenerated from ``seed`` and the target layers, so an adapter is d numbers. Two forms:

* ``dense``: Gaussian entries with variance 1/D (columns of unit norm in expectation, as Li et al.); D x d floats
  of memory, so for small models only;
* ``fastfood`` (default): Li et al.'s structured projection (Le, Sarlós & Smola 2013, "Fastfood"), per block of
  L = 2^ceil(log2 d) rows V = H G Π H B / (√L ||G||) with H the Walsh-Hadamard matrix, G Gaussian, Π a permutation,
  B random signs; blocks are stacked to cover each layer's weights and the whole P is scaled so its columns have
  unit norm. It costs O(D log d) time and 13 bytes per weight (signs, permutation, Gaussian) instead of D x d
  floats.

``said: true`` is Aghajanyan et al.'s structure-aware variant (SAID, eq. 3): one learned scale λ_i per target
layer, θ_i = θ_0,i + λ_i P_i θ^{d-m} with m the number of layers, so d counts θ and λ together; λ starts at 1.

Each target layer is wrapped as a ``DeltaLayer`` (ΔW = its slice of P θ^d, computed from its own blocks only, so
nothing is cached between layers or steps); ``merge`` folds ΔW into the weights. The projection is fp32 whatever the
base dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tuneforge.methods._delta import DeltaLayer
from tuneforge.methods._inject import copy_checked
from tuneforge.methods._linear import merge_layers, unload_layers, wrap_targets, wrapped_layers
from tuneforge.methods._scope import AdapterLayer
from tuneforge.models import arch

ATTR = "tuneforge_intrinsic"  # on the model: adapter name -> Subspace (θ^d and SAID's λ)
DENSE_LIMIT = 2 ** 28  # D x d entries (1 GiB of fp32) above which the dense projection is refused


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["intrinsic"] = "intrinsic"
    dimension: int = Field(..., ge=1, description="d, the number of trained values (θ^d, and λ with said)")
    projection: Literal["fastfood", "dense"] = "fastfood"
    said: bool = Field(False, description="a learned scale per target layer (Aghajanyan et al.'s SAID)")
    seed: int = Field(0, description="the projection's seed: P is regenerated from it, never saved")
    target_modules: list[str] | None = Field(None, description="linear layers to move; default every one in the "
                                                               "blocks")
    exclude_modules: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _said_dims(self):
        if self.said and self.dimension < 2:
            raise ValueError("said needs dimension >= 2 (θ^{d-m} and one λ per layer)")
        return self


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dimension (a power of 2), H_2n = [[H, H], [H, -H]]:
    log2(L) butterfly stages, each linear, so autograd differentiates it without saving anything."""
    shape, n = x.shape, x.shape[-1]
    h = 1
    while h < n:
        x = x.reshape(*shape[:-1], n // (2 * h), 2, h)
        x = torch.stack((x[..., 0, :] + x[..., 1, :], x[..., 0, :] - x[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(shape)


def fastfood(theta: torch.Tensor, signs: torch.Tensor, perm: torch.Tensor, gauss: torch.Tensor) -> torch.Tensor:
    """Blocks V_j θ for j = 1..k, shape (k, L): V_j = H G_j Π_j H B_j / (√L ||G_j||), whose columns have norm 1
    exactly (H's entries are ±1, so a column's squared norm is Σ G² / ||G||²)."""
    k, L = gauss.shape
    x = torch.nn.functional.pad(theta, (0, L - theta.numel())).expand(k, L) * signs
    x = fwht(x).gather(1, perm)
    x = fwht(x * gauss)
    return x / (math.sqrt(L) * gauss.norm(dim=1, keepdim=True))


class Subspace(AdapterLayer):
    """θ^d (and λ) of one adapter, registered once on the model; every target layer reads it."""

    wraps_linear = False  # models.arch: not a linear layer, and holds none
    ADAPTER_TENSORS: dict[str, bool] = {}  # θ and λ: no weight decay (every tensor here, see AdapterLayer)

    def __init__(self, name: str, d: int, layers: int, said: bool, device=None):
        super().__init__()
        self.name, self.said = name, said
        free = d - layers if said else d
        self.theta = nn.Parameter(torch.zeros(free, device=device, dtype=torch.float32))
        self.lam = nn.Parameter(torch.ones(layers, device=device, dtype=torch.float32)) if said else None
        self.scale = 1.0  # 1 / sqrt(total fastfood blocks): P's columns of unit norm
        self.active = (name,)

    def adapter_names(self) -> list[str]:
        return [self.name]


class IntrinsicLayer(DeltaLayer):
    """A linear layer moved along its slice of P θ^d."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.subspace: dict[str, list[Subspace]] = {}  # a list: the Subspace is registered on the model, not here
        self.index: dict[str, int] = {}  # this layer's λ (SAID)
        self.kind: dict[str, str] = {}

    def adapter_names(self) -> list[str]:
        return list(self.subspace)

    def add_adapter(self, name: str, sub: Subspace, index: int, kind: str, d_total: int, gen: torch.Generator
                    ) -> int:
        """Draw this layer's part of P (on the CPU, from ``gen``, so it is the same on every device); returns its
        number of fastfood blocks."""
        dev = self.weight_device_dtype()[0]
        n, free = self.out_features * self.in_features, sub.theta.numel()
        self.subspace[name], self.index[name], self.kind[name] = [sub], index, kind
        meta = dev.type == "meta"  # a weightless model (config checks): shapes only
        make = (lambda shape, dt: torch.empty(shape, dtype=dt, device="meta")) if meta else None
        if kind == "dense":
            p = make((n, free), torch.float32) if meta else torch.randn(n, free, generator=gen) / math.sqrt(d_total)
            self.register_buffer(f"ii_dense_{name}", p.to(dev), persistent=False)
            blocks = 0
        else:
            L = 1 << max(0, (free - 1).bit_length())
            blocks = -(-n // L)
            if meta:
                signs, perm, gauss = (make((blocks, L), dt) for dt in (torch.int8, torch.int64, torch.float32))
            else:
                signs = (torch.randint(0, 2, (blocks, L), generator=gen, dtype=torch.int8) * 2 - 1)
                perm = torch.argsort(torch.rand(blocks, L, generator=gen), dim=1)
                gauss = torch.randn(blocks, L, generator=gen)
            for part, t in (("signs", signs), ("perm", perm), ("gauss", gauss)):
                self.register_buffer(f"ii_{part}_{name}", t.to(dev), persistent=False)
        self._activate(name)
        return blocks

    def delta(self, name: str) -> torch.Tensor:
        sub = self.subspace[name][0]
        n = self.out_features * self.in_features
        if self.kind[name] == "dense":
            v = getattr(self, f"ii_dense_{name}").float() @ sub.theta
        else:
            signs, perm, gauss = (getattr(self, f"ii_{p}_{name}") for p in ("signs", "perm", "gauss"))
            v = fastfood(sub.theta, signs.to(sub.theta.dtype), perm, gauss.float()).reshape(-1)[:n] * sub.scale
        if sub.lam is not None:
            v = v * sub.lam[self.index[name]]
        return v.view(self.out_features, self.in_features)


def intrinsic_layers(model: nn.Module) -> dict[str, IntrinsicLayer]:
    return wrapped_layers(model, IntrinsicLayer)


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    if adapter in getattr(model, ATTR, {}):
        raise ValueError(f"intrinsic adapter {adapter!r} already exists on this model")
    targets = cfg.target_modules or sorted({p.rsplit(".", 1)[-1] for p in arch.linear_modules(model)})
    layers = dict(sorted(wrap_targets(model, IntrinsicLayer, targets, cfg.exclude_modules).items()))
    total = sum(layer.out_features * layer.in_features for layer in layers.values())
    m = len(layers) if cfg.said else 0
    if cfg.dimension - m < 1:
        raise ValueError(f"intrinsic: said with {m} target layers needs dimension > {m} (one λ per layer plus θ)")
    if cfg.dimension > total:
        raise ValueError(f"intrinsic: dimension {cfg.dimension} exceeds the {total} weights it projects onto; "
                         "train them directly (full) or lower the dimension")
    if cfg.projection == "dense" and total * cfg.dimension > DENSE_LIMIT:
        raise ValueError(f"intrinsic: a dense projection would hold {total} x {cfg.dimension} floats "
                         f"({total * cfg.dimension * 4 / 2**30:.1f} GiB); use projection: fastfood")
    dev = next(iter(layers.values())).weight_device_dtype()[0]
    if not hasattr(model, ATTR):
        setattr(model, ATTR, nn.ModuleDict())
    sub = Subspace(adapter, cfg.dimension, len(layers), cfg.said, device=dev)
    getattr(model, ATTR)[adapter] = sub
    gen = torch.Generator().manual_seed(cfg.seed)
    blocks = sum(layer.add_adapter(adapter, sub, i, cfg.projection, total, gen)
                 for i, layer in enumerate(layers.values()))
    sub.scale = 1.0 / math.sqrt(blocks) if blocks else 1.0
    for p in sub.parameters():
        p.requires_grad_(True)


def merge(model: nn.Module, adapter: str = "default") -> None:
    merge_layers(model, IntrinsicLayer, adapter)


def unload(model: nn.Module) -> None:
    unload_layers(model, IntrinsicLayer)
    if hasattr(model, ATTR):
        delattr(model, ATTR)


def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    subs = getattr(model, ATTR, None)
    sub = subs[adapter] if subs is not None and adapter in subs else None
    if sub is None:
        return {}
    out = {"intrinsic.theta": sub.theta.detach()}
    if sub.lam is not None:
        out["intrinsic.lambda"] = sub.lam.detach()
    return out


def load_state_dict(model: nn.Module, cfg: Config | None, tensors: dict[str, torch.Tensor],
                    adapter: str = "default") -> None:
    copy_checked(state_dict(model, cfg, adapter), tensors, "intrinsic",
                 "from the config (another dimension, said, or other target layers?)")
