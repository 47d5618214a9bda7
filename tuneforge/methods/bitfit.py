"""BitFit: train only the bias terms (Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199).

The paper (sec. 3) fine-tunes every bias vector of a BERT model, ~0.08% of its weights, and matches full fine-tuning
on much of GLUE: biases shift each layer's pre-activations, which is enough to re-route features the pretrained
weights already compute. Nothing to merge: the biases are the model's own parameters.

Llama-family models have no biases at all. Training nothing would be silent nonsense, so ``apply`` refuses and
names the alternative the BitFit literature uses for bias-free models: add zero-initialised biases to the linear
layers (``add_bias: true``). A zero bias leaves the model unchanged at the start; after training, ``merge``
declares them in the HF config (``attention_bias``/``mlp_bias`` for Llama-style models) where the architecture has
such a switch, so the saved model reloads with them.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.methods._inject import find_targets
from tuneforge.models import arch


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["bitfit"] = "bitfit"
    add_bias: bool = Field(False, description="add zero-initialised biases to target linear layers that lack one "
                                              "(needed for bias-free models such as Llama)")
    target_modules: list[str] | None = Field(None, description="layers that get a bias with add_bias; None = the "
                                                               "architecture's attention and MLP projections")
    train_head: bool = Field(False, description="also train the output head (a task head on top of the biases)")
    modules: list[str] = Field(default_factory=list, description="extra parameter-name regexes to train")


def _bias_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}


def _add_biases(model: nn.Module, cfg: Config) -> None:
    targets = cfg.target_modules or arch.default_targets(model)
    for _path, module in find_targets(model, targets).items():
        if module.bias is None:
            w = module.weight
            out = w.shape[1] if arch.is_conv1d(module) else w.shape[0]
            module.bias = nn.Parameter(torch.zeros(out, device=w.device, dtype=w.dtype))


def selected_parameters(model: nn.Module, cfg: Config) -> dict[str, nn.Parameter]:
    out = _bias_params(model)
    if cfg.train_head:
        for name in arch.output_head_names(model):
            out.update({f"{name}.{n}": p for n, p in model.get_submodule(name).named_parameters()})
    for pattern in cfg.modules:
        hits = {n: p for n, p in model.named_parameters() if re.search(pattern, n)}
        if not hits:
            raise ValueError(f"bitfit.modules: {pattern!r} matches no parameter name")
        out.update(hits)
    return out


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    if cfg.add_bias:
        _add_biases(model, cfg)
    elif not _bias_params(model):
        raise ValueError(f"bitfit: this {type(model).__name__} has no bias terms, so BitFit would train nothing. "
                         "Set `add_bias: true` to add zero-initialised biases to its linear layers (the model is "
                         "unchanged at the start), or choose another method")
    for p in selected_parameters(model, cfg).values():
        p.requires_grad_(True)


def merge(model: nn.Module, adapter: str = "default") -> None:
    """Biases are the model's own parameters; record added ones in the config so a saved model reloads them."""
    config = getattr(model, "config", None)
    if config is None:
        return
    linears = arch.linear_modules(model)
    attn = [m for p, m in linears.items() if ".self_attn." in p or ".attention." in p]
    mlp = [m for p, m in linears.items() if ".mlp." in p]
    if hasattr(config, "attention_bias") and attn and all(m.bias is not None for m in attn):
        config.attention_bias = True
    if hasattr(config, "mlp_bias") and mlp and all(m.bias is not None for m in mlp):
        config.mlp_bias = True


def state_dict(model: nn.Module, cfg: Config, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The trained tensors under their own parameter names (tuneforge layout: PEFT has no BitFit type)."""
    return {n: p.detach() for n, p in selected_parameters(model, cfg).items()}
