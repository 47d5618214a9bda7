"""AdapterDrop: no adapters in the lowest k blocks, at training and at inference (Rücklé et al. 2021, "AdapterDrop:
On the Efficiency of Adapters in Transformers", https://arxiv.org/abs/2010.11918, sec. 3 and 4).

Listed after the bottleneck adapters it acts on (``[houlsby, adapter_drop]``; any of houlsby, pfeiffer, parallel,
scaled_parallel, compacter, compacter_pp, adapter_bias, or an adapter_fusion), it switches every adapter in blocks
0 .. k-1 off. Why that saves compute:

* *training*: with the base frozen, nothing below block k needs a gradient, so autograd's backward stops at block
  k instead of running down to the embeddings (sec. 3: "we do not need to backpropagate through the first layers");
* *inference over several tasks at once* (sec. 4, the paper's 39% for 8 tasks with 5 blocks dropped): the lowest k
  blocks are the plain base model for every task, so ``parallel_tasks`` runs them once and only blocks k.. once per
  task.

``drop_layers: k`` fixes k, and the adapters of those blocks are never created (the seed documents' parameter count
(L - k) x ...). ``random: true`` is the paper's robust AdapterDrop: every optimizer step draws k uniformly from
0 .. drop_layers (from the step number and ``seed`` alone, so a resumed run and every rank draw the same), which
keeps all adapters and lets inference pick any k (``inference_drop_layers``, default 0 for a robust model, k for a
fixed one). A random k is a kind of dropout: where the algorithm trains with dropout off (DPO, PPO, GRPO, ...:
their two forwards must agree at equal weights), training uses the inference k too. The drop acts on the adapter
name it is applied under, not on other adapters in the same blocks. AdapterDrop adds no tensor; whether the result
merges is up to the adapters (none of these does).
"""

from __future__ import annotations

import random as _random
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tuneforge.methods import _bottleneck as BN
from tuneforge.methods._inject import replace_module
from tuneforge.methods._scope import adapter_scope
from tuneforge.models import arch

NAME = "adapter_drop"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["adapter_drop"] = "adapter_drop"
    drop_layers: int = Field(..., ge=1, description="k: adapters off in blocks 0 .. k-1 (with random: the largest k "
                                                    "drawn)")
    random: bool = Field(False, description="draw k from 0 .. drop_layers every optimizer step (robust "
                                            "AdapterDrop); all adapters are kept")
    inference_drop_layers: int | None = Field(None, ge=0, description="k at inference; default drop_layers (fixed) "
                                                                      "or 0 (random)")
    seed: int = 0

    @model_validator(mode="after")
    def _inference_k(self):
        if not self.random and self.inference_drop_layers is not None and \
                self.inference_drop_layers < self.drop_layers:
            raise ValueError(f"inference_drop_layers {self.inference_drop_layers} < drop_layers {self.drop_layers}: "
                             "with a fixed k the lowest blocks have no adapters to switch on; train with random: "
                             "true to choose k at inference")
        return self

    def eval_k(self) -> int:
        if self.inference_drop_layers is not None:
            return self.inference_drop_layers
        return 0 if self.random else self.drop_layers


def _layers(model: nn.Module, adapter: str) -> dict[str, BN.BottleneckLayer]:
    return {p: layer for p, layer in BN.bottleneck_layers(model).items() if adapter in layer.adapter_names()}


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    layers = _layers(model, adapter)
    if not layers:
        raise ValueError(f"{NAME} drops bottleneck adapters from the lowest blocks, and this method list has none "
                         "before it; list it after one (e.g. [houlsby, adapter_drop])")
    n = len(arch.blocks(model))
    if max(cfg.drop_layers, cfg.eval_k()) >= n:
        raise ValueError(f"{NAME}: k = {max(cfg.drop_layers, cfg.eval_k())} would drop the adapters of all {n} "
                         f"blocks; use a k below {n}")
    for path, layer in layers.items():
        if not cfg.random and layer.block is not None and layer.block < cfg.drop_layers:
            _remove(model, path, layer, adapter)
            continue
        layer.drop_below[adapter] = {"train": 0 if cfg.random else cfg.drop_layers, "eval": cfg.eval_k()}


def _remove(model: nn.Module, path: str, layer: BN.BottleneckLayer, adapter: str) -> None:
    for d in (layer.adapter_down, layer.adapter_up, layer.adapter_scale, layer.fusion):
        if adapter in d:
            del d[adapter]
    layer.fixed_scale.pop(adapter, None)
    layer.act.pop(adapter, None)
    layer.drop_below.pop(adapter, None)
    if isinstance(layer.active, tuple):
        layer.active = tuple(a for a in layer.active if a != adapter)
    if not layer.adapter_names():
        replace_module(model, path, layer.base)


def draw_k(cfg: Config, step: int) -> int:
    """k for optimizer step ``step`` (0-based): fixed, or drawn from the step and the seed alone."""
    return _random.Random(f"{cfg.seed}:{step}").randint(0, cfg.drop_layers) if cfg.random else cfg.drop_layers


def on_step(model: nn.Module, cfg: Config, step: int, total: int, adapter: str = "default") -> None:
    if cfg.random:
        for layer in _layers(model, adapter).values():
            layer.drop_below[adapter]["train"] = draw_k(cfg, step)


def merge(model: nn.Module, adapter: str = "default") -> None:
    """Nothing of its own to fold (the adapters it acts on decide)."""


def unload(model: nn.Module) -> None:
    for layer in BN.bottleneck_layers(model).values():
        layer.drop_below = {}


def state_dict(model: nn.Module, cfg=None, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {}


def load_state_dict(model: nn.Module, cfg, tensors: dict[str, torch.Tensor], adapter: str = "default") -> None:
    pass


# --------------------------------------------------------------------------------- several tasks in one forward
def _repeat(value, batch: int, times: int):
    """``value`` with every tensor whose first dimension is the batch repeated ``times`` (task-major), through
    tuples, lists and dicts (position embeddings are a (cos, sin) pair)."""
    if isinstance(value, torch.Tensor):
        return value.repeat(times, *([1] * (value.dim() - 1))) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(v, batch, times) for v in value)
    if isinstance(value, dict):
        return {k: _repeat(v, batch, times) for k, v in value.items()}
    return value


@torch.no_grad()
def parallel_tasks(model: nn.Module, input_ids: torch.Tensor, adapters: list[str], shared_layers: int,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of every adapter in ``adapters`` on the same batch, shape (tasks, batch, seq, vocab), running blocks
    0 .. shared_layers-1 once for all of them (AdapterDrop's parallel multi-task inference, Rücklé et al. sec. 4).
    Exact, not an approximation, when those blocks hold no active adapter: the model must be in eval mode with
    AdapterDrop's inference k ≥ ``shared_layers`` (checked). Equal to running each adapter alone."""
    blocks = arch.blocks(model)
    if not 0 < shared_layers < len(blocks):
        raise ValueError(f"shared_layers must be in 1 .. {len(blocks) - 1}")
    for layer in BN.bottleneck_layers(model).values():
        live = [a for a in adapters if a in layer.adapter_names() and not layer.dropped(a)]
        if layer.block is not None and layer.block < shared_layers and live:
            raise ValueError(f"block {layer.block} has active adapters {live}: blocks below shared_layers "
                             f"{shared_layers} must be dropped at inference (inference_drop_layers ≥ "
                             f"{shared_layers}, model in eval mode)")
    from tuneforge.methods._scope import adapter_layers

    other = [type(m).__name__ for m in adapter_layers(model) if not isinstance(m, BN.BottleneckLayer)
             and any(a in m.adapter_names() for a in adapters)]
    if other or getattr(model, "tuneforge_soft_prompts", None) is not None:
        raise ValueError("parallel_tasks shares the lowest blocks between bottleneck adapters only; these adapters "
                         f"also use {', '.join(sorted(set(other))) or 'soft prompts'}")
    b, t = len(adapters), input_ids.shape[0]

    def widen(module, args, kwargs):
        return _repeat(args, t, b), _repeat(kwargs, t, b)

    # every block from shared_layers on gets the model's per-layer inputs (mask, position embeddings) widened too;
    # the hidden states arrive widened from the block before
    handles = [blk.register_forward_pre_hook(widen, with_kwargs=True) for _, blk in blocks[shared_layers:]]
    try:
        with adapter_scope(model, [a for a in adapters for _ in range(t)]):
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return out.view(b, t, *out.shape[1:])
