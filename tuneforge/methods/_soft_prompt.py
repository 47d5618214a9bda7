"""Soft prompts, shared by ``prompt_tuning``, ``p_tuning``, ``prefix_tuning`` and ``p_tuning_v2``.

Each of these methods adds n *virtual tokens* in front of every input, and trains only them:

* prompt tuning and P-tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691; Liu et al. 2021,
  https://arxiv.org/abs/2103.10385) put n trainable vectors in the input embedding sequence, ``[P_1..P_n; E(x)]``;
  P-tuning produces them with a small prompt encoder (MLP or bidirectional LSTM) over free embeddings;
* prefix tuning and P-tuning v2 (Li & Liang 2021, https://arxiv.org/abs/2101.00190, eq. 3-5; Liu et al. 2022,
  https://arxiv.org/abs/2110.07602) give every attention layer n trainable key/value pairs, ``h_i = P_θ[i, :]`` for
  i in the prefix: the tokens of the input attend to them as to a past they never saw.

**One mechanism for all four: a key/value prefix.** In a causal decoder the hidden states of tokens in front of the
input do not depend on the input, so input-level virtual tokens are *exactly* a key/value prefix: the keys and values
the model computes for them at every layer (running the decoder on the n vectors, with gradients), followed by the
input at positions n, n+1, ... (where PEFT's concatenated sequence puts it). Prefix methods give those keys and values
directly. Either way the prefix enters through the model's own KV cache, so

* the logits and hidden states that reach an algorithm are aligned with ``input_ids`` (there are no virtual
  positions to slice off: TRL's DPO slices logits against ``input_ids`` and would be off by n with PEFT's prompt
  tuning), and rewards, values, masks and labels are untouched;
* attention masks, position ids and left padding are handled here, once: the prefix's columns are prepended to the
  2D mask, and every input position moves up by its row's prefix length (a left-padded row and the same row unpadded
  see the same positions);
* generation needs nothing special: the prefix is put into the cache at the first forward and stays there; the
  rollout engine, ``tuneforge generate`` and the server serve these methods like any other.

**Per-example selection.** In a mixed batch each row gets its adapter's prefix (rows of different prefix lengths
are left-aligned with masked slots in front: ``[pad][prefix][input]``), a row with no soft-prompt adapter gets an
all-masked prefix, so a mixed batch equals its rows run one by one. Input-level prompts are computed once per
adapter and shared by its rows, except while training a decoder with dropout: then each row runs them with its own
dropout mask, as PEFT's per-row ``[P; E(x)]`` does (in an encoder the concatenated prompt meets the model's own
dropout per row; a P-tuning encoder's LSTM dropout is drawn once per batch there, as in PEFT).

**Encoders and encoder-decoders.** In a bidirectional encoder (BERT, or T5's encoder) input-level virtual tokens
attend to the text and the text to them, so they are not a key/value prefix: there the n vectors are concatenated in
front of the input embeddings, ``[P; E(x)]``, with n ones in front of the attention mask and token type 0 (PEFT's
computation, Lester et al.'s on T5), and the encoder's output keeps the n extra positions in front (BERT's pooler,
RoBERTa's head read position 0, the first virtual token, as under PEFT). In T5 the decoder's cross-attention mask
gets the same n columns. Prefix methods stay a key/value prefix on encoders.

What cannot combine fails with the reason: a 4D attention mask (packed rows are refused at config time;
shared-prompt scoring is skipped while a soft prompt is active), a model whose decoder takes no KV cache or no
position ids, gradient checkpointing (its layers drop the cache), a static KV cache.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tuneforge.methods._scope import AdapterLayer, PerExample, adapter_layers
from tuneforge.models.load import ENCODER_TYPES

ATTR = "tuneforge_soft_prompts"  # the container's name on the model
MARK = "tuneforge_prefix"  # set on a KV cache that holds a soft prefix: (prefix width, per-row lengths)
VOCAB_HEAD = 5000  # sample_vocab draws from the first 5000 ids: BPE ids are in merge order, common tokens first


class SoftPromptConfig(BaseModel):
    """Options every soft-prompt method shares (each adds its ``name`` literal and its own options)."""

    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(20, gt=0, description="n, the number of virtual tokens")

    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens


class InitConfig(SoftPromptConfig):
    init: Literal["random", "sample_vocab", "text"] = Field(
        "sample_vocab", description="random (normal, the embedding table's scale), sample_vocab (embeddings of "
        "tokens drawn from the 5000 lowest ids, Lester et al. sec. 3), or text (the tokens of init_text, repeated or "
        "cut to num_virtual_tokens)")
    init_text: str | None = Field(None, description="the phrase for init: text, e.g. a task description")

    @model_validator(mode="after")
    def _text(self):
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text (the phrase whose tokens start the prompt)")
        if self.init != "text" and self.init_text:
            raise ValueError(f"init_text is only read with init: text (init is {self.init!r})")
        return self


# ---------------------------------------------------------------------------------------------- model facts
def decoder_of(model: nn.Module) -> nn.Module:
    """The module that runs the transformer blocks (``LlamaModel`` inside ``LlamaForCausalLM``)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _cfg(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("soft prompts need a Hugging Face model (model.config)")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def hidden_size(model: nn.Module) -> int:
    cfg = _cfg(model)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not d:
        raise ValueError("soft prompts need the model's hidden size (config.hidden_size)")
    return int(d)


def embedding_size(model: nn.Module) -> int:
    """The width of the input embeddings, which input-level virtual tokens share (PEFT's ``token_dim``); ALBERT and
    ELECTRA-small embed narrower than their hidden size."""
    return int(model.get_input_embeddings().weight.shape[1])


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim): the shape of one position of a key/value prefix. With grouped-query
    attention the prefix has the KV heads only (PEFT's ``token_dim`` = head_dim x KV heads)."""
    cfg = _cfg(model)
    layers, heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden_size(model) // heads)
    return layers, kv, head_dim


def _takes(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def prompt_host(model: nn.Module) -> nn.Module:
    """The module whose inputs the virtual tokens join: an encoder-decoder's encoder, else ``decoder_of``."""
    if getattr(_cfg(model), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return decoder_of(model)


def check_model(model: nn.Module, method: str, input_level: bool = False) -> None:
    """Refuse, with the fix, a model that cannot hold this method's virtual tokens.

    ``input_level``: prompt tuning and P-tuning, whose virtual tokens are *inputs*: a key/value prefix in a causal
    model, embeddings concatenated in front of the input in an encoder or an encoder-decoder's encoder (the module
    docstring says why). Prefix tuning and P-tuning v2 are a key/value prefix by definition and run on encoders as
    on decoders (equal to PEFT's on BERT); on an encoder-decoder they are refused."""
    cfg = _cfg(model)
    if getattr(cfg, "is_encoder_decoder", False) and not input_level:
        raise ValueError(f"{method}: on an encoder-decoder model ({cfg.model_type}) tuneforge puts virtual tokens "
                         "in front of the encoder's input only (prompt_tuning, p_tuning: Lester et al. trained T5 "
                         "that way); key/value prefixes in the encoder and decoder attention are not supported; train "
                         "prompt_tuning, p_tuning, lora or ia3")
    if input_level and not _is_causal(model):
        if getattr(cfg, "classifier_pooling", None) == "mean":
            raise ValueError(f"{method}: this {cfg.model_type} classifier mean-pools with the caller's attention "
                             "mask, which does not cover virtual tokens in front of the input; set the model's "
                             "classifier_pooling to cls, or train prefix_tuning, lora or ia3")
        if not _takes(prompt_host(model), "inputs_embeds"):
            raise ValueError(f"{method}: {type(prompt_host(model)).__name__} takes no inputs_embeds, so virtual "
                             "tokens cannot join its input; train lora or ia3 instead")
        return
    if getattr(cfg, "model_type", None) in ("bloom", "mpt") or getattr(cfg, "alibi", False):
        raise ValueError(f"{method}: ALiBi models ({cfg.model_type}) build position biases from the mask, which a "
                         "prefix would shift; train lora or ia3 instead")
    dec = decoder_of(model)
    if not (_takes(dec, "cache") or _takes(dec, "past_key_values")):
        raise ValueError(f"{method}: {type(dec).__name__} takes no KV cache (no past_key_values argument), so it "
                         "cannot hold virtual tokens; train a method that changes weights (lora, ia3) instead")
    if not _takes(dec, "position_ids"):
        raise ValueError(f"{method}: {type(dec).__name__} takes no position_ids, so inputs cannot be placed after "
                         "the virtual tokens; train a method that changes weights (lora, ia3) instead")


def _is_causal(model: nn.Module) -> bool:
    """A decoder, whose tokens see only earlier tokens (what makes input-level virtual tokens a KV prefix)."""
    cfg = _cfg(model)
    return getattr(cfg, "model_type", None) not in ENCODER_TYPES and not getattr(cfg, "is_encoder_decoder", False)


RELATIVE_ONLY = ("t5", "mt5", "umt5", "longt5")  # relative position buckets and no position table
PADDED_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")  # positions count from padding_idx + 1


def max_positions(model: nn.Module) -> int | None:
    """The most positions an input may use (None: no position table to run off, as in T5). RoBERTa's and MPNet's
    tables start after the padding index, so pad_token_id + 1 of their rows are never a position."""
    cfg = _cfg(model)
    if getattr(cfg, "model_type", None) in RELATIVE_ONLY:
        return None
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if n and getattr(cfg, "model_type", None) in PADDED_POSITIONS:
        n -= int(getattr(cfg, "pad_token_id", 1) or 0) + 1
    return int(n) if n else None


def active_virtual_tokens(model: nn.Module) -> int:
    """Virtual tokens the model's active soft prompts put in front of every row (the longest, per-row)."""
    c = container(model)
    if c is None:
        return 0
    names = c.active.names if isinstance(c.active, PerExample) else c.active
    per = [sum(m.n for m in c.prompts[n].values()) for n in names if n is not None and n in c.prompts]
    return max(per) if isinstance(c.active, PerExample) and per else sum(per)


def input_budget(model: nn.Module, max_len: int) -> int:
    """``max_len`` capped so the active virtual tokens and the input fit the model's positions (inference paths
    truncate to this; training refuses a config that would not fit, naming the keys)."""
    limit = max_positions(model)
    n = active_virtual_tokens(model)
    return max(1, min(max_len, limit - n)) if limit is not None and n else max_len


def _on_meta(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "meta"


def _param_like(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where new prompt tensors live and their dtype: the embedding table's device, fp32 unless the model is wider
    (trainable tensors stay fp32 on half-precision bases, as the other methods' adapters do)."""
    emb = model.get_input_embeddings().weight
    return emb.device, (torch.float32 if emb.dtype in (torch.float16, torch.bfloat16) else emb.dtype)


# --------------------------------------------------------------------------------------------- initialisation
def init_token_ids(model: nn.Module, init: str, text: str | None, n: int, tokenizer=None, method: str = ""
                   ) -> torch.Tensor:
    """The n token ids a vocabulary-based init starts from (sample_vocab: drawn from the global RNG; text: the
    phrase's tokens repeated or cut to n, as PEFT does)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if init == "sample_vocab":
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        pool = torch.tensor([i for i in range(min(vocab, VOCAB_HEAD)) if i not in special] or list(range(vocab)))
        return pool[torch.randint(0, len(pool), (n,))]
    if tokenizer is None:
        raise ValueError(f"{method}: init: text needs the tokenizer (pass tokenizer= to apply_methods)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise ValueError(f"{method}: init_text {text!r} has "
                         f"{'no tokens' if not ids else 'tokens this tokenizer does not know (unk)'}; give a phrase "
                         "in the model's own language/script, or use init: sample_vocab")
    if any(i >= vocab for i in ids):
        raise ValueError(f"{method}: init_text tokens fall outside the model's {vocab}-row embedding table; is the "
                         "tokenizer the model's own?")
    reps = -(-n // len(ids))
    return torch.tensor((ids * reps)[:n])


def random_like_embeddings(model: nn.Module, n: int, dim: int | None = None) -> torch.Tensor:
    """n random vectors at the scale of the model's token embeddings (normal with the table's std): a prompt far
    larger or smaller than real tokens starts where attention and the norms behave unlike anything trained."""
    emb = model.get_input_embeddings().weight
    device, dtype = _param_like(model)
    dim = emb.shape[1] if dim is None else dim
    if emb.device.type == "meta":
        return torch.empty(n, dim, device=device, dtype=dtype)
    std = float(emb.detach().float().std())
    return torch.randn(n, dim, dtype=dtype).to(device) * std


# ----------------------------------------------------------------------------------------------- the container
class PromptModule(nn.Module):
    """One soft-prompt adapter of one method. ``kind`` says what it produces: ``"input"`` virtual token embeddings
    (n, d) via ``embeddings()``, or ``"kv"`` a key/value prefix via ``kv()`` in PEFT's flat layout
    (n, layers x 2 x kv_heads x head_dim). A module loaded from PEFT's inference layout (only the encoder's
    output) holds that output as ``output`` and returns it directly."""

    kind: str = "input"
    method: str = ""

    def __init__(self):
        super().__init__()
        self.output: nn.Parameter | None = None

    @property
    def n(self) -> int:
        raise NotImplementedError

    def produce(self) -> torch.Tensor:  # the encoder's output (what PEFT saves as prompt_embeddings)
        raise NotImplementedError

    def value(self) -> torch.Tensor:
        return self.output if self.output is not None else self.produce()

    def direct(self) -> nn.Parameter | None:
        """The parameter that *is* the output when there is no encoder (prompt tuning, an unprojected prefix)."""
        return None

    def decays(self, name: str) -> bool:
        """AdamW decay for one tensor: an encoder's weight matrices, yes; the virtual tokens themselves and biases,
        no (decay pulls toward 0, which is no prior for a prompt: its identity is no prompt at all, not a zero one)."""
        return False

    def freeze_to_output(self, value: torch.Tensor) -> None:
        """Hold ``value`` (PEFT's saved prompt_embeddings) as the trainable tensor; the encoder is dropped, since its
        output cannot be inverted (PEFT does the same in inference mode)."""
        for child in list(self._modules):
            delattr(self, child)
        for name in [n for n, _ in self.named_parameters(recurse=False)]:
            delattr(self, name)
        self.output = nn.Parameter(value.detach().clone())


class SoftPrompts(AdapterLayer):
    """Every soft-prompt adapter of a model, and the forward pre-hook on its decoder that feeds them in.

    ``prompts[adapter][method]`` is a ``PromptModule``. Activation follows every other adapter layer
    (``adapter_scope``): one selection for the batch, several stacked (their prefixes concatenated in order), or
    one per row.
    """

    wraps_linear = False  # models.arch: the encoders' linear layers are this method's, not targets for others
    ADAPTER_TENSORS = {"prompts": False}  # declared for arch; per-tensor decay comes from adapter_tensors below

    def __init__(self, decoder: nn.Module, concat: bool = False, cross: nn.Module | None = None):
        """``concat``: input-level prompts join the input embeddings (a bidirectional encoder) instead of the KV
        cache; ``cross``: an encoder-decoder's decoder, whose cross-attention mask gets the prompt's columns."""
        super().__init__()
        self.prompts = nn.ModuleDict()
        self.active: tuple[str, ...] | PerExample = ()
        self.__dict__["decoder"] = decoder  # not a child: the decoder is the model's, not this layer's
        self.__dict__["building"] = False
        self.__dict__["concat"] = concat
        self.__dict__["cross"] = cross
        decoder.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        if cross is not None:
            cross.register_forward_pre_hook(self._cross_hook, with_kwargs=True)
        self.__dict__["cache_key"] = "cache" if _takes(decoder, "cache") else "past_key_values"

    def adapter_names(self) -> list[str]:
        return list(self.prompts)

    def adapter_tensors(self) -> dict[str, tuple[nn.Parameter, bool]]:
        out = {}
        for adapter, methods in self.prompts.items():
            for method, mod in methods.items():
                for n, p in mod.named_parameters():
                    out[f"prompts.{adapter}.{method}.{n}"] = (p, mod.decays(n))
        return out

    def add(self, adapter: str, module: PromptModule) -> None:
        if adapter in self.prompts and module.method in self.prompts[adapter]:
            raise ValueError(f"{module.method} adapter {adapter!r} already exists on this model")
        if self.concat and adapter in self.prompts and any(m.kind != module.kind for m in self.prompts[adapter].values()):
            other = next(m.method for m in self.prompts[adapter].values() if m.kind != module.kind)
            raise ValueError(f"{module.method} and {other} in one adapter: on an encoder input-level virtual tokens "
                             "(prompt_tuning, p_tuning) join the input embeddings and key/value prefixes "
                             "(prefix_tuning, p_tuning_v2) the attention cache, and tuneforge does not run both in "
                             "one forward; keep one of them")
        if adapter not in self.prompts:
            self.prompts[adapter] = nn.ModuleDict()
            if not isinstance(self.active, PerExample):
                self.active = tuple(self.active) + (adapter,)
        self.prompts[adapter][module.method] = module
        for p in module.parameters():
            p.requires_grad_(True)

    def remove(self) -> None:
        """Take this container's hook off the decoder (found by owner, so a deep copy of the model removes its own
        copy's hook, not the original's)."""
        for module in (self.decoder, self.cross):
            if module is None:
                continue
            hooks = module._forward_pre_hooks
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)

    # -------------------------------------------------------------------------------------------- the prefix
    def _selections(self, batch: int) -> list[tuple[str, ...]]:
        if isinstance(self.active, PerExample):
            names = self.active.names
            if len(names) != batch:
                raise ValueError(f"per-example adapters name {len(names)} rows, the batch has {batch}")
            return [(n,) if n in self.prompts else () for n in names]
        return [tuple(n for n in self.active if n in self.prompts)] * batch

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.decoder.get_input_embeddings().weight.dtype

    @contextlib.contextmanager
    def _only(self, names: tuple[str, ...]):
        """The decoder's other adapter layers (LoRA, IA3 in a composition) set to ``names`` while the virtual tokens
        run through it: in a mixed batch each selection's prompt sees its own adapter."""
        layers = adapter_layers(self.decoder)
        saved = [m.active for m in layers]
        self.__dict__["building"] = True
        try:
            if isinstance(self.active, PerExample):
                for m in layers:
                    m.active = tuple(n for n in names if n in m.adapter_names())
            yield
        finally:
            self.__dict__["building"] = False
            for m, a in zip(layers, saved):
                m.active = a

    def _prefix_of(self, names: tuple[str, ...], device: torch.device) -> tuple[list, int]:
        """Per-layer (key, value) of one selection's prefix, each (1, kv_heads, n, head_dim), and n."""
        from transformers import DynamicCache

        cache, n, dtype = DynamicCache(config=self.decoder.config), 0, self._compute_dtype(device)
        layers, heads, hd = kv_shape(self.decoder)
        for name in names:
            for mod in self.prompts[name].values():
                v = mod.value()
                m = v.shape[0]
                if mod.kind == "kv":
                    kv = v.to(device=device, dtype=dtype).view(m, layers * 2, heads, hd).permute(1, 2, 0, 3)
                    for layer in range(layers):  # PEFT's layout: entry 2l is layer l's keys, 2l+1 its values
                        cache.update(kv[2 * layer][None], kv[2 * layer + 1][None], layer)
                else:
                    emb = v.to(device=device, dtype=self.decoder.get_input_embeddings().weight.dtype)[None]
                    pos = torch.arange(n, n + m, device=device)[None]
                    with self._only(names):
                        self.decoder(inputs_embeds=emb, attention_mask=torch.ones(1, n + m, device=device,
                                                                                  dtype=torch.long),
                                     position_ids=pos, use_cache=True, **{self.cache_key: cache})
                n += m
        return [(layer.keys, layer.values) for layer in cache.layers], n

    def _noisy(self, selections: list[tuple[str, ...]]) -> bool:
        """Whether the virtual tokens' own forward draws dropout noise (training, dropout > 0, an input-level
        prompt): then each row runs it separately, as ``[P; E(x)]`` per row would, instead of sharing one mask."""
        if not self.decoder.training:
            return False
        if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.decoder.modules()):
            return False
        return any(mod.kind == "input" for s in selections for n in s for mod in self.prompts[n].values())

    def _fill(self, cache, selections: list[tuple[str, ...]], device: torch.device):
        """Put the batch's prefixes into ``cache``; returns (prefix width, per-row lengths: an int when equal)."""
        B = len(selections)
        if self._noisy(selections):
            rows = [self._prefix_of(s, device) if s else None for s in selections]
        else:
            uniq = {s: self._prefix_of(s, device) for s in dict.fromkeys(selections) if s}
            if len(uniq) == 1 and all(selections):  # one prefix for every row: broadcast it
                kv, width = next(iter(uniq.values()))
                for layer, (k, v) in enumerate(kv):
                    cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), layer)
                return width, width
            rows = [uniq[s] if s else None for s in selections]
        lengths = [r[1] if r else 0 for r in rows]
        width = max(lengths)
        some = next(r for r in rows if r)
        for layer in range(len(some[0])):
            ref = some[0][layer][0]
            ks, vs = [], []
            for r, length in zip(rows, lengths):
                pad = ref.new_zeros(1, ref.shape[1], width - length, ref.shape[3])
                ks.append(torch.cat([pad, r[0][layer][0]], 2) if r else pad)
                vs.append(torch.cat([pad, r[0][layer][1]], 2) if r else pad)
            cache.update(torch.cat(ks), torch.cat(vs), layer)
        if len(set(lengths)) == 1:
            return width, width
        return width, torch.tensor(lengths, device=device)

    def _pre_hook(self, module, args, kwargs):
        if self.building:
            return None
        if args:  # a positional input_ids
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        ref = kwargs.get("input_ids")
        ref = ref if ref is not None else kwargs.get("inputs_embeds")
        B, T, device = ref.shape[0], ref.shape[1], ref.device
        selections = self._selections(B)
        if not any(selections):
            return None
        if self.concat and any(mod.kind == "input" for s in selections for n in s for mod in self.prompts[n].values()):
            return self._concat(kwargs, selections, T, device)
        if getattr(self.decoder, "gradient_checkpointing", False) and self.decoder.training:
            raise ValueError("soft prompts cannot train under gradient checkpointing: its layers drop the KV cache "
                             "that carries the virtual tokens; call model.gradient_checkpointing_disable()")
        cache = kwargs.pop("cache", None)
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        from transformers import DynamicCache

        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"soft prompts need a dynamic KV cache, not {type(cache).__name__}; generate with "
                             "cache_implementation='dynamic' (the default)")
        mark = getattr(cache, MARK, None) if cache is not None else None
        if mark is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("this KV cache was filled without the active soft prompt; start generation from an "
                                 "empty cache with the same adapters active")
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.decoder.config)
            mark = self._fill(cache, selections, device)
            setattr(cache, MARK, mark)
        width, lengths = mark
        past = cache.get_seq_length() - width  # real tokens already in the cache
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(B, past + T, device=device, dtype=torch.long)
        if mask.dim() != 2:
            raise ValueError("soft prompts take a 2D attention mask (no packed rows or custom 4D masks)")
        if mask.shape[1] != past + T:
            raise ValueError(f"attention mask has {mask.shape[1]} columns, expected {past + T} (cached tokens + "
                             "this input, the virtual tokens excluded)")
        if isinstance(lengths, int):
            front = torch.ones(B, width, device=device, dtype=mask.dtype)
            shift = lengths
        else:
            lengths = lengths.to(device)
            if lengths.numel() != B:
                raise ValueError("the KV cache's rows no longer match the batch (reordered after a mixed-adapter "
                                 "prefill)")
            front = (torch.arange(width, device=device)[None] >= (width - lengths)[:, None]).to(mask.dtype)
            shift = lengths[:, None]
        pos = kwargs.get("position_ids")
        kwargs["attention_mask"] = torch.cat([front, mask.to(device)], 1)
        if pos is None and self.concat and isinstance(shift, int):
            pass  # an encoder numbers positions itself from the cache's length (RoBERTa from padding_idx + 1 on)
        else:
            if pos is None:
                base = int(getattr(_cfg(self.decoder), "pad_token_id", 1) or 0) + 1 \
                    if self.concat and _cfg(self.decoder).model_type in PADDED_POSITIONS else 0
                pos = torch.arange(base + past, base + past + T, device=device)[None].expand(B, T)
            kwargs["position_ids"] = pos + shift
        kwargs[self.cache_key] = cache
        return args, kwargs


    # ------------------------------------------------------------------------------ encoders: [P; E(x)]
    def _concat(self, kwargs: dict, selections: list[tuple[str, ...]], T: int, device: torch.device):
        """An encoder's input-level prompts: ``[P; E(x)]``, the mask's and token types' n columns in front (PEFT's
        ``PeftModelForSequenceClassification`` / ``Seq2SeqLM`` forward). Every row needs the same prompt length
        here: an encoder reads fixed positions (BERT's pooler, position 0), so rows cannot be aligned by padding."""
        mods = {s: [m for n in s for m in self.prompts[n].values()] for s in dict.fromkeys(selections)}
        if any(m.kind != "input" for ms in mods.values() for m in ms):
            raise ValueError("an encoder cannot run an input-level prompt (prompt_tuning, p_tuning) and a key/value "
                             "prefix (prefix_tuning, p_tuning_v2) in one forward; activate one of them")
        lengths = {s: sum(m.n for m in ms) for s, ms in mods.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"rows of this batch select soft prompts of different lengths ({sorted(set(lengths.values()))}"
                             " virtual tokens, 0 = none); on an encoder every row of a batch needs the same prompt "
                             "length: batch the rows by adapter")
        n = next(iter(lengths.values()))
        limit = max_positions(self.decoder)
        if limit is not None and n + T > limit:
            raise ValueError(f"{n} virtual tokens + {T} input tokens exceed the model's {limit} positions; lower "
                             "data.max_len or num_virtual_tokens")
        emb_layer = self.decoder.get_input_embeddings()
        ids, embeds = kwargs.pop("input_ids", None), kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = emb_layer(ids)
        prompt = {s: torch.cat([m.value() for m in ms]).to(device=device, dtype=embeds.dtype) for s, ms in mods.items()}
        P = prompt[selections[0]][None].expand(len(selections), -1, -1) if len(prompt) == 1 \
            else torch.stack([prompt[s] for s in selections])
        kwargs["inputs_embeds"] = torch.cat([P, embeds], 1)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("soft prompts take a 2D attention mask (no packed rows or custom 4D masks)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], 1)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], 1)
        pos = kwargs.get("position_ids")
        if pos is not None:  # the prompt from the row's first position on, the input after it (what no position_ids
            # gives a right-padded row: 0.. in BERT, padding_idx + 1.. in RoBERTa)
            front = pos[:, :1] + torch.arange(n, device=pos.device, dtype=pos.dtype)[None]
            kwargs["position_ids"] = torch.cat([front, pos + n], 1)
        return (), kwargs

    def _cross_hook(self, module, args, kwargs):
        """An encoder-decoder's decoder: the encoder output carries the prompt's n positions in front, so the
        cross-attention mask (the caller's, one column per input token) gets n ones in front."""
        enc, mask = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
        if enc is None or mask is None or mask.dim() != 2 or enc.shape[1] <= mask.shape[1]:
            return None
        extra = enc.shape[1] - mask.shape[1]
        kwargs["encoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], extra), mask], 1)
        return args, kwargs


def container(model: nn.Module, create: bool = False) -> SoftPrompts | None:
    found = getattr(model, ATTR, None)
    if found is None and create:
        seq2seq = getattr(_cfg(model), "is_encoder_decoder", False) and hasattr(model, "get_decoder")
        found = SoftPrompts(prompt_host(model), concat=not _is_causal(model),
                            cross=model.get_decoder() if seq2seq else None)
        model.add_module(ATTR, found)
    return found


def active(model: nn.Module) -> bool:
    """Whether a soft prompt acts on the model's next forward."""
    c = container(model)
    if c is None:
        return False
    if isinstance(c.active, PerExample):
        return any(n in c.prompts for n in c.active.names)
    return any(n in c.prompts for n in c.active)


def modules_of(model: nn.Module, method: str, adapter: str) -> PromptModule | None:
    c = container(model)
    if c is None or adapter not in c.prompts or method not in c.prompts[adapter]:
        return None
    return c.prompts[adapter][method]


def unload(model: nn.Module, method: str) -> None:
    """Drop ``method``'s prompts (every adapter name); the hook goes with the last prompt."""
    c = container(model)
    if c is None:
        return
    for adapter in list(c.prompts):
        if method in c.prompts[adapter]:
            del c.prompts[adapter][method]
        if len(c.prompts[adapter]) == 0:
            del c.prompts[adapter]
            if not isinstance(c.active, PerExample):
                c.active = tuple(n for n in c.active if n != adapter)
    if len(c.prompts) == 0:
        c.remove()
        delattr(model, ATTR)


# ------------------------------------------------------------------------------------------ saving, merging
def refuse_merge(method: str) -> None:
    from tuneforge.methods._bottleneck import NotMergeableError

    raise NotMergeableError(f"{method} adds virtual tokens (extra inputs), not a weight update, so it cannot be "
                            "folded into the base weights; keep the adapter beside the base model (tuneforge "
                            "generate/serve --adapter), or train a mergeable method (lora, ia3, lokr)")


def method_functions(method: str):
    """``merge``, ``unload``, ``state_dict``, ``load_state_dict`` and ``for_loading`` of one soft-prompt method, with
    the signatures the methods package calls (each method module binds them to its name)."""
    def merge(model: nn.Module, adapter: str = "default") -> None:
        refuse_merge(method)

    def unload_(model: nn.Module) -> None:
        unload(model, method)

    def state_dict_(model: nn.Module, cfg=None, adapter: str = "default") -> dict[str, torch.Tensor]:
        return state_dict(model, method, adapter)

    def load_state_dict_(model: nn.Module, cfg, tensors: dict[str, torch.Tensor], adapter: str = "default") -> None:
        load_state_dict(model, method, tensors, adapter)

    return merge, unload_, state_dict_, load_state_dict_


def for_loading(cfg):
    """The config to apply before saved weights replace the initial ones: no tokenizer-dependent init."""
    return cfg.model_copy(update={"init": "random", "init_text": None}) if getattr(cfg, "init", None) == "text" \
        else cfg


PEFT_KEY = "prompt_embeddings"
OWN_PREFIX = "tuneforge_encoder."  # encoder weights, beside PEFT's key: PEFT ignores them, tuneforge resumes from them


def _keys(model: nn.Module, method: str, adapter: str) -> tuple[str, str]:
    """(PEFT's key, our encoder prefix) for one method's tensors; a method sharing its adapter with another soft
    prompt puts its name in front so the two do not collide."""
    c = container(model)
    alone = c is None or adapter not in c.prompts or len(c.prompts[adapter]) <= 1
    head = "" if alone else f"{method}."
    return head + PEFT_KEY, head + OWN_PREFIX


def state_dict(model: nn.Module, method: str, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's ``prompt_embeddings`` (the encoder's output), and the encoder's own weights when it has one."""
    mod = modules_of(model, method, adapter)
    if mod is None:
        return {}
    key, own = _keys(model, method, adapter)
    with torch.no_grad():
        out = {key: mod.value().detach()}
    if mod.output is None and mod.direct() is None:
        out.update({own + n: p.detach() for n, p in mod.named_parameters()})
    return out


def load_state_dict(model: nn.Module, method: str, tensors: dict[str, torch.Tensor], adapter: str) -> None:
    """Our files restore the encoder (training goes on exactly); a PEFT file of an encoder-based adapter holds only
    the encoder's output, which then becomes the trained tensor."""
    mod = modules_of(model, method, adapter)
    key, own = _keys(model, method, adapter)
    if key not in tensors:
        raise KeyError(f"{method} weights lack {key!r}")
    value, want = tensors[key], tuple(mod.value().shape)
    if (getattr(_cfg(model), "is_encoder_decoder", False) and value.dim() == 2 and value.shape[0] == 2 * want[0]
            and not any(k.startswith(own) for k in tensors)):
        value = value[: want[0]]  # PEFT's seq2seq layout (2 submodules): its prompt methods read the first n rows only
    if tuple(value.shape) != want:
        raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, {want} for this model (another base "
                         "model, or another number of virtual tokens?)")
    target = mod.output if mod.output is not None else mod.direct()
    mine = {k[len(own):]: v for k, v in tensors.items() if k.startswith(own)}
    params = dict(mod.named_parameters())
    with torch.no_grad():
        if target is not None:
            target.copy_(value)
            return
        if set(mine) == set(params):
            for n, p in params.items():
                if p.shape != mine[n].shape:
                    raise ValueError(f"{own}{n}: shape {tuple(mine[n].shape)} in the file, {tuple(p.shape)} here")
                p.copy_(mine[n])
            return
    device, dtype = _param_like(model)
    mod.freeze_to_output(value.to(device=device, dtype=dtype))
    mod.output.requires_grad_(True)


def state_suffixes() -> tuple[str, ...]:
    return (PEFT_KEY,)


def peft_common(model: nn.Module, cfg: SoftPromptConfig, peft_type: str, base_path: str | None,
                token_dim: int, heads: int) -> dict:
    layers = int(_cfg(model).num_hidden_layers)
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "num_virtual_tokens": cfg.virtual_tokens(), "token_dim": token_dim, "num_transformer_submodules": 1,
            "num_attention_heads": heads, "num_layers": layers, "inference_mode": True, "modules_to_save": None,
            "revision": None, "auto_mapping": None}


def check_peft_common(d: dict, peft_type: str) -> None:
    seq2seq = d.get("task_type") == "SEQ_2_SEQ_LM"
    subs = d.get("num_transformer_submodules") or 1
    if subs != 1 and not (seq2seq and subs == 2 and peft_type in ("PROMPT_TUNING", "P_TUNING")):
        raise ValueError(f"{peft_type} adapter with num_transformer_submodules {subs} (task_type "
                         f"{d.get('task_type')!r}); tuneforge reads prefixes for one attention stack, and "
                         "encoder-decoder prompts for the encoder (prompt_tuning, p_tuning)")
    if d.get("task_type") not in (None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM"):  # SEQ_CLS: load_adapter reads its head
        raise ValueError(f"{peft_type} adapter with task_type {d['task_type']!r}; tuneforge reads CAUSAL_LM, SEQ_CLS "
                         "and SEQ_2_SEQ_LM ones")
