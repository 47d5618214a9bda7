"""LoRA: low-rank adaptation of linear layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen weight W0 (out x in) gets a trainable low-rank update (eq. 3 of the paper):

    h = W0 x + (alpha / r) * B A x,      A: (r x in), B: (out x r), B = 0 at init so the model starts unchanged.

rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by alpha / sqrt(r) instead, which keeps the
update's magnitude stable as r grows. Because B A has the shape of W0, the update folds into the weight exactly
(``merge``) and unfolds again (``unmerge``), so serving a merged model costs nothing extra.

Layout: the wrapped layer keeps the base ``weight``/``bias`` under their original names (base checkpoints load
unchanged) and holds ``lora_A.<adapter>``/``lora_B.<adapter>`` like PEFT, so saving only has to drop the adapter name
to produce PEFT's file layout. GPT-2's Conv1D stores its weight transposed (in x out); A and B keep PEFT's shapes
and only merge transposes (PEFT's ``fan_in_fan_out``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.methods._inject import find_targets, replace_module
from tuneforge.methods._scope import AdapterLayer, PerExample
from tuneforge.models import arch

PEFT_TYPE = "LORA"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["lora"] = "lora"
    rank: int = Field(8, gt=0, description="r, the rank of B A")
    alpha: float = Field(16.0, gt=0, description="scale numerator: alpha/r (or alpha/sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(None, description="layer names (suffix match) or 're:<regex>'; "
                                                             "None = the architecture's defaults")
    exclude_modules: list[str] = Field(default_factory=list)
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"


class LoraLayer(AdapterLayer):
    """A Linear or Conv1D with named LoRA adapters; ``weight``/``bias`` are the base layer's own Parameters."""

    frozen_base_castable = True  # the base weight only feeds F.linear (see train/precision.py)

    def __init__(self, base: nn.Module):
        super().__init__()
        self.fan_in_fan_out = arch.is_conv1d(base)
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1],
                                                                                                    w.shape[0])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.merged: list[str] = []
        self.active = ()
        self._original = [base]  # a list, so the module is not registered twice; ``unload`` puts it back

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def add_adapter(self, name: str, cfg: Config) -> None:
        # Adapters train in fp32 even on a bf16/fp16 base (as PEFT does): their updates are small relative to
        # their values, and half-precision weights would round many of them away.
        dev, dt = self.weight.device, torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, cfg.rank, bias=False, device=dev, dtype=dt)
        self.lora_B[name] = nn.Linear(cfg.rank, self.out_features, bias=False, device=dev, dtype=dt)
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
        if cfg.init == "kaiming":  # PEFT's default: A like nn.Linear's own init, B = 0
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A[name].weight, std=1.0 / cfg.rank)
        nn.init.zeros_(self.lora_B[name].weight)
        self.active = tuple(self.active) + (name,) if not isinstance(self.active, PerExample) else self.active

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.fan_in_fan_out else self.weight  # Conv1D: y = x @ W(in, out) + b
        return F.linear(x, w, self.bias)

    def delta_weight(self, name: str) -> torch.Tensor:
        """(alpha/r) B A in the base weight's layout (transposed for Conv1D)."""
        d = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]  # (out, in)
        return d.t() if self.fan_in_fan_out else d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        groups = self.batch_groups(x)
        if self.merged and [n for n, rows in groups if rows is None] != self.merged:
            raise RuntimeError(f"LoRA adapter(s) {self.merged} are merged into the weights; unmerge before "
                               "selecting other adapters or the base model")
        for name, rows in groups:
            if name in self.merged:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            xi = x if rows is None else x.index_select(0, rows)
            d = b(a(self.lora_dropout[name](xi.to(a.weight.dtype)))) * self.scaling[name]
            out = out + d.to(out.dtype) if rows is None else out.index_add(0, rows, d.to(out.dtype))
        return out

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name not in self.merged:
            self.weight.add_(self.delta_weight(name).to(self.weight.dtype))
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.weight.sub_(self.delta_weight(name).to(self.weight.dtype))
            self.merged.remove(name)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return f"{kind}({self.in_features}, {self.out_features}), adapters={self.adapter_names()}"


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoraLayer)}


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    """Wrap the target layers (once) and add adapter ``adapter`` to each; only A and B train."""
    existing = lora_layers(model)
    if any(adapter in layer.adapter_names() for layer in existing.values()):
        raise ValueError(f"LoRA adapter {adapter!r} already exists on this model")
    candidates = arch.linear_modules(model)
    targets = cfg.target_modules or arch.default_targets(model)
    for path, module in find_targets(model, targets, candidates, cfg.exclude_modules).items():
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
        if layer is not module:
            replace_module(model, path, layer)
        layer.add_adapter(adapter, cfg)
        for p in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters()):
            p.requires_grad_(True)


def merge(model: nn.Module, adapter: str = "default") -> None:
    for layer in lora_layers(model).values():
        if adapter in layer.adapter_names():
            layer.merge(adapter)


def unmerge(model: nn.Module, adapter: str = "default") -> None:
    for layer in lora_layers(model).values():
        layer.unmerge(adapter)


def unload(model: nn.Module) -> None:
    """Put the original Linear/Conv1D modules back (merged adapters stay in their weights)."""
    for path, layer in lora_layers(model).items():
        orig = layer._original[0]
        orig.weight, orig.bias = layer.weight, layer.bias
        replace_module(model, path, orig)


# ------------------------------------------------------------------------------------------------ saving (PEFT)
def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's keys: ``base_model.model.<layer path>.lora_A.weight`` (the adapter name is not stored)."""
    out = {}
    for path, layer in lora_layers(model).items():
        if adapter in layer.adapter_names():
            out[f"base_model.model.{path}.lora_A.weight"] = layer.lora_A[adapter].weight.detach()
            out[f"base_model.model.{path}.lora_B.weight"] = layer.lora_B[adapter].weight.detach()
    return out


def load_state_dict(model: nn.Module, cfg: Config | None, tensors: dict[str, torch.Tensor], adapter: str = "default") -> None:
    layers = lora_layers(model)
    expected = set(state_dict(model, cfg, adapter))
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise KeyError(f"LoRA weights do not fit this model: missing {sorted(missing)[:5]}, "
                       f"unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for key, value in tensors.items():
            path, which = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
            mod = getattr(layers[path], which)[adapter]
            if mod.weight.shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(mod.weight.shape)} in "
                                 "the model (different rank or base model?)")
            mod.weight.copy_(value)


def peft_config(model: nn.Module, cfg: Config, base_path: str | None) -> dict:
    """``adapter_config.json`` in PEFT's LoraConfig fields, so PEFT and vLLM load the adapter."""
    targets = cfg.target_modules or sorted({p.rsplit(".", 1)[-1] for p in lora_layers(model)})
    if cfg.exclude_modules or any(t.startswith("re:") for t in targets):
        wrapped = [p for p, layer in lora_layers(model).items()]
        targets_out: list[str] | str = "^(" + "|".join(map(_re_escape, wrapped)) + ")$"
    else:
        targets_out = sorted(targets)
    return {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": targets_out, "fan_in_fan_out": any(layer.fan_in_fan_out for layer in
                                                               lora_layers(model).values()),
        "bias": "none", "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }


def from_peft_config(d: dict) -> Config:
    if d.get("use_dora") or d.get("rank_pattern") or d.get("alpha_pattern") or d.get("bias", "none") != "none":
        raise ValueError("this PEFT LoRA adapter uses DoRA, rank/alpha patterns or bias training, which tuneforge's "
                         "lora method does not read yet")
    t = d["target_modules"]
    targets = ["re:" + t] if isinstance(t, str) else list(t)
    return Config(rank=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0),
                  target_modules=targets, rslora=d.get("use_rslora", False))


def _re_escape(s: str) -> str:
    return s.replace(".", r"\.")
