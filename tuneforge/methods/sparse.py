"""Sparse fine-tuning: train a fixed, chosen subset of the existing weights and nothing else.

The subset is fixed before training, then only those entries move (ΔW is zero elsewhere). How to choose it:

* ``gradient``: the FISH mask of Sung et al. 2021 ("Training Neural Networks with Fixed Sparse Masks",
  https://arxiv.org/abs/2111.09839, eq. 2): the empirical Fisher information F̂ = (1/N) Σ (∂L/∂θ)² over N batches of
  the task's own data, keeping the weights with the largest F̂ — those whose change moves the loss most;
* ``magnitude``: the largest |W| entries (the ones the pretrained model already relies on);
* ``random``: a seeded uniform draw, the baseline both papers compare against.

``density`` is the budget, e.g. 0.005 = 0.5% of each targeted layer's weights (k = max(1, round(density · numel))
per layer, so the count has a closed form). Only the selected entries have trainable values, so gradients and Adam
state are that small too. Saved as indices into each layer's (out, in) row-major weight plus values; ``merge`` adds
them in place.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.methods._delta import DeltaLayer
from tuneforge.methods._linear import merge_layers, unload_layers, wrap_targets, wrapped_layers
from tuneforge.models import arch

STATE_SUFFIXES = (".sp_index", ".sp_values")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["sparse"] = "sparse"
    density: float = Field(0.005, gt=0, le=1, description="fraction of each targeted layer's weights that train")
    selection: Literal["gradient", "magnitude", "random"] = "gradient"
    calibration_batches: int = Field(8, gt=0, description="gradient selection: batches the Fisher is summed over")
    seed: int = Field(0, description="random selection: the draw's seed")
    target_modules: list[str] | None = None
    exclude_modules: list[str] = Field(default_factory=list)


def budget(numel: int, density: float) -> int:
    return max(1, round(density * numel))


class SparseLayer(DeltaLayer):
    # The values are entries of ΔW, whose identity value is 0: they decay like LoRA's A/B (toward the pretrained
    # weight), not like the weight itself would in full fine-tuning (toward 0).
    ADAPTER_TENSORS = {"sp_values": True}

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.sp_values = nn.ParameterDict()
        self.sp_index: dict[str, torch.Tensor | None] = {}  # None until the entries are chosen
        self.calibrating = False

    def adapter_names(self) -> list[str]:
        return list(self.sp_values)

    def add_adapter(self, name: str, cfg: Config) -> None:
        dev, dt = self.weight_device_dtype()
        k = budget(self.out_features * self.in_features, cfg.density)
        self.sp_values[name] = nn.Parameter(torch.zeros(k, device=dev, dtype=dt))
        self.sp_index[name] = None
        self._activate(name)

    def choose(self, name: str, scores: torch.Tensor) -> None:
        """Keep the top-k entries of ``scores`` ((out, in)); sorted indices make the layout canonical."""
        k = self.sp_values[name].numel()
        self.sp_index[name] = torch.topk(scores.flatten().float(), k, sorted=False).indices.sort().values

    def delta(self, name: str) -> torch.Tensor:
        index = self.sp_index[name]
        if index is None and self.calibrating:  # the selection pass itself runs the unchanged model
            return torch.zeros(self.out_features, self.in_features, device=self.sp_values[name].device)
        if index is None:
            raise RuntimeError("sparse: the trainable entries are not chosen yet (gradient selection runs on "
                               "calibration batches before training; call methods.prepare_methods)")
        vals = self.sp_values[name]
        flat = torch.zeros(self.out_features * self.in_features, device=vals.device, dtype=vals.dtype)
        return flat.index_put((index.to(vals.device),), vals).view(self.out_features, self.in_features)


def sparse_layers(model: nn.Module) -> dict[str, SparseLayer]:
    return wrapped_layers(model, SparseLayer)


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    """Wrap the targets; magnitude/random choose now, gradient selection waits for ``prepare`` (it needs data)."""
    if any(adapter in layer.adapter_names() for layer in sparse_layers(model).values()):
        raise ValueError(f"sparse adapter {adapter!r} already exists on this model")
    targets = cfg.target_modules or sorted({p.rsplit(".", 1)[-1] for p in arch.linear_modules(model)})
    layers = wrap_targets(model, SparseLayer, targets, cfg.exclude_modules)
    gen = torch.Generator().manual_seed(cfg.seed)
    for path, layer in layers.items():
        layer.add_adapter(adapter, cfg)
        layer.sp_values[adapter].requires_grad_(True)
        if layer.sp_values[adapter].device.type == "meta" or cfg.selection == "gradient":
            continue
        if cfg.selection == "magnitude":
            layer.choose(adapter, layer.dense_weight().detach().abs())
        else:
            layer.choose(adapter, torch.rand(layer.out_features, layer.in_features, generator=gen))


def prepare(model: nn.Module, cfg: Config, losses: Iterable[torch.Tensor], adapter: str = "default") -> None:
    """Gradient (FISH) selection: sum squared gradients of the frozen target weights over calibration losses.

    ``losses`` yields scalar losses computed by the caller's forward passes (``cfg.calibration_batches`` of them);
    the base weights need gradients only for this pass and are frozen again afterwards.
    """
    layers = {p: layer for p, layer in sparse_layers(model).items() if adapter in layer.sp_values}
    if cfg.selection != "gradient" or not layers:
        return
    weights = {p: layer.base_weight() for p, layer in layers.items()}
    fisher = {p: torch.zeros_like(w, dtype=torch.float32) for p, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    for layer in layers.values():
        layer.calibrating = True
    try:
        for n, loss in enumerate(losses):
            if n >= cfg.calibration_batches:
                break
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (p, _), g in zip(weights.items(), grads):
                if g is not None:
                    fisher[p] += g.float() ** 2
    finally:
        for w in weights.values():
            w.requires_grad_(False)
        for layer in layers.values():
            layer.calibrating = False
    for p, layer in layers.items():
        f = fisher[p].t() if layer.fan_in_fan_out else fisher[p]
        layer.choose(adapter, f)


def merge(model: nn.Module, adapter: str = "default") -> None:
    merge_layers(model, SparseLayer, adapter)


def unload(model: nn.Module) -> None:
    unload_layers(model, SparseLayer)


def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in sparse_layers(model).items():
        if adapter in layer.sp_values:
            if layer.sp_index[adapter] is not None:
                out[f"{path}.sp_index"] = layer.sp_index[adapter]
            out[f"{path}.sp_values"] = layer.sp_values[adapter].detach()
    return out


def load_state_dict(model: nn.Module, cfg: Config | None, tensors: dict[str, torch.Tensor],
                    adapter: str = "default") -> None:
    layers = sparse_layers(model)
    for path, layer in layers.items():
        if f"{path}.sp_index" not in tensors or f"{path}.sp_values" not in tensors:
            raise KeyError(f"sparse adapter lacks {path}.sp_index / .sp_values (different targets or base model?)")
        index, values = tensors[f"{path}.sp_index"], tensors[f"{path}.sp_values"]
        if values.shape != layer.sp_values[adapter].shape or index.shape != values.shape:
            raise ValueError(f"{path}: {values.numel()} values / {index.numel()} indices in the file, the config "
                             f"gives {layer.sp_values[adapter].numel()} (different density or base model?)")
        if index.numel() and int(index.max()) >= layer.out_features * layer.in_features:
            raise ValueError(f"{path}.sp_index points outside the ({layer.out_features}, {layer.in_features}) weight")
        layer.sp_index[adapter] = index.to(torch.int64)
        with torch.no_grad():
            layer.sp_values[adapter].copy_(values)
