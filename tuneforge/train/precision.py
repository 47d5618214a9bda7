"""Mixed precision: which compute dtype a run uses, the autocast context, and frozen weights kept in that dtype.

bf16 autocast (Micikevicius et al. 2018, https://arxiv.org/abs/1710.03740, with bf16 instead of fp16 so no loss
scaling is needed) keeps fp32 master weights and runs matmuls in bf16. A frozen weight has no master copy to keep:
autocast would round it to bf16 again on every forward (and hold the copy for backward). Storing it in bf16 once
gives the very same matmul inputs, so the same results, while saving that cast and half the weight's memory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from tuneforge.models import arch


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` = bf16 autocast where the hardware runs bf16 matmuls natively, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def _matmul_only(module: nn.Module) -> bool:
    """Layers whose weight autocast only ever feeds to a matmul (so a bf16 copy changes nothing)."""
    if getattr(module, "is_adapter_layer", False):
        return bool(getattr(module, "frozen_base_castable", False))
    return type(module) is nn.Linear or arch.is_conv1d(module)


def _castable(model: nn.Module) -> list[nn.Parameter]:
    """Frozen fp32 weights/biases used only by matmul-only layers. A tensor shared with any other kind of module (a
    head tied to the input embedding) is left out: the embedding lookup runs in the weight's own dtype."""
    users: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users.setdefault(id(p), []).append(module)
    out = []
    for p in {id(p): p for p in model.parameters()}.values():
        mods = users.get(id(p), [])
        if p.requires_grad or p.dtype != torch.float32 or not mods or not all(_matmul_only(m) for m in mods):
            continue
        out.append(p)
    return out


def cast_frozen_matmul_weights_(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store frozen fp32 weights/biases of matmul-only layers in ``dtype``; returns how many tensors were cast.

    Only valid while every forward runs under autocast to ``dtype`` and the base weights are not saved (adapter
    methods).
    """
    params = _castable(model)
    for p in params:
        p.data = p.data.to(dtype)
    return len(params)


@contextlib.contextmanager
def frozen_weights_as(model: nn.Module, dtype: torch.dtype = torch.bfloat16):
    """For the duration: frozen matmul weights held in ``dtype`` and forwards under autocast to it; afterwards the
    fp32 tensors are put back untouched. Rollouts use it to sample at bf16 speed from an fp32-trained policy."""
    params = _castable(model)
    saved = [p.data for p in params]
    device = next(model.parameters()).device
    try:
        for p in params:
            p.data = p.data.to(dtype)
        with torch.autocast(device.type, dtype=dtype):
            yield len(params)
    finally:
        for p, d in zip(params, saved):
            p.data = d
