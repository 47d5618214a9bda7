"""Diff pruning: a learned, sparse difference vector on top of the frozen weights (Guo et al. 2021,
"Parameter-Efficient Transfer Learning with Diff Pruning", https://arxiv.org/abs/2012.07463).

The task model is θ + δ with δ = z ⊙ w (eq. 2): a dense difference w and a gate z ∈ [0, 1] per weight. The gates
follow the hard-concrete relaxation of Louizos et al. 2018 (https://arxiv.org/abs/1712.01312, eqs. 9–12) so the
number of nonzero gates, an L0 norm, becomes differentiable:

    u ~ U(0, 1),  s = σ((log u − log(1 − u) + log α) / β),  z = min(1, max(0, s (r − l) + l))
    E[‖z‖₀] = Σ σ(log α − β log(−l / r))                                      (the penalty, eq. 6 of Guo et al.)

with β = 1, l = −1.5, r = 1.5 as in the paper. Here the penalty is the *fraction* of open gates times ``l0_coef``
(the paper's per-weight λ sum depends on model size; a fraction does not). w starts at zero, so the model starts
unchanged.

Training has the paper's two phases (sec. 3.3, "fixed-sparsity"): first the gated dense delta trains with the L0
penalty; then, after ``project_at`` of the run's optimizer steps, E[z] ⊙ w is projected by magnitude onto exactly
``density`` of the targeted weights (a global top-k), and training goes on with only those entries (a fixed mask, no
gate noise, no penalty) for the rest of the run. The second phase is what makes the method learn at a small budget:
projecting a delta that was trained dense throws most of it away, and the kept entries need steps to take over what
the dropped ones did. On the demo task (benchmarks/method_learning.py: 150 steps, 5% density, lr 5e-3, seed 0),
held-out exact match by ``project_at``: 1.0 (projection only at the end, no second phase) 18.5%, 0.9 51%,
0.75 96.5%, 0.5 100%, 0.25 99.5%. The default 0.5 splits the run evenly: the dense phase needs steps for its
magnitudes to say which weights matter (they choose the mask), the fixed phase needs steps to recover the rest.

The mask lives in a trainable tensor, so checkpoints (trainable tensors + optimizer state) carry it and a resumed
run continues exactly: at projection log α is overwritten with ±``MASK_LOGIT`` (kept / dropped). Such a gate is
exactly 1 or 0 under the formulas above, a trained log α never gets near it, and its sign survives anything the
optimizer does to a tensor that gets no gradient (weight decay, stale Adam moments: the per-step ``on_step`` hook
snaps it back). ``on_step`` is called before every optimizer step with the step and the run's total; it projects at
the first step ≥ ``project_step`` whose weights are not projected yet, so a resume from before, at or after that
step, and every DDP rank (same weights, same step), makes the same decision. ``finalize`` keeps the masked entries
(projecting first if the run never reached ``project_at``, e.g. ``project_at=1``) and saves them as indices into each
layer's (out, in) row-major weight plus their values.

Memory: during training w and log α are dense (twice the targeted weights, plus Adam state), as in the paper; the
saving is in what is stored per task. Targets default to every linear layer but the output head.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.methods._delta import DeltaLayer
from tuneforge.methods._linear import merge_layers, unload_layers, wrap_targets, wrapped_layers
from tuneforge.models import arch

BETA, LEFT, RIGHT = 1.0, -1.5, 1.5
MASK_LOGIT = 2.0 ** 12  # log α of a kept (+) / dropped (−) entry after projection; exact in fp16/bf16/fp32

STATE_SUFFIXES = (".dp_index", ".dp_values", ".dp_w", ".dp_log_alpha")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["diff_pruning"] = "diff_pruning"
    density: float = Field(0.005, gt=0, le=1, description="fraction of targeted weights left nonzero at the end")
    l0_coef: float = Field(1.0, ge=0, description="weight of the expected fraction of open gates in the loss")
    init_log_alpha: float = Field(3.0, description="initial gate logit (3 -> gates start ~open)")
    project_at: float = Field(0.5, gt=0, le=1, description=(
        "fraction of the run's optimizer steps after which E[z]*w is projected to `density` and only the kept "
        "entries train on (1 = project only at the end, no fixed-mask phase)"))
    target_modules: list[str] | None = None
    exclude_modules: list[str] = Field(default_factory=list)


# ----------------------------------------------------------------------------------------- hard-concrete maths
def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A stretched-and-clamped concrete gate for uniform noise ``u`` (Louizos et al. eqs. 9–10)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def hard_concrete_mean(log_alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic gate used outside training: the noise-free sigmoid, stretched and clamped."""
    return (torch.sigmoid(log_alpha) * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) per gate = σ(log α − β log(−l/r)); its sum is the expected L0 norm."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LEFT / RIGHT))


def project_step(project_at: float, total: int) -> int:
    """The optimizer step (0-based, counted before it runs) at which the projection happens: ⌊project_at·total⌉,
    rounding halves up. ``total`` (never reached by the loop) means "at the end", in ``finalize``."""
    return min(total, math.floor(project_at * total + 0.5))


def mask_logits(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log α that encodes a fixed mask: +MASK_LOGIT where kept, −MASK_LOGIT where dropped."""
    return torch.where(keep, MASK_LOGIT, -MASK_LOGIT).to(dtype)


def topk_mask(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks keeping exactly the ``k`` largest scores across all tensors (ties broken by position)."""
    flat = torch.cat([s.flatten() for s in scores])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    return list(keep.split([s.numel() for s in scores]))


# ---------------------------------------------------------------------------------------------------- layer
class DiffPruningLayer(DeltaLayer):
    # No AdamW decay on any of them: the method's own regulariser is the L0 penalty on the gates (Guo et al.
    # eq. 6), which the paper uses alone; decay would shrink the kept diff entries in the fixed-mask phase, and pull
    # log α toward 0, i.e. every gate toward half open.
    ADAPTER_TENSORS = {"dp_w": False, "dp_log_alpha": False, "dp_values": False}

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.dp_w = nn.ParameterDict()
        self.dp_log_alpha = nn.ParameterDict()
        self.dp_values = nn.ParameterDict()  # after projection: the kept entries ...
        self.dp_index: dict[str, torch.Tensor] = {}  # ... and where they go in the (out, in) weight
        self.dp_fixed: set[str] = set()  # adapters in the fixed-mask phase (log α holds ±MASK_LOGIT)

    def adapter_names(self) -> list[str]:
        return list(dict.fromkeys([*self.dp_w, *self.dp_values]))

    def add_adapter(self, name: str, cfg: Config) -> None:
        dev, dt = self.weight_device_dtype()
        shape = (self.out_features, self.in_features)
        self.dp_w[name] = nn.Parameter(torch.zeros(shape, device=dev, dtype=dt))
        self.dp_log_alpha[name] = nn.Parameter(torch.full(shape, cfg.init_log_alpha, device=dev, dtype=dt))
        self._activate(name)

    def gate(self, name: str) -> torch.Tensor:
        la = self.dp_log_alpha[name]
        if name in self.dp_fixed:  # the projected mask: no noise, and no gradient to log α
            return (la.detach() > 0).to(la.dtype)
        if self.training:
            u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
            return hard_concrete_sample(la, u)
        return hard_concrete_mean(la)

    def expected_delta(self, name: str) -> torch.Tensor:
        return hard_concrete_mean(self.dp_log_alpha[name]) * self.dp_w[name]

    def delta(self, name: str) -> torch.Tensor:
        if name in self.dp_values:
            vals = self.dp_values[name]
            flat = torch.zeros(self.out_features * self.in_features, device=vals.device, dtype=vals.dtype)
            return flat.index_put((self.dp_index[name].to(vals.device),), vals).view(self.out_features, self.in_features)
        return self.gate(name) * self.dp_w[name]

    def kept(self, name: str) -> torch.Tensor:
        """The fixed mask (bool, (out, in)) once projected."""
        return self.dp_log_alpha[name].detach() > 0

    @torch.no_grad()
    def fix_mask(self, name: str, keep: torch.Tensor | None = None) -> None:
        """Enter (or stay in) the fixed-mask phase: write ``keep`` (default: the current mask) into log α as
        ±MASK_LOGIT, undoing any drift the optimizer gave a tensor that no longer gets gradients."""
        la = self.dp_log_alpha[name]
        la.copy_(mask_logits(self.kept(name) if keep is None else keep, la.dtype))
        self.dp_fixed.add(name)

    def set_sparse(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the dense (w, log α) pair by the kept entries (frozen from now on)."""
        for d in (self.dp_w, self.dp_log_alpha):
            if name in d:
                del d[name]
        self.dp_fixed.discard(name)
        self.dp_index[name] = index.to(torch.int64)
        self.dp_values[name] = nn.Parameter(values.detach().clone(), requires_grad=False)


def dp_layers(model: nn.Module) -> dict[str, DiffPruningLayer]:
    return wrapped_layers(model, DiffPruningLayer)


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    if any(adapter in layer.adapter_names() for layer in dp_layers(model).values()):
        raise ValueError(f"diff_pruning adapter {adapter!r} already exists on this model")
    targets = cfg.target_modules or sorted({p.rsplit(".", 1)[-1] for p in arch.linear_modules(model)})
    for layer in wrap_targets(model, DiffPruningLayer, targets, cfg.exclude_modules).values():
        layer.add_adapter(adapter, cfg)
        layer.dp_w[adapter].requires_grad_(True)
        layer.dp_log_alpha[adapter].requires_grad_(True)


def _dense_layers(model: nn.Module, adapter: str) -> list[DiffPruningLayer]:
    return [layer for layer in dp_layers(model).values() if adapter in layer.dp_w]


def regularizer(model: nn.Module, cfg: Config, adapter: str = "default") -> torch.Tensor | None:
    """l0_coef × (expected number of open gates / number of gates): added to the loss once per optimizer step,
    until the projection fixes the mask (then there are no gates left to close)."""
    alphas = [layer.dp_log_alpha[adapter] for layer in _dense_layers(model, adapter) if adapter not in layer.dp_fixed]
    if not alphas or cfg.l0_coef == 0:
        return None
    total = sum(a.numel() for a in alphas)
    return cfg.l0_coef * sum(prob_nonzero(a).sum() for a in alphas) / total


def is_projected(layers: list[DiffPruningLayer], adapter: str) -> bool:
    """Whether the weights already hold a projected mask (read from the tensors, so true after a resume too).
    Global, not per layer: the top-k may leave a layer nothing, but it keeps ≥ 1 entry somewhere."""
    return any(bool((layer.dp_log_alpha[adapter] >= MASK_LOGIT / 2).any()) for layer in layers)


@torch.no_grad()
def project(layers: list[DiffPruningLayer], cfg: Config, adapter: str) -> None:
    """Keep the ``density`` largest |E[z] ⊙ w| over all layers (global top-k, sec. 3.3): w becomes E[z] ⊙ w on
    the kept entries and 0 elsewhere, log α the fixed mask, so the model's expected output is unchanged."""
    deltas = [layer.expected_delta(adapter) for layer in layers]
    k = max(1, round(cfg.density * sum(d.numel() for d in deltas)))
    for layer, d, keep in zip(layers, deltas, topk_mask([d.abs() for d in deltas], k)):
        keep = keep.view_as(d)
        layer.dp_w[adapter].copy_(torch.where(keep, d, torch.zeros_like(d)))
        layer.fix_mask(adapter, keep)


def on_step(model: nn.Module, cfg: Config, step: int, total: int, adapter: str = "default") -> None:
    """Before optimizer step ``step`` of ``total``: project once the run reaches ``project_step``; afterwards
    keep the mask fixed. Decided from the step and the weights alone, so a resumed run and every rank agree."""
    layers = _dense_layers(model, adapter)
    if not layers:
        return
    if is_projected(layers, adapter):
        for layer in layers:
            layer.fix_mask(adapter)
    elif step >= project_step(cfg.project_at, total):
        project(layers, cfg, adapter)
    else:
        for layer in layers:
            layer.dp_fixed.discard(adapter)


@torch.no_grad()
def finalize(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    """Keep only the masked entries (projecting E[z] ⊙ w to exactly ``density`` first, if training did not)."""
    layers = _dense_layers(model, adapter)
    if not layers:
        return
    if not is_projected(layers, adapter):
        project(layers, cfg, adapter)
    for layer in layers:
        index = layer.kept(adapter).flatten().nonzero().flatten()
        layer.set_sparse(adapter, index, layer.dp_w[adapter].detach().flatten()[index])


def merge(model: nn.Module, adapter: str = "default") -> None:
    merge_layers(model, DiffPruningLayer, adapter)


def unload(model: nn.Module) -> None:
    unload_layers(model, DiffPruningLayer)


def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Projected: ``<path>.dp_index`` + ``<path>.dp_values``; before projection the dense ``dp_w``/``dp_log_alpha``."""
    out = {}
    for path, layer in dp_layers(model).items():
        if adapter in layer.dp_values:
            out[f"{path}.dp_index"] = layer.dp_index[adapter]
            out[f"{path}.dp_values"] = layer.dp_values[adapter].detach()
        elif adapter in layer.dp_w:
            out[f"{path}.dp_w"] = layer.dp_w[adapter].detach()
            out[f"{path}.dp_log_alpha"] = layer.dp_log_alpha[adapter].detach()
    return out


def load_state_dict(model: nn.Module, cfg: Config | None, tensors: dict[str, torch.Tensor],
                    adapter: str = "default") -> None:
    """Accepts the projected form (what training saves) or the dense one."""
    layers = dp_layers(model)
    seen = {k.rsplit(".", 1)[0] for k in tensors}
    if seen != set(layers):
        raise KeyError(f"diff_pruning weights do not fit this model: layers missing "
                       f"{sorted(set(layers) - seen)[:3]}, unexpected {sorted(seen - set(layers))[:3]}")
    for path, layer in layers.items():
        if f"{path}.dp_index" in tensors:
            index, values = tensors[f"{path}.dp_index"], tensors[f"{path}.dp_values"]
            if index.numel() and int(index.max()) >= layer.out_features * layer.in_features:
                raise ValueError(f"{path}.dp_index points outside the ({layer.out_features}, {layer.in_features}) "
                                 "weight (different base model?)")
            layer.set_sparse(adapter, index, values.to(layer.weight_device_dtype()[1]))
        else:
            with torch.no_grad():
                layer.dp_w[adapter].copy_(tensors[f"{path}.dp_w"])
                layer.dp_log_alpha[adapter].copy_(tensors[f"{path}.dp_log_alpha"])
