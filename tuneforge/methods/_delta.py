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
    frozen_base_castable = False  # merged updates are added to the base weight in fp32

    def adapter_names(self) -> list[str]:  # pragma: no cover - each subclass lists its adapters
        raise NotImplementedError

    def delta(self, name: str) -> torch.Tensor:
        """ΔW for adapter ``name`` as (out, in)."""
        raise NotImplementedError

    def _activate(self, name: str) -> None:
        self.active = tuple(self.active) + (name,) if not isinstance(self.active, PerExample) else self.active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        groups = self.batch_groups(x)
        self.check_not_merged(groups)
        for name, rows in groups:
            if name in self.merged:
                continue
            d = self.delta(name)
            xi = x if rows is None else x.index_select(0, rows)
            y = F.linear(xi.to(d.dtype), d).to(out.dtype)
            out = out + y if rows is None else out.index_add(0, rows, y)
        return out

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
