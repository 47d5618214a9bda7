"""Shared layer for methods that learn an additive, same-shape weight update ΔW (diff pruning, sparse fine-tuning).

    y = W x + b + ΔW x

Each subclass says how ΔW is parameterised (``delta``); this class adds it to the base output for the active
adapter(s), per example when asked, and folds it into the weight on ``merge``. The update is applied as a second
matmul rather than as W + ΔW so the same code works on a quantised or nested base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.methods._linear import LinearWrapper
from tuneforge.methods._scope import PerExample


class DeltaLayer(LinearWrapper):

    def adapter_names(self) -> list[str]:  # pragma: no cover - each subclass lists its adapters
        raise NotImplementedError

    def delta(self, name: str) -> torch.Tensor:
        """ΔW for adapter ``name`` as (out, in)."""
        raise NotImplementedError

    def forward_delta(self, name: str) -> torch.Tensor:
        """ΔW as used in a training/eval forward (LoKr adds rank dropout here); ``delta`` is what merges."""
        return self.delta(name)

    def skip(self, name: str) -> bool:
        """Leave adapter ``name`` out of this forward (LoKr's module dropout)."""
        return False

    def _activate(self, name: str) -> None:
        self.active = tuple(self.active) + (name,) if not isinstance(self.active, PerExample) else self.active

    def _delta_out(self, name: str, x: torch.Tensor, _out: torch.Tensor) -> torch.Tensor | None:
        if self.skip(name):
            return None
        d = self.forward_delta(name)
        return F.linear(x.to(d.dtype), d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_adapters(x, self.base_forward(x), self._delta_out)

    @torch.no_grad()
    def _fold(self, name: str, sign: float) -> None:
        w, d = self.base_weight(), self.delta(name) * sign
        w.add_((d.t() if self.fan_in_fan_out else d).to(w.dtype))

    def merge(self, name: str) -> None:
        if name not in self.merged:
            self._fold(name, 1.0)
            self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self._fold(name, -1.0)
            self.merged.remove(name)
