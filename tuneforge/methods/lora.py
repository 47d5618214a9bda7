"""LoRA: low-rank adaptation of linear layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen weight W0 (out x in) gets a trainable low-rank update (eq. 3 of the paper):

    h = W0 x + (alpha / r) * B A x,      A: (r x in), B: (out x r), B = 0 at init so the model starts unchanged.

rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by alpha / sqrt(r) instead, which keeps the
update's magnitude stable as r grows. Because B A has the shape of W0, the update folds into the weight exactly
(``merge``) and unfolds again (``unmerge``), so serving a merged model costs nothing extra.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353, eq. 5) splits the adapted weight into a direction and a
magnitude: W' = m * (W0 + sBA) / ||W0 + sBA||_c with m (one value per output row) initialised to ||W0||_c so the
layer starts unchanged. The paper found that full fine-tuning moves magnitude and direction in ways LoRA alone
couples; the norm is treated as a constant in backward (its sec. 4.3), which saves memory at no measured loss.

A gate (``gate: true``; UniPELT, Mao et al. 2022, https://arxiv.org/abs/2110.07577, sec. 3.2) scales the update by
G_L = σ(W_g x + b_g), one value per token computed from the layer's input by a (d_in -> 1) linear map of its own:

    h = W0 x + σ(W_g x + b_g) · (alpha / r) · B A x,      W_g ~ N(0, 0.02²) and b_g = 0, so G_L starts near 0.5.

B = 0 still makes the layer start unchanged. UniPELT's code and AdapterHub average the gate over a row's whole
sequence, which in a causal LM would let each token's update depend on the tokens after it; here each token has its
own gate, so a token's output depends only on itself and generation with a KV cache equals a full forward. The gate
depends on the input, so a gated adapter is no weight update: it cannot be merged, PEFT cannot hold it (it is saved
in tuneforge's layout), and it lives in its own layer type (``GatedLoraLayer``), so nothing that folds LoRA into
weights (merge, rollouts' packed weights, GGUF export) mistakes it for one. DoRA + gate is refused.

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
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tuneforge.methods._linear import (LinearWrapper, merge_layers, unload_layers, unmerge_layers, wrap_targets,
                                       wrapped_layers)
from tuneforge.methods._scope import PerExample
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
    dora: bool = Field(False, description="DoRA: learn a per-output-row magnitude m, W' = m (W0 + sBA)/||W0 + sBA||")
    init: Literal["kaiming", "gaussian"] = "kaiming"
    gate: bool = Field(False, description="UniPELT's gate: scale the update by σ(W_g x + b_g) per token (a learned "
                                          "d_in -> 1 map per layer); not mergeable, saved in tuneforge's layout")

    @model_validator(mode="after")
    def _gate_without_dora(self):
        if self.gate and self.dora:
            raise ValueError("gate and dora do not combine: DoRA renormalises the whole adapted weight W0 + sBA per "
                             "row, and a per-token gate on sBA makes that weight differ token by token; use one")
        return self

    def merge_refusal(self) -> str | None:
        """Why this adapter cannot be folded into the weights, or None (read by ``merge_methods``)."""
        return GATED_NOT_MERGEABLE if self.gate else None

    def peft_layout(self) -> bool:
        """Whether PEFT's LoraConfig can describe this adapter (PEFT has no gate; read by ``save_adapter``)."""
        return not self.gate


GATED_NOT_MERGEABLE = ("a gated LoRA scales B A x by σ(W_g x + b_g), a different factor for every token, so its update "
                       "is no fixed weight and cannot be folded into the base weights; keep the adapter beside the base "
                       "model (tuneforge generate/serve --adapter), or train LoRA without gate to merge it")
GATE_INIT_STD = 0.02  # the gate's initial weight scale (AdapterHub's); with a zero bias every gate starts near 0.5


class LowRankLayer(LinearWrapper):
    """A Linear/Conv1D (or a nested/quantised base) with named LoRA adapters, optionally DoRA-decomposed; the
    behaviour shared by ``LoraLayer`` (a weight update) and ``GatedLoraLayer`` (an input-dependent one)."""

    # A and B decay (toward B A = 0, the unchanged layer), as in PEFT/HF Trainer practice; DoRA's magnitude starts at
    # ||W0||_c, so decay toward 0 would shrink the layer's rows rather than keep it close to the base.
    ADAPTER_TENSORS = {"lora_A": True, "lora_B": True, "lora_magnitude_vector": False}

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, one per DoRA adapter (PEFT's name)
        self.scaling: dict[str, float] = {}
        self._merge_scale: dict[str, torch.Tensor] = {}  # DoRA: m / ||W + sBA|| at merge time, for unmerge

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def add_adapter(self, name: str, cfg: Config) -> None:
        # Adapters train in fp32 even on a bf16/fp16 base (as PEFT does): their updates are small relative to
        # their values, and half-precision weights would round many of them away.
        dev, dt = self.weight_device_dtype()
        self.lora_A[name] = nn.Linear(self.in_features, cfg.rank, bias=False, device=dev, dtype=dt)
        self.lora_B[name] = nn.Linear(cfg.rank, self.out_features, bias=False, device=dev, dtype=dt)
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
        if cfg.init == "kaiming":  # PEFT's default: A like nn.Linear's own init, B = 0
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A[name].weight, std=1.0 / cfg.rank)
        nn.init.zeros_(self.lora_B[name].weight)
        if cfg.dora:
            self.frozen_base_castable = False  # the column norm reads the base weight in fp32
            with torch.no_grad():  # m = ||W0||_c so the layer starts as the base layer (DoRA eq. 2)
                self.lora_magnitude_vector[name] = nn.Parameter(self._weight_norm(name).to(dt))
        self.active = tuple(self.active) + (name,) if not isinstance(self.active, PerExample) else self.active

    def delta_weight(self, name: str) -> torch.Tensor:
        """(alpha/r) B A as (out, in)."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def _weight_norm(self, name: str) -> torch.Tensor:
        """||W0 + s B A|| per output row, detached: DoRA sec. 4.3 treats it as a constant in backward."""
        w = self.dense_weight().detach().to(self.delta_weight(name).dtype)
        return torch.linalg.vector_norm(w + self.delta_weight(name).detach(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_adapters(x, self.base_forward(x), self._adapter_out)

    def _adapter_out(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        xd = drop(x.to(a.weight.dtype))
        lora = b(a(xd)) * self.scaling[name]
        if name not in self.lora_magnitude_vector:
            return lora
        # DoRA (Liu et al. 2024, eq. 5): y = m/||W0 + sBA|| * (W0 x + sBA x) + bias, written as an addition to the
        # base output. With dropout active the base term is recomputed on the dropped input, as PEFT does.
        scale = self.lora_magnitude_vector[name] / self._weight_norm(name)  # (out,)
        bias = self.base_bias()
        if isinstance(drop, nn.Identity) or not self.training:
            base = base_out.to(lora.dtype) - (bias.to(lora.dtype) if bias is not None else 0)
        else:
            base = F.linear(xd, self.dense_weight().to(lora.dtype))
        return (scale - 1) * base + scale * lora

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        w = self.base_weight()
        delta = self.delta_weight(name)
        if name in self.lora_magnitude_vector:  # W' = m/||W0 + sBA|| (W0 + sBA), row-wise
            scale = self.lora_magnitude_vector[name] / self._weight_norm(name)
            self._merge_scale[name] = scale
            new = (self.dense_weight().to(delta.dtype) + delta) * scale[:, None]
            w.copy_((new.t() if self.fan_in_fan_out else new).to(w.dtype))
        else:
            w.add_((delta.t() if self.fan_in_fan_out else delta).to(w.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        w = self.base_weight()
        delta = self.delta_weight(name)
        if name in self._merge_scale:
            cur = w.t() if self.fan_in_fan_out else w
            old = cur.to(delta.dtype) / self._merge_scale.pop(name)[:, None] - delta
            w.copy_((old.t() if self.fan_in_fan_out else old).to(w.dtype))
        else:
            w.sub_((delta.t() if self.fan_in_fan_out else delta).to(w.dtype))
        self.merged.remove(name)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return f"{kind}({self.in_features}, {self.out_features}), adapters={self.adapter_names()}"


class LoraLayer(LowRankLayer):
    """A layer whose LoRA adapters are weight updates (plain or DoRA): they merge, and PEFT's layout holds them."""


class GatedLoraLayer(LowRankLayer):
    """A layer with gated LoRA adapters: h = W0 x + σ(W_g x + b_g) · s B A x, one gate per token (UniPELT's G_L).
    Its own type, not a ``LoraLayer``: the update depends on the input, so it must never be folded into a weight."""

    # the gate's weight decays toward 0 (an input-independent gate σ(b_g)); its bias, like every bias, does not
    ADAPTER_TENSORS = {**LowRankLayer.ADAPTER_TENSORS, "lora_gate": True}

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.lora_gate = nn.ModuleDict()

    def adapter_tensors(self) -> dict[str, tuple[nn.Parameter, bool]]:
        return {n: (p, decays and not n.endswith(".bias")) for n, (p, decays) in super().adapter_tensors().items()}

    def add_adapter(self, name: str, cfg: Config) -> None:
        dev, dt = self.weight_device_dtype()
        gate = nn.Linear(self.in_features, 1, device=dev, dtype=dt)
        with torch.no_grad():  # AdapterHub's N(0, 0.02²) weight; b = 0, so every gate starts near σ(0) = 0.5
            nn.init.normal_(gate.weight, std=GATE_INIT_STD)
            nn.init.zeros_(gate.bias)
        self.lora_gate[name] = gate
        super().add_adapter(name, cfg)

    def _adapter_out(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        gate = self.lora_gate[name]
        g = torch.sigmoid(gate(x.to(gate.weight.dtype)))  # (..., 1): one gate per token, from the undropped input
        return super()._adapter_out(name, x, base_out) * g

    def merge(self, name: str) -> None:
        from tuneforge.methods._bottleneck import NotMergeableError

        raise NotMergeableError(GATED_NOT_MERGEABLE)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The layers with mergeable (ungated) LoRA adapters."""
    return wrapped_layers(model, LoraLayer)


def gated_layers(model: nn.Module) -> dict[str, GatedLoraLayer]:
    return wrapped_layers(model, GatedLoraLayer)


def all_layers(model: nn.Module) -> dict[str, LowRankLayer]:
    """Every layer with LoRA adapters, gated or not."""
    return wrapped_layers(model, LowRankLayer)


def _file_path(model: nn.Module, path: str) -> str:
    """The path an adapter's keys use: without the ``base_layer`` segments of LoRA wrappers. A gated and a plain
    LoRA on one linear are two wrapper types, one inside the other; each adapter's file names the linear itself, so
    it does not depend on which other adapters share the model (and loads into a model with only that adapter)."""
    keep, module = [], model
    for part in path.split("."):
        if not (part == "base_layer" and isinstance(module, LowRankLayer)):
            keep.append(part)
        module = getattr(module, part, None) if module is not None else None
    return ".".join(keep)


def adapter_layers_of(model: nn.Module, adapter: str, cls: type = LowRankLayer) -> dict[str, LowRankLayer]:
    """The layers holding LoRA adapter ``adapter``, by the path its keys use (``_file_path``)."""
    return {_file_path(model, p): layer for p, layer in wrapped_layers(model, cls).items()
            if adapter in layer.adapter_names()}


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    """Wrap the target layers (once) and add adapter ``adapter`` to each; only A and B (and DoRA's m, or the gate)
    train."""
    if any(adapter in layer.adapter_names() for layer in all_layers(model).values()):
        raise ValueError(f"LoRA adapter {adapter!r} already exists on this model")
    targets = cfg.target_modules or arch.default_targets(model)
    cls = GatedLoraLayer if cfg.gate else LoraLayer
    for layer in wrap_targets(model, cls, targets, cfg.exclude_modules).values():
        if cfg.dora and not layer.owns_weight and not hasattr(layer.base_layer, "dequantize"):
            raise ValueError("DoRA needs the layer's own weight; it cannot sit on top of another method's wrapper "
                             "(apply lora with dora first in the method list)")
        layer.add_adapter(adapter, cfg)
        for p in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters()):
            p.requires_grad_(True)
        if cfg.dora:
            layer.lora_magnitude_vector[adapter].requires_grad_(True)
        if cfg.gate:
            layer.lora_gate[adapter].requires_grad_(True)


def merge(model: nn.Module, adapter: str = "default") -> None:
    """Fold adapter ``adapter`` into the weights; a gated adapter is refused before any layer changes."""
    if any(adapter in layer.adapter_names() for layer in gated_layers(model).values()):
        from tuneforge.methods._bottleneck import NotMergeableError

        raise NotMergeableError(GATED_NOT_MERGEABLE)
    merge_layers(model, LoraLayer, adapter)


def unmerge(model: nn.Module, adapter: str = "default") -> None:
    unmerge_layers(model, LoraLayer, adapter)


def unload(model: nn.Module) -> None:
    """Put the original Linear/Conv1D modules back (merged adapters stay in their weights; gated ones are dropped)."""
    unload_layers(model, LoraLayer)
    unload_layers(model, GatedLoraLayer)


# ------------------------------------------------------------------------------------------------ saving (PEFT)
def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's keys: ``base_model.model.<layer path>.lora_A.weight`` (the adapter name is not stored); a gated
    adapter adds ``<layer path>.lora_gate.weight``/``.bias`` (tuneforge's layout only)."""
    out = {}
    for path, layer in adapter_layers_of(model, adapter).items():
        out[f"base_model.model.{path}.lora_A.weight"] = layer.lora_A[adapter].weight.detach()
        out[f"base_model.model.{path}.lora_B.weight"] = layer.lora_B[adapter].weight.detach()
        if adapter in layer.lora_magnitude_vector:
            out[f"base_model.model.{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter].detach()
        if isinstance(layer, GatedLoraLayer):
            gate = layer.lora_gate[adapter]
            out[f"base_model.model.{path}.lora_gate.weight"] = gate.weight.detach()
            out[f"base_model.model.{path}.lora_gate.bias"] = gate.bias.detach()
    return out


def load_state_dict(model: nn.Module, cfg: Config | None, tensors: dict[str, torch.Tensor], adapter: str = "default") -> None:
    layers = adapter_layers_of(model, adapter)
    expected = set(state_dict(model, cfg, adapter))
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise KeyError(f"LoRA weights do not fit this model: missing {sorted(missing)[:5]}, "
                       f"unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for key, value in tensors.items():
            if key.endswith(".lora_magnitude_vector"):
                target = layers[key.removeprefix("base_model.model.").rsplit(".", 1)[0]].lora_magnitude_vector[adapter]
            else:  # <path>.lora_A.weight, <path>.lora_gate.bias, ...
                path, which, param = key.removeprefix("base_model.model.").rsplit(".", 2)
                target = getattr(getattr(layers[path], which)[adapter], param)
            if target.shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(target.shape)} in "
                                 "the model (different rank or base model?)")
            target.copy_(value)


def peft_config(model: nn.Module, cfg: Config, base_path: str | None, adapter: str = "default") -> dict:
    """``adapter_config.json`` in PEFT's LoraConfig fields, so PEFT and vLLM load the adapter."""
    layers = adapter_layers_of(model, adapter, LoraLayer)
    targets = cfg.target_modules or sorted({p.rsplit(".", 1)[-1] for p in layers})
    if cfg.exclude_modules or any(t.startswith("re:") for t in targets) or _matches_more(model, targets, layers):
        wrapped = list(layers)
        targets_out: list[str] | str = "^(" + "|".join(map(_re_escape, wrapped)) + ")$"
    else:
        targets_out = sorted(targets)
    return {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": targets_out, "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none", "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_dora": cfg.dora, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }


def from_peft_config(d: dict) -> Config:
    if d.get("rank_pattern") or d.get("alpha_pattern") or d.get("bias", "none") != "none":
        raise ValueError("this PEFT LoRA adapter uses rank/alpha patterns or bias training, which tuneforge's "
                         "lora method does not read yet")
    t = d["target_modules"]
    targets = ["re:" + t] if isinstance(t, str) else list(t)
    return Config(rank=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0),
                  target_modules=targets, rslora=d.get("use_rslora", False), dora=bool(d.get("use_dora")))


def _matches_more(model: nn.Module, targets: list[str], layers: dict) -> bool:
    """Whether PEFT's suffix matching of ``targets`` would also wrap a layer this adapter left alone (BERT's
    ``pooler.dense`` beside the blocks' ``dense`` layers): then the config names the wrapped layers exactly."""
    for name, module in model.named_modules():
        if name in layers or any(name.startswith(w + ".") for w in layers) or not arch.linear_like(module):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            return True
    return False


def _re_escape(s: str) -> str:
    return s.replace(".", r"\.")
