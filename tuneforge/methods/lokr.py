"""LoKr: a Kronecker-product weight update (Yeh et al. 2023, LyCORIS, "Navigating Text-To-Image Customization",
https://arxiv.org/abs/2309.14859, sec. 3.2; KronA, Edalati et al. 2022, https://arxiv.org/abs/2212.10650).

    ΔW = (alpha / r) · W1 ⊗ W2,      W1: (a × c),  W2: (b × d),  out = a·b,  in = c·d

The Kronecker product of two small factors reaches full rank (rank(A ⊗ B) = rank(A)·rank(B)) with far fewer
parameters than a dense update, which is its advantage over a low-rank product; when a factor would still be large
it is itself written as a rank-r product (W2 = W2_a W2_b, and W1 too with ``decompose_both``). W1 starts at zero, so
the model starts unchanged. ΔW has the weight's shape, so it merges exactly.

The dimension split, the choice of which factor is low-rank, the initialisation and the key names follow PEFT's
LoKr (``lokr_w1``, ``lokr_w1_a/b``, ``lokr_w2``, ``lokr_w2_a/b``), so adapters load both ways. Unlike PEFT, GPT-2's
Conv1D layers are supported too (the update is built as (out, in) and transposed only for merging); such an
adapter is still written in PEFT's layout, but PEFT itself cannot load it (its LoKr has no Conv1D), which saving says.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.methods._delta import DeltaLayer
from tuneforge.methods._linear import merge_layers, unload_layers, unmerge_layers, wrap_targets, wrapped_layers
from tuneforge.methods._scope import PerExample
from tuneforge.models import arch

PEFT_TYPE = "LOKR"
log = logging.getLogger("tuneforge")
FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["lokr"] = "lokr"
    rank: int = Field(8, gt=0, description="rank of a factor written as a low-rank product")
    alpha: float = Field(8.0, gt=0, description="scale numerator: ΔW = alpha/rank · W1 ⊗ W2")
    decompose_both: bool = Field(False, description="also write W1 as a rank-r product when it is large")
    decompose_factor: int = Field(-1, description="size of the first factor's dims; -1 = near the square root")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="drop rows of ΔW while training")
    rank_dropout_scale: bool = Field(False, description="rescale kept rows by 1/keep-fraction")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="skip the whole adapter while training")
    target_modules: list[str] | None = None
    exclude_modules: list[str] = Field(default_factory=list)


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` = m·n: (factor, dim/factor) when ``factor`` divides it, else the divisor pair nearest the
    square root with m ≤ n (and m ≤ factor when one is given). A prime dimension gives (1, dim)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    cap = dim if factor == -1 else factor
    m = max(k for k in range(1, math.isqrt(dim) + 1) if dim % k == 0 and k <= max(cap, 1))
    return m, dim // m


class LoKrLayer(DeltaLayer):
    # Every factor decays, as LoRA's A and B do: ΔW = 0 (the unchanged layer) is where decay pulls the update.
    ADAPTER_TENSORS = {f: True for f in FACTORS}

    def __init__(self, base: nn.Module):
        super().__init__(base)
        for name in FACTORS:
            setattr(self, name, nn.ParameterDict())
        self.scaling: dict[str, float] = {}
        self.dropouts: dict[str, tuple[float, bool, float]] = {}

    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def add_adapter(self, name: str, cfg: Config) -> None:
        dev, dt = self.weight_device_dtype()
        (a, b), (c, d) = factorization(self.out_features, cfg.decompose_factor), factorization(
            self.in_features, cfg.decompose_factor)
        r = cfg.rank
        new = lambda *shape: nn.Parameter(torch.empty(shape, device=dev, dtype=dt))  # noqa: E731
        kaiming = lambda p: nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # noqa: E731
        if cfg.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a[name], self.lokr_w1_b[name] = new(a, r), new(r, c)
            nn.init.zeros_(self.lokr_w1_a[name])
            kaiming(self.lokr_w1_b[name])
        else:
            self.lokr_w1[name] = new(a, c)
            nn.init.zeros_(self.lokr_w1[name])
        if r < max(b, d) / 2:
            self.lokr_w2_a[name], self.lokr_w2_b[name] = new(b, r), new(r, d)
            kaiming(self.lokr_w2_a[name])
            kaiming(self.lokr_w2_b[name])
        else:
            self.lokr_w2[name] = new(b, d)
            kaiming(self.lokr_w2[name])
        self.scaling[name] = cfg.alpha / cfg.rank
        self.dropouts[name] = (cfg.rank_dropout, cfg.rank_dropout_scale, cfg.module_dropout)
        self.active = tuple(self.active) + (name,) if not isinstance(self.active, PerExample) else self.active

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        return [getattr(self, f)[name] for f in FACTORS if name in getattr(self, f)]

    def delta(self, name: str) -> torch.Tensor:
        """alpha/r · W1 ⊗ W2 as (out, in)."""
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        w2 = self.lokr_w2[name] if name in self.lokr_w2 else self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return torch.kron(w1, w2) * self.scaling[name]

    def forward_delta(self, name: str) -> torch.Tensor:
        delta = self.delta(name)
        rank_p, rescale, _ = self.dropouts[name]
        if self.training and rank_p:  # drop whole rows of ΔW, optionally rescaling the kept ones
            keep = (torch.rand(delta.shape[0], device=delta.device) > rank_p).to(delta.dtype)
            delta = delta * (keep / keep.mean().clamp_min(1e-8) if rescale else keep)[:, None]
        return delta

    def skip(self, name: str) -> bool:
        module_p = self.dropouts[name][2]
        return bool(self.training and module_p and float(torch.rand(())) < module_p)


def lokr_layers(model: nn.Module) -> dict[str, LoKrLayer]:
    return wrapped_layers(model, LoKrLayer)


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    if any(adapter in layer.adapter_names() for layer in lokr_layers(model).values()):
        raise ValueError(f"LoKr adapter {adapter!r} already exists on this model")
    targets = cfg.target_modules or arch.default_targets(model)
    for layer in wrap_targets(model, LoKrLayer, targets, cfg.exclude_modules).values():
        layer.add_adapter(adapter, cfg)
        for p in layer.parameters_of(adapter):
            p.requires_grad_(True)


def merge(model: nn.Module, adapter: str = "default") -> None:
    merge_layers(model, LoKrLayer, adapter)


def unmerge(model: nn.Module, adapter: str = "default") -> None:
    unmerge_layers(model, LoKrLayer, adapter)


def unload(model: nn.Module) -> None:
    unload_layers(model, LoKrLayer)


# ------------------------------------------------------------------------------------------------ saving (PEFT)
def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in lokr_layers(model).items():
        for f in FACTORS:
            if adapter in getattr(layer, f):
                out[f"base_model.model.{path}.{f}"] = getattr(layer, f)[adapter].detach()
    return out


def load_state_dict(model: nn.Module, cfg: Config | None, tensors: dict[str, torch.Tensor],
                    adapter: str = "default") -> None:
    layers = lokr_layers(model)
    expected = set(state_dict(model, cfg, adapter))
    if expected != set(tensors):
        raise KeyError(f"LoKr weights do not fit this model (different rank/factor or base model?): missing "
                       f"{sorted(expected - set(tensors))[:4]}, unexpected {sorted(set(tensors) - expected)[:4]}")
    with torch.no_grad():
        for key, value in tensors.items():
            path, factor = key.removeprefix("base_model.model.").rsplit(".", 1)
            target = getattr(layers[path], factor)[adapter]
            if target.shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the model")
            target.copy_(value)


def peft_config(model: nn.Module, cfg: Config, base_path: str | None) -> dict:
    paths = sorted(lokr_layers(model))
    conv1d = [p for p, layer in lokr_layers(model).items() if layer.fan_in_fan_out]
    if conv1d:  # the file is PEFT's layout, but PEFT's LoKr wraps only Linear/Conv layers
        log.warning(f"note: {len(conv1d)} LoKr layer(s) sit on Conv1D modules (GPT-2 style, e.g. {conv1d[0]}): "
                    "tuneforge reloads this adapter, but PEFT's LoKr has no Conv1D support and cannot load it; "
                    "merge it (tuneforge merge) to use it elsewhere")
    return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "r": cfg.rank, "alpha": cfg.alpha, "rank_dropout": cfg.rank_dropout,
            "module_dropout": cfg.module_dropout, "decompose_both": cfg.decompose_both,
            "decompose_factor": cfg.decompose_factor, "use_effective_conv2d": False, "rank_dropout_scale": cfg.rank_dropout_scale,
            "target_modules": "^(" + "|".join(p.replace(".", r"\.") for p in paths) + ")$",
            "exclude_modules": None, "init_weights": True, "inference_mode": True, "rank_pattern": {},
            "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
            "revision": None}


def from_peft_config(d: dict) -> Config:
    if d.get("rank_pattern") or d.get("alpha_pattern"):
        raise ValueError("this PEFT LoKr adapter uses rank/alpha patterns, which tuneforge's lokr does not read")
    t = d["target_modules"]
    return Config(rank=d["r"], alpha=d["alpha"], decompose_both=d.get("decompose_both", False),
                  decompose_factor=d.get("decompose_factor", -1), rank_dropout=d.get("rank_dropout", 0.0),
                  rank_dropout_scale=d.get("rank_dropout_scale", False),
                  module_dropout=d.get("module_dropout", 0.0),
                  target_modules=["re:" + t] if isinstance(t, str) else list(t))
