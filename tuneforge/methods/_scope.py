"""Which named adapter is active: one for the batch, none (the base model), or one per example.

Every tuneforge layer that holds adapters subclasses :class:`AdapterLayer` and reads ``self.active`` in its forward.
``adapter_scope`` sets that on every such layer of a model for the duration of a ``with`` block, so:

* ``adapter_scope(model, None)`` runs the frozen base model. DPO, PPO and GRPO use it as their reference model, which
  is why adapter methods never need a second copy of the weights;
* ``adapter_scope(model, "task_a")`` runs one adapter;
* ``adapter_scope(model, ["a", "b", None, "a"])`` gives each example of the batch its own adapter (mixed-task batches),
  equal to running the examples one by one with their adapter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PerExample:
    """Adapter names per batch row (None = base). ``groups`` maps each name to the row indices that use it."""

    names: tuple[str | None, ...]

    def groups(self, device) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name in dict.fromkeys(n for n in self.names if n is not None):
            idx = [i for i, n in enumerate(self.names) if n == name]
            out.append((name, torch.tensor(idx, device=device)))
        return out


class AdapterLayer(nn.Module):
    """Mixin state for layers with named adapters.

    ``active`` is a tuple of adapter names applied to the whole batch (several = summed), or a ``PerExample``.
    New adapters become active when added, matching the everyday one-adapter case.
    """

    active: tuple[str, ...] | PerExample
    is_adapter_layer = True  # read by models.arch, which must not import methods

    # The attributes (ModuleDict/ParameterDict) holding this method's tensors -> whether AdamW's weight decay applies
    # to them. Decoupled decay (Loshchilov & Hutter 2019) pulls a tensor toward 0, a useful prior only for tensors
    # whose identity value is 0 (LoRA's A/B, a weight update ΔW); a tensor whose identity is another value (IA3's
    # scaling vectors, 1; DoRA's magnitude, ||W0||) is left out of decay instead of being pulled away from it.
    # Empty = undeclared: see ``adapter_tensors``.
    ADAPTER_TENSORS: dict[str, bool] = {}

    def adapter_names(self) -> list[str]:  # overridden by each layer type
        raise NotImplementedError

    def base_parameters(self) -> list[nn.Parameter]:
        """The tensors of the module this layer adapts (its base); overridden by each layer type."""
        return []

    def adapter_tensors(self) -> dict[str, tuple[nn.Parameter, bool]]:
        """name -> (tensor, decays) for the tensors this layer's method added (never its base's, even when the base
        is another method's layer: that layer reports its own). A layer type that declares no ``ADAPTER_TENSORS``
        gets every tensor that is not its base's, without weight decay."""
        if self.ADAPTER_TENSORS:
            return {f"{attr}.{n}": (p, decays) for attr, decays in self.ADAPTER_TENSORS.items()
                    for n, p in getattr(self, attr).named_parameters()}
        base = {id(p) for p in self.base_parameters()}
        return {n: (p, False) for n, p in self.named_parameters() if id(p) not in base}

    def batch_groups(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor | None]]:
        """(adapter, row index or None for "all rows") pairs this forward must add."""
        if isinstance(self.active, PerExample):  # rows whose adapter lives on other layers use the base here
            names = set(self.adapter_names())
            return [(n, rows) for n, rows in self.active.groups(x.device) if n in names]
        return [(name, None) for name in self.active]


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


def _normalise(model: nn.Module, spec) -> tuple[str, ...] | PerExample:
    known = set()
    for layer in adapter_layers(model):
        known.update(layer.adapter_names())
    names = [spec] if isinstance(spec, str) else list(spec or [])
    for n in names:
        if n is not None and n not in known:
            raise KeyError(f"unknown adapter {n!r}; this model has: {', '.join(sorted(known)) or 'none'}")
    if spec is None or isinstance(spec, str):
        return tuple(names)
    if isinstance(spec, tuple) and all(isinstance(n, str) for n in spec):
        return spec  # several adapters stacked on the whole batch
    return PerExample(tuple(names))


@contextlib.contextmanager
def adapter_scope(model: nn.Module, spec):
    """Activate adapters inside a ``with`` block; the previous selection comes back on exit.

    spec: ``None`` (base model), a name, a tuple of names (all applied to every row), or a list with one entry per
    batch row (per-example adapters; entries may be None).
    """
    active = _normalise(model, spec)
    layers = adapter_layers(model)
    saved = [layer.active for layer in layers]
    try:
        for layer in layers:
            layer.active = active if isinstance(active, PerExample) else tuple(
                n for n in active if n in layer.adapter_names())
        yield
    finally:
        for layer, prev in zip(layers, saved):
            layer.active = prev


def set_active(model: nn.Module, names: tuple[str, ...]) -> None:
    """Make ``names`` the lasting selection (outside any scope)."""
    for layer in adapter_layers(model):
        layer.active = tuple(n for n in names if n in layer.adapter_names())
