"""P-tuning: virtual tokens produced by a small prompt encoder (Liu et al. 2021, "GPT Understands, Too",
https://arxiv.org/abs/2103.10385, sec. 3.2, eq. 2-3).

Free embeddings h_1..h_n are not fed to the model directly: a prompt encoder maps them to the virtual tokens,

    h_i' = MLP([LSTM→(h_1:i); LSTM←(h_i:n)])        (bidirectional LSTM then a 2-layer ReLU MLP, eq. 3)

so the n tokens are coupled (sec. 3.2: independent embeddings fall into poor local minima, and the tokens of a
natural prompt depend on each other). ``encoder: mlp`` uses PEFT's default 3-layer MLP instead; ``none`` trains
the tokens directly (what a PEFT adapter saved in its inference layout holds). The encoder is only a training-time
reparameterisation: its output is what the model reads, and what PEFT saves as ``prompt_embeddings``; tuneforge
saves the encoder's weights beside it so a run resumes exactly and reloads train on.

Where the tokens go: by default all n in front of the input, as in PEFT, running through the decoder as a key/value
prefix (``_soft_prompt``). ``template`` places them as the paper's templates do (sec. 3: a template T sets prompt
tokens [P_i] around the input x and the target y): ``"[P:3] {prompt} [P:2]"`` puts 3 tokens before the prompt and
2 after it, before the answer (``data/template.py`` has the syntax). The encoder still produces all n = 5 jointly,
in template order (the LSTM reads them as one sequence, eq. 3). Tokens in front stay a key/value prefix. Tokens after
the prompt depend on it, so they are positions of the sequence itself: wherever tuneforge encodes a prompt for this
adapter (training rows of every format, preference and online prompts, ``generate``, ``eval``) it writes slot ids
there, and a forward pre-hook on the decoder, run before the prefix's, replaces the slots' embeddings with the
encoder's last outputs. The slots are part of the prompt (no loss, generation starts after them) and logits stay
aligned with ``input_ids``. Rows whose active adapters hold no P-tuning adapter (the reference model of DPO or PPO,
with the adapters switched off; other rows of a mixed batch) read each slot as a copy of the real token before it,
at its position, that no other token sees: their logits are those of the prompt without the template, as the
missing prefix leaves them without the front tokens. A template with tokens after the prompt is saved in tuneforge's
layout (PEFT's P_TUNING config has no template, and PEFT would put every token in front); a template with tokens
in front only is the plain method and keeps PEFT's layout.
"""

from __future__ import annotations

import contextlib
import types
from typing import Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from torch import nn

from tuneforge.data.template import SLOT_BASE, PromptTemplate
from tuneforge.methods import _soft_prompt as SP
from tuneforge.methods._scope import PerExample

NAME = "p_tuning"
PEFT_TYPE = "P_TUNING"
MERGEABLE = False
STATE_SUFFIXES = SP.state_suffixes()


class Config(SP.SoftPromptConfig):
    name: Literal["p_tuning"] = "p_tuning"
    encoder: Literal["mlp", "lstm", "none"] = Field("mlp", description="the prompt encoder: mlp (PEFT's default), "
                                                    "lstm (the paper's bidirectional LSTM + MLP), none (no encoder)")
    encoder_hidden_size: int | None = Field(None, gt=0, description="the encoder's width; default the model's d")
    encoder_num_layers: int = Field(2, gt=0, description="LSTM layers (lstm only)")
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LSTM dropout between layers (lstm only)")
    template: str | None = Field(None, description="where the virtual tokens go, e.g. '[P:3] {prompt} [P:2]': "
                                 "[P:k] markers (k tokens) around one {prompt}; their sum is num_virtual_tokens. "
                                 "Default: all in front of the input")

    @field_validator("template")
    @classmethod
    def _template_syntax(cls, v):
        if v is not None:
            PromptTemplate.parse(v)
        return v

    @model_validator(mode="after")
    def _template_count(self):
        t = self.prompt_template()
        if t is None:
            return self
        if "num_virtual_tokens" in self.model_fields_set and self.num_virtual_tokens != t.n:
            why = ValueError(f"num_virtual_tokens {self.num_virtual_tokens} disagrees with template {self.template!r} "
                             f"({t.front} + {t.back} = {t.n} virtual tokens); leave num_virtual_tokens out (the "
                             "template sets it) or make the two agree")
            # raised as a ValidationError located at the field, so a config error names method.N.num_virtual_tokens
            raise ValidationError.from_exception_data(type(self).__name__, [
                {"type": "value_error", "loc": ("num_virtual_tokens",), "input": self.num_virtual_tokens,
                 "ctx": {"error": why}}])
        self.num_virtual_tokens = t.n
        return self

    def prompt_template(self) -> PromptTemplate | None:
        return PromptTemplate.parse(self.template) if self.template is not None else None

    def peft_layout(self) -> bool:
        """PEFT's P_TUNING config puts every token in front; only a template with tokens in front only is that."""
        t = self.prompt_template()
        return t is None or t.back == 0


class PromptEncoder(SP.PromptModule):
    """The prompt encoder of one adapter. Under a template with tokens after the prompt, ``value()`` (what the
    key/value prefix reads) is the first ``front`` outputs; ``whole()`` makes it all n (what is saved and loaded);
    while a forward fills the prefix and the slots, ``held`` is the one output both use."""

    kind, method = "input", NAME

    def __init__(self, n: int, d: int, cfg: Config, device, dtype, kv_width: int = 0):
        super().__init__()
        self.template = cfg.prompt_template()
        self.front = n if self.template is None else self.template.front
        self.back = n - self.front
        self.held: torch.Tensor | None = None
        self._whole = False
        self._kv_width = kv_width
        if self.back and self.front == 0:  # nothing in front: an empty key/value prefix, without a decoder pass
            self.kind = "kv"
        h = cfg.encoder_hidden_size or d
        self.embedding = nn.Parameter(torch.randn(n, d, dtype=dtype).to(device))  # nn.Embedding's N(0, 1), as PEFT
        self.encoder_type = cfg.encoder
        kw = {"device": device, "dtype": dtype}
        if cfg.encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                          nn.Linear(h, d, **kw))
        elif cfg.encoder == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=cfg.encoder_num_layers, dropout=cfg.encoder_dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))

    @property
    def n(self) -> int:
        return self.front + self.back

    def all_tokens(self) -> torch.Tensor:
        """The encoder's n outputs in template order (front tokens, then those after the prompt)."""
        return self.held if self.held is not None else SP.PromptModule.value(self)

    def value(self) -> torch.Tensor:
        v = self.all_tokens()
        if self._whole or not self.back:
            return v
        if self.front == 0:
            return v.new_zeros(0, self._kv_width)
        return v[:self.front]

    @contextlib.contextmanager
    def whole(self):
        self._whole = True
        try:
            yield self
        finally:
            self._whole = False

    def produce(self) -> torch.Tensor:
        if self.encoder_type == "none":
            return self.embedding
        x = self.embedding[None]
        if self.encoder_type == "lstm":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    def direct(self) -> nn.Parameter | None:
        return self.embedding if self.encoder_type == "none" else None

    def decays(self, name: str) -> bool:
        return name.startswith(("mlp_head.", "lstm_head.")) and "bias" not in name.rsplit(".", 1)[-1]


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    SP.check_model(model, NAME, input_level=True)
    device, dtype = SP._param_like(model)
    t = cfg.prompt_template()
    if t is not None and (t.back or t.front == 0) and not SP._is_causal(model):
        raise ValueError(f"p_tuning: template {cfg.template!r} places virtual tokens after the input, which tuneforge "
                         f"does only in causal decoders; on {SP._cfg(model).model_type} every virtual token goes in "
                         "front of the input: leave template out")
    if t is not None and t.back:
        _refuse_flash(SP._cfg(model), t)
    layers, heads, head_dim = SP.kv_shape(model) if t is not None and t.front == 0 else (0, 0, 0)
    mod = PromptEncoder(cfg.num_virtual_tokens, SP.embedding_size(model), cfg, device, dtype,
                        kv_width=layers * 2 * heads * head_dim)  # the width of an empty key/value prefix
    c = SP.container(model, create=True)
    c.add(adapter, mod)
    if mod.back:
        _install(c)


merge, _unload, _state_dict, _load_state_dict = SP.method_functions(NAME)
for_loading = SP.for_loading


def unload(model: nn.Module) -> None:
    c = SP.container(model)
    _unload(model)
    if c is not None and (SP.container(model) is None or not _templated(c)):
        _uninstall(c)


def state_dict(model: nn.Module, cfg=None, adapter: str = "default") -> dict[str, torch.Tensor]:
    mod = SP.modules_of(model, NAME, adapter)
    with mod.whole() if mod is not None else contextlib.nullcontext():
        return _state_dict(model, cfg, adapter)


def load_state_dict(model: nn.Module, cfg, tensors: dict[str, torch.Tensor], adapter: str = "default") -> None:
    with SP.modules_of(model, NAME, adapter).whole():
        _load_state_dict(model, cfg, tensors, adapter)


def peft_config(model: nn.Module, cfg: Config, base_path: str | None) -> dict:
    if not cfg.peft_layout():
        raise ValueError(f"p_tuning with template {cfg.template!r} has no PEFT layout: PEFT's P_TUNING config puts "
                         "every virtual token in front of the input, so PEFT would load this adapter and misplace "
                         "the tokens after the prompt; it is saved in tuneforge's layout instead")
    d = SP.embedding_size(model)
    out = SP.peft_common(model, cfg, PEFT_TYPE, base_path, d, int(SP._cfg(model).num_attention_heads))
    out.update(encoder_reparameterization_type="LSTM" if cfg.encoder == "lstm" else "MLP",
               encoder_hidden_size=cfg.encoder_hidden_size or d, encoder_num_layers=cfg.encoder_num_layers,
               encoder_dropout=cfg.encoder_dropout)
    return out


def from_peft_config(d: dict) -> Config:
    SP.check_peft_common(d, PEFT_TYPE)
    enc = "lstm" if d.get("encoder_reparameterization_type") == "LSTM" else "mlp"
    return Config(num_virtual_tokens=int(d["num_virtual_tokens"]), encoder=enc,
                  encoder_hidden_size=d.get("encoder_hidden_size"), encoder_num_layers=d.get("encoder_num_layers", 2),
                  encoder_dropout=d.get("encoder_dropout", 0.0))


# ------------------------------------------------------------------------------------------------ templates
HIDDEN = "tuneforge_template_hidden"  # on a KV cache: (B, columns) bool, the slot columns no token may see


def _refuse_flash(config, template: PromptTemplate | None = None) -> None:
    """Template slots need the 2D attention mask as written: rows without the adapter hide each slot's column with
    a 0 in the middle of the mask. Flash-attention implementations read 0s as padding and unpad the sequence on
    them, so those slots would vanish with their logits (the last one predicts the answer)."""
    impl = str(getattr(config, "_attn_implementation", None) or "")
    if "flash" in impl:
        what = f"template {template.text!r} puts" if template is not None else "P-tuning template slots put"
        raise ValueError(f"p_tuning: {what} virtual tokens after the prompt, which attn_implementation {impl!r} "
                         "cannot run (it unpads sequences on the attention mask, which hides template slots in the "
                         "middle of a row); load the model with attn_implementation: sdpa (or eager), or keep the "
                         "template's tokens in front of {prompt}")


def _templated(c: SP.SoftPrompts) -> list[PromptEncoder]:
    return [m for ad in c.prompts.values() for m in ad.values() if isinstance(m, PromptEncoder) and m.back]


def _ours(hook, fn, c) -> bool:
    return getattr(hook, "__func__", None) is fn and getattr(hook, "__self__", None) is c


def _install(c: SP.SoftPrompts) -> None:
    """The slot hooks, once per decoder: the pre-hook goes first (before the prefix's), the post-hook drops the
    held encoder output even when the forward fails. Both are bound to the container, so a deep copy of the model
    gets its own, and the container's removal takes the pre-hook with it."""
    dec = c.decoder
    if any(_ours(h, _before, c) for h in dec._forward_pre_hooks.values()):
        return
    dec.register_forward_pre_hook(types.MethodType(_before, c), with_kwargs=True, prepend=True)
    dec.register_forward_hook(types.MethodType(_after, c), always_call=True)


def _uninstall(c: SP.SoftPrompts) -> None:
    dec = c.decoder
    for hooks, fn in ((dec._forward_pre_hooks, _before), (dec._forward_hooks, _after)):
        for key in [k for k, h in hooks.items() if _ours(h, fn, c)]:
            del hooks[key]
            for extra in (dec._forward_pre_hooks_with_kwargs, dec._forward_hooks_with_kwargs,
                          dec._forward_hooks_always_called):
                extra.pop(key, None)


def handles_slots(model: nn.Module) -> bool:
    """Whether ``model`` can read template slot ids (it carries a P-tuning adapter with tokens after the prompt)."""
    c = SP.container(model)
    return c is not None and any(_ours(h, _before, c) for h in c.decoder._forward_pre_hooks.values())


def prompt_template(model: nn.Module) -> PromptTemplate | None:
    """The template prompts must be encoded with for ``model`` as its adapters are now active: the active P-tuning
    adapter's, when it puts tokens after the prompt (rows of a mixed batch without it read the slots as absent)."""
    c = SP.container(model)
    if c is None:
        return None
    names = c.active.names if isinstance(c.active, PerExample) else c.active
    found = {m.template for n in dict.fromkeys(names) if n in c.prompts for m in c.prompts[n].values()
             if isinstance(m, PromptEncoder) and m.back}
    if len(found) > 1:
        texts = ", ".join(sorted(t.text for t in found))
        raise ValueError(f"active P-tuning adapters with different templates ({texts}); prompts can be encoded for "
                         "one of them at a time")
    return found.pop() if found else None


def configured_template(cfgs: list) -> PromptTemplate | None:
    """The template a run's data is encoded with: its P-tuning method's, when it puts tokens after the prompt."""
    for cfg in cfgs:
        t = cfg.prompt_template() if getattr(cfg, "name", None) == NAME else None
        if t is not None and t.back:
            return t
    return None


def _owners(c: SP.SoftPrompts, ids: torch.Tensor, slot: torch.Tensor) -> list[PromptEncoder | None]:
    """Each row's P-tuning module with tokens after the prompt (None: the row reads its slots as absent, also when
    its P-tuning adapter puts every token in front, as ``prompt_template`` ignores such an adapter), checked against
    the slots it holds."""
    owners: list[PromptEncoder | None] = []
    for sel in c._selections(ids.shape[0]):
        found = [m for name in sel for m in c.prompts[name].values() if isinstance(m, PromptEncoder) and m.back]
        if len(found) > 1:
            raise ValueError(f"two templated P-tuning adapters active on one row ({', '.join(sel)}): template slots "
                             "would be ambiguous; activate one of them")
        owners.append(found[0] if found else None)
    for m in dict.fromkeys(o for o in owners if o is not None):
        rows = torch.tensor([o is m for o in owners], device=ids.device)
        used = ids[rows][slot[rows]]
        if used.numel() and int(used.max()) - SLOT_BASE >= m.back:
            have = f"template {m.template.text!r} puts {m.back}" if m.template else "no template puts any"
            raise ValueError(f"the input holds P-tuning template slot {int(used.max()) - SLOT_BASE}, but the active "
                             f"P-tuning adapter's {have} token(s) after the prompt; encode prompts with the template "
                             "of the adapter that reads them (p_tuning.prompt_template(model))")
    return owners


def _before(c: SP.SoftPrompts, module, args, kwargs):
    """Slot ids -> the P-tuning encoder's outputs (rows with the adapter) or hidden copies of the token before them
    (rows without it), before the soft-prompt prefix hook sees the input."""
    if c.building:
        return None
    if args:
        kwargs = {"input_ids": args[0], **kwargs}
        args = ()
    ids = kwargs.get("input_ids")
    cache = kwargs.get("cache")
    cache = kwargs.get("past_key_values") if cache is None else cache
    hidden = getattr(cache, HIDDEN, None) if cache is not None else None
    slot = ids >= SLOT_BASE if ids is not None else None
    if (slot is None or not bool(slot.any())) and hidden is None:
        return None
    if slot is None:  # embeddings given: no slots in them, but earlier hidden columns stay hidden
        return args, _hide(c, kwargs, cache, hidden, torch.zeros(kwargs["inputs_embeds"].shape[:2], dtype=torch.bool,
                                                                  device=kwargs["inputs_embeds"].device), None)
    T = ids.shape[1]
    if bool(slot.any()):
        _refuse_flash(c.decoder.config)
    owners = _owners(c, ids, slot) if bool(slot.any()) else [None] * ids.shape[0]
    real = torch.where(~slot, torch.arange(T, device=ids.device), -1)
    src = real.cummax(1).values  # each position's nearest real token at or before it (-1: none)
    absent = slot & torch.tensor([o is None for o in owners], device=ids.device)[:, None]
    if bool((absent & (src < 0)).any()):
        raise ValueError("a prompt starts with P-tuning template slots and this row has no P-tuning adapter to fill "
                         "them: there is no token before them to stand in for them")
    plain = ids.masked_fill(slot, 0)
    embeds = c.decoder.get_input_embeddings()(torch.where(slot, plain.gather(1, src.clamp_min(0)), ids))
    fills = cache is None or getattr(cache, SP.MARK, None) is None  # the prefix hook fills its prefix now
    for m in dict.fromkeys(o for o in owners if o is not None):
        v = SP.PromptModule.value(m)  # all n outputs, once: the prefix hook reads the same tensor (``held``)
        if fills:
            m.held = v
        tail = v[m.front:].to(device=embeds.device, dtype=embeds.dtype)
        rows = torch.tensor([o is m for o in owners], device=ids.device)
        at = slot & rows[:, None]
        embeds = torch.where(at[..., None], tail[(ids - SLOT_BASE).clamp(0, m.back - 1)], embeds)
    kwargs.pop("input_ids")
    kwargs["inputs_embeds"] = embeds
    if bool(absent.any()) or hidden is not None:
        kwargs = _hide(c, kwargs, cache, hidden, absent, src)
    return args, kwargs


def _hide(c: SP.SoftPrompts, kwargs: dict, cache, hidden, absent: torch.Tensor, src):
    """Mask the absent slots' columns for every token and give the tokens after them the positions they have
    without the slots; each absent slot takes its source token's position (it computes what that token computes,
    so the last slot's logits are the last real token's). The hidden columns are kept on the KV cache, made here
    when the forward will return one, so later steps (generation) still skip them."""
    B, T = absent.shape
    device = absent.device
    mark = getattr(cache, SP.MARK, None) if cache is not None else None
    past = cache.get_seq_length() - (mark[0] if mark else 0) if cache is not None else 0
    before = torch.zeros(B, past, dtype=torch.bool, device=device) if hidden is None else hidden.to(device)
    if before.shape != (B, past):
        raise ValueError(f"the KV cache records hidden template slots for {tuple(before.shape)} (rows, columns), this "
                         f"step has {B} rows after {past} columns (rows reordered without the record?)")
    mask = kwargs.get("attention_mask")
    mask = torch.ones(B, past + T, dtype=torch.long, device=device) if mask is None else mask
    if mask.dim() != 2:
        raise ValueError("P-tuning template slots of rows without the adapter need a 2D attention mask (no packed "
                         "rows or custom 4D masks)")
    cols = torch.cat([before, absent], 1)
    kwargs["attention_mask"] = mask.masked_fill(cols.to(mask.device), 0)
    pos = kwargs.get("position_ids")
    pos = torch.arange(past, past + T, device=device)[None].expand(B, T) if pos is None else pos
    pos = pos - (before.sum(1, keepdim=True) + absent.cumsum(1)).to(pos.device)
    if src is not None:
        pos = torch.where(absent.to(pos.device), pos.gather(1, src.clamp_min(0).to(pos.device)), pos)
    kwargs["position_ids"] = pos
    if cache is None and kwargs.get("use_cache") is not False:
        from transformers import DynamicCache

        cache = DynamicCache(config=c.decoder.config)
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        kwargs[c.cache_key] = cache
    if cache is not None:
        setattr(cache, HIDDEN, cols)
    return kwargs


def _after(c: SP.SoftPrompts, module, args, output):
    if not c.building:
        for m in _templated(c):
            m.held = None
