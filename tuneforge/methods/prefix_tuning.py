"""Prefix tuning: trainable keys and values in front of every attention layer (Li & Liang 2021, "Prefix-Tuning:
Optimizing Continuous Prompts for Generation", https://arxiv.org/abs/2101.00190, sec. 4.2, eq. 3-5).

Every layer's attention reads ``[P_k; K(x)]`` and ``[P_v; V(x)]``: h_i = P_θ[i, :] for the n prefix positions (eq.
3), with only P_θ trained, n x layers x 2 x kv_dim numbers (20 x 30 x 2 x 192 = 230,400 on SmolLM2-135M, whose
grouped-query attention has 3 KV heads of 64: PEFT's ``token_dim`` is head_dim x KV heads).

``projection: true`` is the paper's reparameterisation P_θ[i, :] = MLP_θ(P'_θ[i, :]) (eq. 5; a smaller P' and a
tanh MLP), which the paper found to stabilise training (sec. 4.3, ablation in sec. 7.2). Only the product is used
after training: PEFT saves it alone (``prompt_embeddings``, n x layers·2·kv_dim) and so cannot resume a run
(peft#1247); tuneforge saves it in PEFT's layout *and* the encoder's weights beside it, so a run resumes exactly.

Initialisation (sec. 7.2: "initializing the prefix with activations of real words significantly improves
generation" in low-data settings): ``sample_vocab`` or ``text`` start P at the keys and values the model itself
computes for real tokens; ``random`` draws normal values at each layer's own key/value scale. With ``projection``,
P' starts random (its width is the KV width, not the embedding's). The keys sit after rotary embedding (as in
PEFT, the cache holds rotated keys), and the input's positions start at n.

There is no ``gate`` option (UniPELT's G_P, which LoRA and the bottleneck adapters have): the paper's gate scales the
prefix per query token, and a prefix held in the KV cache is one set of keys and values read by every query; the
per-row sequence mean AdapterHub uses instead would leak later tokens into earlier ones and differ between a cached
generation and a full forward. ``unipelt``'s docstring gives the details.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tuneforge.methods import _soft_prompt as SP
from tuneforge.methods._scope import adapter_scope

NAME = "prefix_tuning"
PEFT_TYPE = "PREFIX_TUNING"
MERGEABLE = False
STATE_SUFFIXES = SP.state_suffixes()


class PrefixConfig(SP.InitConfig):
    init: Literal["random", "sample_vocab", "text"] | None = Field(
        None, description="sample_vocab / text (the model's own keys and values for real tokens, Li & Liang sec. "
        "7.2) or random (normal at each layer's key/value scale); default sample_vocab, random with projection")

    def resolved_init(self) -> str:
        return self.init or ("random" if getattr(self, "projection", False) else "sample_vocab")


class Config(PrefixConfig):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    projection: bool = Field(False, description="reparameterise the prefix through a tanh MLP while training "
                                                "(Li & Liang eq. 5; PEFT's prefix_projection)")
    encoder_hidden_size: int | None = Field(None, gt=0, description="the MLP's width; default the model's d")

    @model_validator(mode="after")
    def _projection_init(self):
        if self.projection and self.init not in (None, "random"):
            raise ValueError(f"init: {self.init} needs projection: false (the projected prefix starts from random "
                             "P'; its width is the KV width, not a token embedding's)")
        if self.encoder_hidden_size is not None and not self.projection:
            raise ValueError("encoder_hidden_size is the projection MLP's width; it needs projection: true")
        return self


class PrefixEncoder(SP.PromptModule):
    kind = "kv"

    def __init__(self, method: str, value: torch.Tensor | None, n: int, kv_dim: int, flat: int,
                 hidden: int | None, device, dtype):
        super().__init__()
        self.method = method
        if hidden is None:
            self.embedding = nn.Parameter(value)
            self.projection = False
        else:
            self.projection = True
            self.embedding = nn.Parameter(torch.randn(n, kv_dim, dtype=dtype).to(device))  # PEFT's N(0, 1) P'
            kw = {"device": device, "dtype": dtype}
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, flat, **kw))

    @property
    def n(self) -> int:
        return self.value().shape[0]

    def produce(self) -> torch.Tensor:
        return self.transform(self.embedding) if self.projection else self.embedding

    def direct(self) -> nn.Parameter | None:
        return None if self.projection else self.embedding

    def decays(self, name: str) -> bool:
        return name.startswith("transform.") and name.endswith("weight")


@torch.no_grad()
def real_token_prefix(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The keys and values the base model computes for tokens ``ids`` at positions 0..n-1, in PEFT's flat layout
    (n, layers x 2 x kv_heads x head_dim)."""
    from transformers import DynamicCache

    dec = SP.decoder_of(model)
    device = model.get_input_embeddings().weight.device
    key = "cache" if SP._takes(dec, "cache") else "past_key_values"
    cache = DynamicCache(config=dec.config)
    was = model.training
    model.eval()
    c = SP.container(model)
    try:
        with adapter_scope(model, None):
            if c is not None:
                c.__dict__["building"] = True
            dec(input_ids=ids[None].to(device), position_ids=torch.arange(len(ids), device=device)[None],
                use_cache=True, **{key: cache})
    finally:
        if c is not None:
            c.__dict__["building"] = False
        model.train(was)
    kv = torch.stack([t[0] for layer in cache.layers for t in (layer.keys, layer.values)])  # (L*2, H, n, hd)
    return kv.permute(2, 0, 1, 3).reshape(len(ids), -1)


def initial_prefix(model: nn.Module, cfg: PrefixConfig, tokenizer=None, method: str = NAME) -> torch.Tensor:
    layers, heads, hd = SP.kv_shape(model)
    n = cfg.num_virtual_tokens
    device, dtype = SP._param_like(model)
    init = cfg.resolved_init()
    ids = SP.init_token_ids(model, "sample_vocab" if init == "random" else init, cfg.init_text, n, tokenizer,
                            method)  # (checks init_text on a weightless model too)
    if SP._on_meta(model):
        return torch.empty(n, layers * 2 * heads * hd, device=device, dtype=dtype)
    real = real_token_prefix(model, ids).to(dtype)
    if init != "random":
        return real.clone()
    scale = real.view(n, layers * 2, -1).std(dim=(0, 2))  # each layer's key and value scale, (L*2,)
    noise = torch.randn(n, layers * 2, heads * hd, dtype=dtype).to(device)
    return (noise * scale[None, :, None]).reshape(n, -1)


def apply_prefix(model: nn.Module, cfg: PrefixConfig, adapter: str, method: str, tokenizer=None,
                 projection: bool = False, hidden: int | None = None) -> None:
    SP.check_model(model, method)
    layers, heads, hd = SP.kv_shape(model)
    device, dtype = SP._param_like(model)
    value = None if projection else initial_prefix(model, cfg, tokenizer, method)
    mod = PrefixEncoder(method, value, cfg.num_virtual_tokens, heads * hd, layers * 2 * heads * hd,
                        (hidden or SP.hidden_size(model)) if projection else None, device, dtype)
    SP.container(model, create=True).add(adapter, mod)


def apply(model: nn.Module, cfg: Config, adapter: str = "default", tokenizer=None) -> None:
    apply_prefix(model, cfg, adapter, NAME, tokenizer, cfg.projection, cfg.encoder_hidden_size)


merge, unload, state_dict, load_state_dict = SP.method_functions(NAME)
for_loading = SP.for_loading


def prefix_peft_config(model: nn.Module, cfg: PrefixConfig, base_path: str | None, projection: bool,
                       hidden: int | None) -> dict:
    layers, heads, hd = SP.kv_shape(model)
    out = SP.peft_common(model, cfg, PEFT_TYPE, base_path, heads * hd, heads)
    out.update(prefix_projection=projection, encoder_hidden_size=hidden or SP.hidden_size(model), init_weights=None)
    return out


def peft_config(model: nn.Module, cfg: Config, base_path: str | None) -> dict:
    return prefix_peft_config(model, cfg, base_path, cfg.projection, cfg.encoder_hidden_size)


def from_peft_config(d: dict) -> Config:
    SP.check_peft_common(d, PEFT_TYPE)
    proj = bool(d.get("prefix_projection", False))
    return Config(num_virtual_tokens=int(d["num_virtual_tokens"]), projection=proj,
                  encoder_hidden_size=d.get("encoder_hidden_size") if proj else None, init="random" if proj else None)
