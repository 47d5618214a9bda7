"""IA3: learned rescaling of keys, values and the FFN's intermediate activation (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", https://arxiv.org/abs/2205.05638).

Sec. 3.3 of the paper: three learned vectors l_k, l_v, l_ff rescale activations element-wise,

    softmax(Q (l_k ⊙ K)^T / sqrt(d)) (l_v ⊙ V)        and        (l_ff ⊙ γ(W1 x)) W2,

all initialised to ones so the model starts unchanged. That is ~0.01% of the weights, fewer than LoRA at rank 1,
and because a scaling commutes with the linear layer it folds into the weight (``merge``): l ⊙ (W x) = (diag(l) W) x
for keys/values (rows of W scale), and W (l ⊙ h) = (W diag(l)) h for the FFN (columns of W2 scale).

Following PEFT's layout, the vector lives on the projection it scales: on the output of ``k_proj``/``v_proj`` (shape
(out, 1)) and on the input of the down projection (``feedforward_modules``, shape (1, in)). Keys are
``base_model.model.<path>.ia3_l``. Per-example adapters (mixed-task batches) build one (rows, 1, dim) scaling tensor
so the base matmul runs once for the whole batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.methods._inject import find_targets
from tuneforge.methods._linear import (LinearWrapper, merge_layers, unload_layers, unmerge_layers, wrap_targets,
                                       wrapped_layers)
from tuneforge.methods._scope import PerExample

PEFT_TYPE = "IA3"

# Per-architecture defaults (model_type -> (targets, feed-forward targets)): keys, values and the FFN down projection.
DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    **{t: (["k_proj", "v_proj", "down_proj"], ["down_proj"])
       for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite")},
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # c_attn is fused q|k|v: all three are scaled
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "opt": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    # encoders (PEFT's BERT defaults): keys, values and the FFN output
    **{t: (["key", "value", r"re:.*\.layer\.\d+\.output\.dense"], [r"re:.*\.layer\.\d+\.output\.dense"])
       for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    **{t: (["k", "v", "wo"], ["wo"]) for t in ("t5", "mt5", "umt5")},  # the IA3 paper's own model family
}


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(None, description="layers to rescale; None = keys, values, FFN down")
    feedforward_modules: list[str] | None = Field(None, description="targets scaled on their input (l_ff); "
                                                                    "None = the architecture's FFN down projection")
    exclude_modules: list[str] = Field(default_factory=list)


class IA3Layer(LinearWrapper):
    # The vectors' identity value is 1, so no weight decay: with wd 0.1 at lr 0.01 and no gradient, decay would move
    # an unused scale from 1.0 to 0.905 in 100 steps, i.e. silently damp keys, values and FFN activations.
    ADAPTER_TENSORS = {"ia3_l": False}

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = False

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def add_adapter(self, name: str, feedforward: bool) -> None:
        if self.ia3_l and feedforward != self.is_feedforward:
            raise ValueError("IA3 adapters on one layer must agree on whether it is a feed-forward (input-scaled) "
                             "layer")
        self.is_feedforward = feedforward
        dev, dt = self.weight_device_dtype()
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=dev, dtype=dt))
        self.active = tuple(self.active) + (name,) if not isinstance(self.active, PerExample) else self.active

    def _scaling(self, x: torch.Tensor) -> torch.Tensor | None:
        """The product of the active vectors: (dim,) for the whole batch or (B, 1, dim) per example; None = 1."""
        groups = self.batch_groups(x)
        self.check_not_merged(groups)
        groups = [(n, rows) for n, rows in groups if n not in self.merged]
        if not groups:
            return None
        if all(rows is None for _, rows in groups):
            s = self.ia3_l[groups[0][0]].flatten()
            for n, _ in groups[1:]:
                s = s * self.ia3_l[n].flatten()
            return s
        dim = self.in_features if self.is_feedforward else self.out_features
        s = torch.ones(x.shape[0], dim, device=x.device, dtype=self.ia3_l[groups[0][0]].dtype)
        for n, rows in groups:
            s = s.index_copy(0, rows, self.ia3_l[n].flatten().expand(len(rows), dim))
        return s.view(x.shape[0], *([1] * (x.dim() - 2)), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._scaling(x)
        if s is None:
            return self.base_forward(x)
        if self.is_feedforward:  # W (l ⊙ h)
            return self.base_forward((x.to(s.dtype) * s).to(x.dtype))
        out = self.base_forward(x)  # l ⊙ (W x + b), bias included as in PEFT
        return (out.to(s.dtype) * s).to(out.dtype)

    def _fold(self, name: str, inverse: bool) -> None:
        w, b = self.base_weight(), self.base_bias()
        vec = self.ia3_l[name].flatten().to(w.dtype)
        vec = 1.0 / vec if inverse else vec
        # (out, in) layout: feed-forward scales columns (inputs), otherwise rows (outputs); Conv1D is transposed.
        along_in = self.is_feedforward
        dim = (0 if along_in else 1) if self.fan_in_fan_out else (1 if along_in else 0)
        w.mul_(vec.view(-1, 1) if dim == 0 else vec.view(1, -1))
        if b is not None and not self.is_feedforward:
            b.mul_(vec.to(b.dtype))

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name not in self.merged:
            self._fold(name, inverse=False)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Divides the vector back out (exact up to rounding; a zero entry cannot be undone)."""
        if name in self.merged:
            self._fold(name, inverse=True)
            self.merged.remove(name)


def ia3_layers(model: nn.Module) -> dict[str, IA3Layer]:
    return wrapped_layers(model, IA3Layer)


def resolve_targets(model: nn.Module, cfg: Config) -> tuple[list[str], list[str]]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if cfg.target_modules is None and model_type not in DEFAULTS:
        raise ValueError(f"ia3 has no default targets for model type {model_type!r}; set target_modules and "
                         "feedforward_modules (keys, values and the FFN's down projection)")
    targets = cfg.target_modules or DEFAULTS[model_type][0]
    ff = cfg.feedforward_modules if cfg.feedforward_modules is not None else (
        DEFAULTS[model_type][1] if model_type in DEFAULTS else [])
    return targets, ff


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    if any(adapter in layer.adapter_names() for layer in ia3_layers(model).values()):
        raise ValueError(f"IA3 adapter {adapter!r} already exists on this model")
    targets, ff = resolve_targets(model, cfg)
    ff_paths = set(find_targets(model, ff, exclude=cfg.exclude_modules)) if ff else set()
    layers = wrap_targets(model, IA3Layer, targets, cfg.exclude_modules)
    if ff_paths - set(layers):
        raise ValueError(f"ia3.feedforward_modules match {sorted(ff_paths - set(layers))[:3]}, which target_modules "
                         "does not: feed-forward layers must also be targets")
    for path, layer in layers.items():
        layer.add_adapter(adapter, feedforward=path in ff_paths)
        layer.ia3_l[adapter].requires_grad_(True)


def merge(model: nn.Module, adapter: str = "default") -> None:
    merge_layers(model, IA3Layer, adapter)


def unmerge(model: nn.Module, adapter: str = "default") -> None:
    unmerge_layers(model, IA3Layer, adapter)


def unload(model: nn.Module) -> None:
    unload_layers(model, IA3Layer)


# ------------------------------------------------------------------------------------------------ saving (PEFT)
def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {f"base_model.model.{path}.ia3_l": layer.ia3_l[adapter].detach()
            for path, layer in ia3_layers(model).items() if adapter in layer.adapter_names()}


def load_state_dict(model: nn.Module, cfg: Config | None, tensors: dict[str, torch.Tensor],
                    adapter: str = "default") -> None:
    layers = ia3_layers(model)
    expected = set(state_dict(model, cfg, adapter))
    if expected != set(tensors):
        raise KeyError(f"IA3 weights do not fit this model: missing {sorted(expected - set(tensors))[:5]}, "
                       f"unexpected {sorted(set(tensors) - expected)[:5]}")
    with torch.no_grad():
        for key, value in tensors.items():
            target = layers[key.removeprefix("base_model.model.").removesuffix(".ia3_l")].ia3_l[adapter]
            if target.shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the model")
            target.copy_(value)


def peft_config(model: nn.Module, cfg: Config, base_path: str | None) -> dict:
    layers = ia3_layers(model)
    paths = sorted(layers)
    ff_paths = [p for p in paths if layers[p].is_feedforward]
    regex = lambda ps: "^(" + "|".join(p.replace(".", r"\.") for p in ps) + ")$"  # noqa: E731
    return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "target_modules": regex(paths), "feedforward_modules": regex(ff_paths) if ff_paths else [],
            "exclude_modules": None, "fan_in_fan_out": any(layers[p].fan_in_fan_out for p in paths),
            "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None, "revision": None}


def from_peft_config(d: dict) -> Config:
    t, f = d["target_modules"], d.get("feedforward_modules") or []
    as_list = lambda v: ["re:" + v] if isinstance(v, str) else list(v)  # noqa: E731
    return Config(target_modules=as_list(t), feedforward_modules=as_list(f))
