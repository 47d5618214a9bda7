"""AdapterFusion: learn to combine N adapters trained before, each on its own task, and now frozen (Pfeiffer,
Kamath, Rücklé, Cho & Gurevych 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
https://arxiv.org/abs/2005.00247, sec. 3.2 "Stage two", eq. 3 and fig. 2).

At every adapted sub-layer with input h and the N frozen adapters' outputs A_n(h), a small attention picks, per
token, how much of each adapter to use:

    s_n = softmax_n( (Q h) · (K A_n(h)) / T ),        out = h + Σ_n s_n V A_n(h)

with Q, K, V trainable (d x d, with biases), T a temperature (1 in the paper). This follows the paper's figure and
AdapterHub's implementation in attending over the adapters' outputs and adding the sub-layer's own output once
(the residual), so with all adapters at zero the model is the base. V starts at the identity (so the fusion starts
as the s-weighted mix of the adapters, uniform while Q and K are small; Q, K normal with std 0.02), and the paper's
regulariser λ Σ ||I - V||² (sec. 3.2, λ = 0.01) keeps V near it; the training loop adds it once per step.

``adapters`` lists the directories of the member adapters (written by tuneforge train); they must share one
bottleneck method (houlsby, pfeiffer, parallel, scaled_parallel, compacter, compacter_pp or adapter_bias) and the
base model, which is checked before any weight loads. Only Q, K and V train. The saved fusion is one unit: its file
holds the members' weights and its config their method configs (``members``), so it loads without the original
directories. Not mergeable (attention over non-linear adapters).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.methods import _bottleneck as BN
from tuneforge.methods._inject import copy_checked

MERGEABLE = False
NAME = "adapter_fusion"
FUSABLE = ("houlsby", "pfeiffer", "parallel", "scaled_parallel", "compacter", "compacter_pp", "adapter_bias")
QK_INIT_STD = 0.02
ATTR = "tuneforge_fusion"  # on the model: adapter name -> the member configs


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["adapter_fusion"] = "adapter_fusion"
    adapters: list[str] = Field(..., min_length=2, description="directories of the trained member adapters")
    members: list[dict] | None = Field(None, description="the members' method configs; written when the fusion is "
                                                         "saved, so it loads without the directories")
    regularization: float = Field(0.01, ge=0, description="λ of λ Σ ||I - V||² (Pfeiffer et al.: 0.01)")
    temperature: float = Field(1.0, gt=0, description="T, dividing the attention scores")


class Fusion(nn.Module):
    """Attention over one sub-layer's member adapters (eq. 3)."""

    def __init__(self, d_query: int, d: int, members: list[str], temperature: float, device=None, dtype=None):
        super().__init__()
        self.members, self.temperature = list(members), float(temperature)
        kw = {"device": device, "dtype": dtype}
        self.query, self.key, self.value = nn.Linear(d_query, d, **kw), nn.Linear(d, d, **kw), nn.Linear(d, d, **kw)
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=QK_INIT_STD)
                nn.init.zeros_(lin.bias)
            self.value.weight.copy_(torch.eye(d, **kw))
            nn.init.zeros_(self.value.bias)

    def forward(self, h: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        z = torch.stack(outputs, dim=-2).to(self.key.weight.dtype)  # (..., N, d)
        q = self.query(h.to(self.query.weight.dtype))  # (..., d)
        scores = (self.key(z) @ q.unsqueeze(-1)).squeeze(-1) / self.temperature  # (..., N)
        probs = scores.softmax(dim=-1)
        return (probs.unsqueeze(-1) * self.value(z)).sum(dim=-2)


def member_name(adapter: str, i: int) -> str:
    return f"{adapter}__member{i}"


def read_members(cfg: Config) -> tuple[list, list[dict[str, torch.Tensor] | None]]:
    """The members' method configs and weights: from ``members`` (a saved fusion; weights come with its file) or
    read from the directories, refusing a directory that is not one fusable adapter, or members of different
    methods."""
    from tuneforge.methods import METHOD_CONFIGS, _weights_file, read_adapter_config
    from tuneforge.safeio import load_safetensors

    if cfg.members is not None:
        return [METHOD_CONFIGS[m["name"]].model_validate(m) for m in cfg.members], [None] * len(cfg.members)
    cfgs, weights = [], []
    for path in cfg.adapters:
        found = read_adapter_config(path)
        if len(found) != 1 or found[0].name not in FUSABLE:
            raise ValueError(f"{NAME}: {path} holds {[c.name for c in found]}; each member must be one bottleneck "
                             f"adapter ({', '.join(FUSABLE)}) saved on its own (not in a list, e.g. with "
                             "adapter_drop)")
        cfgs.append(found[0])
        weights.append(load_safetensors(_weights_file(path)))
    kinds = sorted({c.name for c in cfgs})
    if len(kinds) > 1:
        raise ValueError(f"{NAME}: the members are of different types ({', '.join(kinds)}); fuse adapters of one "
                         "method, trained on the same base model")
    return cfgs, weights


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    from tuneforge.methods import METHODS

    members, weights = read_members(cfg)
    names = [member_name(adapter, i) for i in range(len(members))]
    for name, mcfg, tensors in zip(names, members, weights):
        mod = METHODS[mcfg.name]
        mod.apply(model, mcfg, name)
        if tensors is not None:
            mod.load_state_dict(model, mcfg, tensors, name)
    # every sub-layer that holds any member gets a fusion over the members it holds (a member trained on fewer
    # targets is left out where it has no adapter, as AdapterHub does); members are frozen and reached only
    # through the fusion, everywhere
    sites = {p: layer for p, layer in BN.bottleneck_layers(model).items()
             if any(n in layer.adapter_down for n in names)}
    for path, layer in sites.items():
        if adapter in layer.adapter_names():
            raise ValueError(f"{NAME}: adapter name {adapter!r} is already used at {path} (by {layer.method}); a "
                             "fusion cannot share its name with an adapter at its sites: apply it under another "
                             "adapter name, or list it alone")
        here = [n for n in names if n in layer.adapter_down]
        for n in here:
            for p in (*layer.adapter_down[n].parameters(), *layer.adapter_up[n].parameters()):
                p.requires_grad_(False)
            if n in layer.adapter_scale:
                layer.adapter_scale[n].requires_grad_(False)
        ref = next(layer.adapter_up[here[0]].parameters())
        src = layer.d_in if layer.placement == "parallel" else layer.d_out
        layer.fusion[adapter] = Fusion(src, layer.d_out, here, cfg.temperature, ref.device, ref.dtype)
        if isinstance(layer.active, tuple):
            layer.active = tuple(a for a in layer.active if a not in names) + (adapter,)
    if not hasattr(model, ATTR):
        setattr(model, ATTR, {})
    getattr(model, ATTR)[adapter] = members


def _fusions(model: nn.Module, adapter: str) -> dict[str, Fusion]:
    return {p: layer.fusion[adapter] for p, layer in BN.bottleneck_layers(model).items() if adapter in layer.fusion}


def saved_config(model: nn.Module, cfg: Config, adapter: str = "default") -> Config:
    """The config written beside the weights: with the members' configs, so the unit loads on its own."""
    members = getattr(model, ATTR, {}).get(adapter)
    return cfg.model_copy(update={"members": [m.model_dump(mode="json") for m in members]}) if members else cfg


def for_loading(cfg: Config) -> Config:
    if cfg.members is None:
        raise ValueError(f"{NAME}: this adapter config lists no members; it was not written by save_adapter")
    return cfg


def regularizer(model: nn.Module, cfg: Config, adapter: str = "default") -> torch.Tensor | None:
    """λ Σ_layers ||I - V||²_F (sec. 3.2): keeps the value matrices near the identity they start at."""
    terms = []
    for f in _fusions(model, adapter).values():
        w = f.value.weight
        terms.append(((torch.eye(w.shape[0], device=w.device, dtype=w.dtype) - w) ** 2).sum())
    if not terms or cfg.regularization == 0:
        return None
    return cfg.regularization * torch.stack(terms).sum()


def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    from tuneforge.methods import METHODS

    out = {}
    for i, mcfg in enumerate(getattr(model, ATTR, {}).get(adapter, [])):
        for k, v in METHODS[mcfg.name].state_dict(model, mcfg, member_name(adapter, i)).items():
            out[f"{NAME}.member{i}.{k}"] = v
    for path, f in _fusions(model, adapter).items():
        for k, v in f.state_dict().items():
            out[f"{path}.fusion.{k}"] = v.detach()
    return out


def load_state_dict(model: nn.Module, cfg: Config, tensors: dict[str, torch.Tensor], adapter: str = "default") -> None:
    from tuneforge.methods import METHODS

    expected = state_dict(model, cfg, adapter)
    if set(expected) != set(tensors):
        copy_checked(expected, tensors, NAME)  # raises, naming what is missing and unexpected
    for i, mcfg in enumerate(getattr(model, ATTR)[adapter]):
        prefix = f"{NAME}.member{i}."
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        METHODS[mcfg.name].load_state_dict(model, mcfg, part, member_name(adapter, i))
    fused = {k: v for k, v in expected.items() if not k.startswith(f"{NAME}.member")}
    copy_checked(fused, {k: tensors[k] for k in fused}, NAME)


def merge(model: nn.Module, adapter: str = "default") -> None:
    raise BN.NotMergeableError(f"{NAME} attends over non-linear adapters per token; it cannot be folded into the "
                               "base weights. Keep it beside the base model (tuneforge generate/serve --adapter)")


def unload(model: nn.Module) -> None:
    BN.unload(model)
    if hasattr(model, ATTR):
        delattr(model, ATTR)
