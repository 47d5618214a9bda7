"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step (``lr_factor``), so resuming needs no scheduler object: the step counter
in the checkpoint is the whole schedule state.

Weight decay (decoupled, Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101) pulls each decayed tensor toward
0 every step, whatever its gradient. That is a useful prior only where 0 is the tensor's neutral value, so which
tensors decay is each method's call (``methods.weight_decays``), never the tensor's shape: LoRA's A/B, LoKr's factors
and sparse ΔW values decay (toward the unchanged layer); IA3's scaling vectors (identity 1, shapes (out, 1) and
(1, in)) and DoRA's magnitude (identity ||W0||) do not; the model's own tensors (full, freeze, BitFit, heads) decay
except biases and norm parameters, the HF Trainer / PEFT practice. Tensors whose identity is not 0 are excluded rather
than decayed toward their identity: that would need a per-tensor anchor in both optimizers for a prior no method here
relies on.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warm-up, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        decay = 1.0 - progress
    elif kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown scheduler {kind!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def warmup_steps(tcfg, total: int) -> int:
    return tcfg.warmup_steps or int(round(tcfg.warmup_ratio * total))


def param_groups(params: dict[str, nn.Parameter], weight_decay: float, decays: dict[str, bool]) -> list[dict]:
    """Two AdamW groups: the tensors ``decays`` marks (at ``weight_decay``), the rest at 0; empty groups dropped."""
    missing = set(params) - set(decays)
    if missing:
        raise KeyError(f"no weight-decay decision for {sorted(missing)[:3]}")
    decay = [p for n, p in params.items() if decays[n]]
    no_decay = [p for n, p in params.items() if not decays[n]]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def make_optimizer(params: dict[str, nn.Parameter], tcfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or 8-bit-state AdamW) over the trainable ``params`` of ``model``, decaying what the methods say.

    ``adamw8bit`` and ``optimizer_offload`` are the optimizer-memory levers the QLoRA paper pairs with NF4 weights:
    the moments shrink from 8 to ~2 bytes per trainable parameter, or move to CPU RAM.
    """
    from tuneforge.methods import weight_decays

    groups = param_groups(params, tcfg.weight_decay, weight_decays(model, params))
    offload, paged = getattr(tcfg, "optimizer_offload", False), getattr(tcfg, "paged_optimizer", False)
    if getattr(tcfg, "optimizer", "adamw") == "adamw8bit" or offload or paged:
        from tuneforge.train.adam8bit import AdamW8bit

        if getattr(tcfg, "optimizer", "adamw") != "adamw8bit":
            raise ValueError("train.optimizer_offload / train.paged_optimizer need train.optimizer: adamw8bit")
        return AdamW8bit(groups, lr=tcfg.learning_rate, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                         offload=offload, paged=paged)
    all_cpu = all(p.device.type == "cpu" for p in params.values())
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                             foreach=not all_cpu or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
