"""The base every linear-layer method builds on: a wrapper around a Linear/Conv1D (or around another wrapper).

LoRA, DoRA, LoKr, IA3, diff pruning and sparse fine-tuning all change what one linear layer computes. They share the
same bookkeeping, kept here once:

* the base layer's ``weight``/``bias`` stay registered under their original names, so a base checkpoint (and the
  training loop's frozen-weight handling) sees the same tensors;
* methods compose on one layer by nesting: a second method wraps the first wrapper, registered as ``base_layer``,
  and its ``base_forward`` runs the inner method. Merging folds the innermost first (methods merge in the order they
  were applied), which is the order their maths nests in;
* a wrapper can also sit on a quantised base (``QuantLinear``), which it calls instead of ``F.linear``;
* ``unwrap`` gives back the module to put in the model once every adapter is merged or dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.methods._scope import AdapterLayer
from tuneforge.models import arch


def _is_plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or arch.is_conv1d(m)


class LinearWrapper(AdapterLayer):
    """Holds a linear base (own ``weight``/``bias``) or a nested wrapper/quantised layer (``base_layer``)."""

    frozen_base_castable = True  # the base weight only feeds F.linear (see train/precision.py)

    def __init__(self, base: nn.Module):
        super().__init__()
        if _is_plain_linear(base):
            self.weight = base.weight
            self.bias = base.bias
            self._original = [base]  # a list, so the module is not registered twice; ``unwrap`` puts it back
            self.fan_in_fan_out = arch.is_conv1d(base)
            self.in_features, self.out_features = arch.weight_in_out(base)
        else:
            self.base_layer = base
            self.fan_in_fan_out = getattr(base, "fan_in_fan_out", False)
            self.in_features, self.out_features = base.in_features, base.out_features
        self.merged: list[str] = []
        self.active = ()

    # ----------------------------------------------------------------------------------------- the base layer
    @property
    def owns_weight(self) -> bool:
        return "weight" in self._parameters

    def base_parameters(self) -> list[nn.Parameter]:
        """The wrapped module's tensors: the base ``weight``/``bias``, or everything under ``base_layer`` (a quantised
        base, or another method's wrapper with its own adapters)."""
        if self.owns_weight:
            return [p for p in (self.weight, self.bias) if p is not None]
        return list(self.base_layer.parameters())

    def base_weight(self) -> torch.Tensor:
        """The float weight Parameter the adapters fold into (transposed layout for Conv1D)."""
        if self.owns_weight:
            return self.weight
        inner = self.base_layer
        if isinstance(inner, LinearWrapper):
            return inner.base_weight()
        if _is_plain_linear(inner):
            return inner.weight
        raise TypeError(f"{type(inner).__name__} has no float weight to merge into; dequantise it first")

    def base_bias(self) -> torch.Tensor | None:
        if self.owns_weight:
            return self.bias
        inner = self.base_layer
        return inner.base_bias() if isinstance(inner, LinearWrapper) else getattr(inner, "bias", None)

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a float (out, in) matrix, dequantised if the base is quantised (DoRA's norm, sparse
        selection and QLoRA's merge read it)."""
        if not self.owns_weight and hasattr(self.base_layer, "dequantize"):
            return self.base_layer.dequantize()
        w = self.base_weight()
        return w.t() if self.fan_in_fan_out else w

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.owns_weight:
            w = self.weight.t() if self.fan_in_fan_out else self.weight  # Conv1D: y = x @ W(in, out) + b
            return F.linear(x, w, self.bias)
        return self.base_layer(x)

    def weight_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where new adapter tensors go; adapters train in fp32 (fp64 on fp64 bases) even on a half base."""
        if self.owns_weight:
            w = self.weight
        elif isinstance(self.base_layer, LinearWrapper):
            return self.base_layer.weight_device_dtype()
        else:
            w = next(iter(self.base_layer.buffers()), None)
            w = w if w is not None else next(self.base_layer.parameters())
        return w.device, torch.float64 if w.dtype == torch.float64 else torch.float32

    def unwrap(self) -> nn.Module:
        """The module this wrapper replaced (carrying the current, possibly merged, weights)."""
        if self.owns_weight:
            orig = self._original[0]
            orig.weight, orig.bias = self.weight, self.bias
            return orig
        return self.base_layer

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, compute) -> torch.Tensor:
        """Add ``compute(name, x_rows, out_rows)`` for each active, unmerged adapter to the rows that use it (all
        rows, or one group per adapter in a per-example batch); ``compute`` may return None to add nothing."""
        groups = self.batch_groups(x)
        self.check_not_merged(groups)
        for name, rows in groups:
            if name in self.merged:
                continue
            xi, oi = (x, out) if rows is None else (x.index_select(0, rows), out.index_select(0, rows))
            d = compute(name, xi, oi)
            if d is not None:
                out = out + d.to(out.dtype) if rows is None else out.index_add(0, rows, d.to(out.dtype))
        return out

    def check_not_merged(self, groups) -> None:
        if self.merged and [n for n, rows in groups if rows is None] != self.merged:
            raise RuntimeError(f"{type(self).__name__} adapter(s) {self.merged} are merged into the weights; "
                               "unmerge before selecting other adapters or the base model")


def wrapped_layers(model: nn.Module, cls: type) -> dict[str, LinearWrapper]:
    return {p: m for p, m in model.named_modules() if isinstance(m, cls)}


def wrap_targets(model: nn.Module, cls: type, targets: list[str], exclude: list[str] | None = None
                 ) -> dict[str, LinearWrapper]:
    """Wrap every target linear layer in ``cls`` (once: an existing ``cls`` wrapper is reused); path -> wrapper."""
    from tuneforge.methods._inject import find_targets, replace_module

    out = {}
    for path, module in find_targets(model, targets, arch.linear_modules(model), exclude).items():
        layer = _outermost_of(module, cls)
        if layer is None:
            layer = cls(module)
            replace_module(model, path, layer)
        out[path] = layer
    return out


def _outermost_of(module: nn.Module, cls: type):
    """``module`` itself or a wrapper nested inside it that is already a ``cls`` (reused for a second adapter)."""
    while isinstance(module, nn.Module):
        if isinstance(module, cls):
            return module
        module = getattr(module, "base_layer", None) if isinstance(module, LinearWrapper) else None
    return None


def merge_layers(model: nn.Module, cls: type, adapter: str) -> None:
    for layer in wrapped_layers(model, cls).values():
        if adapter in layer.adapter_names():
            layer.merge(adapter)


def unmerge_layers(model: nn.Module, cls: type, adapter: str) -> None:
    for layer in wrapped_layers(model, cls).values():
        layer.unmerge(adapter)


def unload_layers(model: nn.Module, cls: type) -> None:
    """Replace every ``cls`` wrapper with the module it wrapped (merged adapters stay in the weights)."""
    from tuneforge.methods._inject import replace_module

    for path, layer in sorted(wrapped_layers(model, cls).items(), key=lambda kv: -kv[0].count(".")):
        replace_module(model, path, layer.unwrap())
