"""The generation engine: batched sampling with a KV cache, for evaluation, ``tuneforge generate`` and the online
algorithms' rollouts (PPO, GRPO, rejection sampling, online DPO, RLAIF).

Why our own loop rather than ``model.generate``: the online algorithms need, per sampled token, its log-probability
and whether it is part of the response (mask), and they need sampling that is reproducible *per request* — a row's
sample must depend only on its prompt and its seed, not on which other rows share the batch or on the global RNG
(RELIABILITY DT-5; it is also what makes a resumed PPO/GRPO run draw the same rollouts). Each row therefore owns a
``torch.Generator`` and samples by inverse CDF from one uniform number per step. The loop is also leaner than
``generate`` (no logits-processor/stopping-criteria machinery, the output head on the last position only).

Prompts are encoded exactly as training rows encode them (``data/tokenize.py``: the tokenizer's own leading special
tokens + prompt tokens, or the chat template with the generation prompt for message lists) so a fine-tuned model
sees at inference what it saw in training; a P-tuning adapter's template (``data/template.py``) puts its slot ids
after the prompt here as it does there (``generate`` reads the template off the model). Batches are left-padded so
every row's next token sits at the last
position, and position ids count real tokens only (as ``generate`` computes them), so a padded row's positions equal the unpadded ones and greedy output equals
``model.generate``'s.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tuneforge.data.report import DataError
from tuneforge.data.schema import RowError
from tuneforge.data.template import SLOT_BASE
from tuneforge.data.tokenize import encode_chat_prompt, encode_prompt_text

IGNORE = -100


def encode_prompt(tokenizer, prompt, template=None) -> list[int]:
    """Token ids of a prompt string (after the special tokens the tokenizer itself puts first, e.g. Llama's bos;
    none for SmolLM2, whose bos is the chat marker ``<|im_start|>``) or a chat message list; ``template``: the
    model's P-tuning template (``p_tuning.prompt_template(model)``), whose slots end the prompt. ``DataError``
    (a user-facing error: ``tuneforge generate`` and ``chat`` print it) when the slots have no place in it."""
    try:
        if isinstance(prompt, list):
            return encode_chat_prompt(tokenizer, prompt, template)
        return encode_prompt_text(tokenizer, prompt, template=template)
    except RowError as e:  # the template's slots have no place in this prompt: the user's to fix, not a crash
        raise DataError(f"this prompt cannot be encoded for the model's P-tuning template: {e}") from None


def model_template(model):
    """The P-tuning template prompts for ``model`` are encoded with (None for every other model)."""
    from tuneforge.methods.p_tuning import prompt_template

    return prompt_template(model)


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def _cut(text: str, stop: list[str] | None) -> str:
    for s in stop or []:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


# --------------------------------------------------------------------------------------------- token choice
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits with everything outside the top-k and outside the smallest set of probability ≥ top_p set to
    −inf (the most likely token always survives)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass strictly before this token already exceeds top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the first token whose cumulative probability exceeds ``uniforms[i]``.
    (B, V) logits, (B,) uniforms in [0, 1) -> (B,) token ids. Deterministic given the uniforms."""
    probs = logits.float().softmax(-1)
    cdf = probs.cumsum(-1)  # (B, V)
    idx = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    idx = idx.clamp_max(logits.shape[-1] - 1)
    # never land on a zero-probability token through rounding at the top of the cdf
    bad = probs.gather(-1, idx[:, None]).squeeze(-1) <= 0
    if bad.any():
        idx = torch.where(bad, probs.argmax(-1), idx)
    return idx


# ------------------------------------------------------------------------------------------------- outputs
@dataclass
class Rollout:
    """One batch of completions. ``tokens``/``logprobs``/``mask`` are (B, N) with N = the longest completion;
    positions after a row's end hold pad / 0 / 0. ``logprobs`` are log π(token) under the sampling temperature
    (before top-k/top-p filtering), in fp32. ``finished[i]`` is False when row i ran out of ``max_new_tokens``."""

    prompt_ids: list[list[int]]
    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    texts: list[str]
    finished: list[bool]

    def completion_ids(self, i: int) -> list[int]:
        return self.tokens[i, : int(self.mask[i].sum())].tolist()

    def training_rows(self) -> list[dict]:
        """Each prompt + completion as a training row (prompt labels masked), ready for ``collate``."""
        rows = []
        for i, p in enumerate(self.prompt_ids):
            c = self.completion_ids(i)
            rows.append({"input_ids": list(p) + c, "labels": [IGNORE] * len(p) + c})
        return rows


# ---------------------------------------------------------------------------------------------- the engine
class _Stopper:
    """Per-row end detection: eos ids, and stop strings checked on the decoded completion.

    Only the completion's tail is decoded at each token: a stop string first appears in the text ending at the
    newest token (earlier occurrences would have stopped the row already), and a string of L UTF-8 bytes spans at
    most L tokens that decode to something (byte-level tokenizers spend up to 4 tokens on one character), so the
    last L + ``TAIL_SLACK`` tokens hold it (the slack covers tokens
    that decode to nothing, and a partial UTF-8 byte at the window's start). Decoding the whole completion at every
    token would cost O(n²) in its length."""

    TAIL_SLACK = 8

    def __init__(self, tokenizer, eos_ids: set[int], stop: list[str] | None):
        self.tok, self.eos, self.stop = tokenizer, eos_ids, [s for s in (stop or []) if s]
        self.window = max((len(s.encode()) for s in self.stop), default=0) + self.TAIL_SLACK

    def done(self, token: int, completion: list[int]) -> bool:
        if token in self.eos:
            return True
        if self.stop and self.tok is not None:
            text = self.tok.decode(completion[-self.window:], skip_special_tokens=True)
            return any(s in text for s in self.stop)
        return False


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _next_logits(model, ids, mask, pos, cache, names: dict):
    """One forward: the last position's logits (B, V) and the updated KV cache. ``names`` holds the keyword the
    model takes its cache under (``cache`` in recent transformers, ``past_key_values`` before) and whether it can
    compute the output head on the last position only."""
    kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True}
    if cache is not None:
        kw[names["cache"]] = cache
    if names["keep_last"]:
        kw["logits_to_keep"] = 1
    out = model(**kw)
    new_cache = out.get("cache", None) if hasattr(out, "get") else None
    return out.logits[:, -1].float(), new_cache if new_cache is not None else out.past_key_values


def _prefill(model, prompt_ids: list[list[int]], ids, mask, pos, names: dict):
    """The first forward over the (left-padded) prompts, each distinct prompt once: a GRPO group, or best-of-n,
    samples G completions of one prompt, and their prompt KV caches are identical, so the prompt is run once and
    its cache rows are repeated (``Cache.reorder_cache``, what beam search uses to copy a beam) instead of computing
    G copies. Results are the same as a prefill of every row; it saves (G-1)/G of the prefill. Not with per-example adapters: rows with one prompt may differ in adapter."""
    from tuneforge.methods._scope import PerExample, adapter_layers

    first: dict[tuple[int, ...], int] = {}
    inverse = [first.setdefault(tuple(p), len(first)) for p in prompt_ids]
    per_row = any(isinstance(m.active, PerExample) for m in adapter_layers(model))  # rows may differ in adapter
    if len(first) == len(prompt_ids) or per_row:
        return _next_logits(model, ids, mask, pos, None, names)
    keep = torch.tensor([inverse.index(u) for u in range(len(first))], device=ids.device)
    logits, cache = _next_logits(model, ids[keep], mask[keep], pos[keep], None, names)  # (U, V)
    if not hasattr(cache, "reorder_cache"):  # a legacy tuple cache: run every row instead
        return _next_logits(model, ids, mask, pos, None, names)
    rows = torch.tensor(inverse, device=ids.device)
    cache.reorder_cache(rows)
    from tuneforge.methods.p_tuning import HIDDEN

    hidden = getattr(cache, HIDDEN, None)  # template slots hidden from rows without P-tuning: per row too
    if hidden is not None:
        setattr(cache, HIDDEN, hidden[rows.to(hidden.device)])
    return logits[rows.to(logits.device)], cache


def _folded_weight(m) -> torch.Tensor | None:
    """W + Σ ΔW of a layer's active adapters when every one is additive (LoRA without DoRA; the ΔW methods: sparse,
    diff pruning, LoKr), else None. Exact algebra: the layer then computes (W + ΔW) x + b."""
    from tuneforge.methods._delta import DeltaLayer
    from tuneforge.methods.lora import LoraLayer

    if not isinstance(m.active, tuple) or m.merged:
        return None
    if isinstance(m, LoraLayer) and not any(n in m.lora_magnitude_vector for n in m.active):
        deltas = [m.delta_weight(n) for n in m.active]
    elif isinstance(m, DeltaLayer):
        deltas = [m.delta(n) for n in m.active if not m.skip(n)]
    else:
        return None
    w = m.weight.detach()
    for d in deltas:
        w = w + d.detach().to(w.dtype)
    return w


@contextlib.contextmanager
def onednn_linears(model: nn.Module, batch_hint: int):
    """For the duration of a rollout on CPU: fp32 linear layers run through oneDNN with weights reordered once.

    Why: decoding multiplies a handful of rows by every weight matrix once per token. For such skinny products
    ``F.linear`` (MKL sgemm) reaches a third of what oneDNN does with a pre-packed weight on the same cores
    (measured at 8 rows: 136 vs 48 µs for a 512×1376 projection, 7.0 vs 1.3 ms for a 32000-row output head), and
    the weights do not change while sampling, so packing them once per rollout pays for itself after one token.
    Additive adapters (LoRA, ΔW methods) are folded into the packed weight, so an adapted layer costs one matmul
    like a plain one; other adapters (IA3, DoRA) keep their own path around the packed base. Weights stored in bf16,
    or any weight under bf16 autocast, are packed in bf16 (the matmul autocast would run; 1.6-1.8x F.linear's bf16
    speed at 8 rows). fp32 results agree with ``F.linear`` to float32 rounding (summation order). The packed copies
    live only for the call; the layers are restored on exit and their weights are never written.
    """
    patched: list = []
    try:  # from the first patched layer on: an error part-way must not leave packed forwards installed
        _pack_linears(model, batch_hint, patched)
        yield len(patched)
    finally:
        for m, name in patched:
            delattr(m, name)


def _pack_linears(model: nn.Module, batch_hint: int, patched: list) -> None:
    """Install a packed oneDNN forward on every eligible linear layer, recording each in ``patched`` as it goes."""
    from tuneforge.methods._linear import LinearWrapper

    usable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    for m in model.modules() if usable else ():
        plain = type(m) is nn.Linear
        wrapped = isinstance(m, LinearWrapper) and m.owns_weight and not m.fan_in_fan_out
        w = getattr(m, "weight", None)
        if not (plain or wrapped) or w is None or w.device.type != "cpu":
            continue
        # the dtype the matmul runs in: fp32, or bf16 for bf16-stored weights / under bf16 autocast
        dtype = torch.bfloat16 if torch.bfloat16 in (w.dtype, autocast) else w.dtype
        if dtype not in (torch.float32, torch.bfloat16) or w.dtype not in (torch.float32, torch.bfloat16):
            continue
        if dtype == torch.bfloat16 and not onednn_bf16_supported():
            continue  # e.g. an AVX2-only CPU: oneDNN refuses bf16 weights; the layer keeps its own forward
        folded = _folded_weight(m) if wrapped else None
        weight = (w if folded is None else folded).detach().to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        bias = m.bias.detach().to(dtype) if m.bias is not None else None
        if folded is not None:
            name, fast = "forward", _fast(m, packed, bias, dtype, lambda x, m=m: type(m).forward(m, x), m.active)
        else:
            own = (lambda x, m=m: torch.nn.functional.linear(x, m.weight, m.bias)) if plain else \
                (lambda x, m=m: type(m).base_forward(m, x))
            name, fast = ("forward" if plain else "base_forward"), _fast(m, packed, bias, dtype, own, None)
        setattr(m, name, fast)
        patched.append((m, name))


@functools.lru_cache(maxsize=1)
def onednn_bf16_supported() -> bool:
    """Whether this CPU's oneDNN packs bf16 weights (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; AVX2-only
    machines raise). Probed once on a tiny weight."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 1)
        return True
    except RuntimeError:
        return False


def _fast(m, packed, bias, dtype, own, active):
    """The packed matmul; the layer's own path for an input it was not packed for (a half input to an fp32 pack)
    or, for a folded layer, when another adapter selection is active."""
    def forward(x):
        if (x.dtype != dtype and dtype == torch.float32) or (active is not None and m.active != active):
            return own(x)
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")
    return forward


def _uniforms(gens: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g) for g in gens])


def sample(model, prompt_ids: list[list[int]], *, pad_id: int, eos_ids: set[int] | list[int] | int | None = None,
           max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           seeds: list[int] | None = None, stop: list[str] | None = None, tokenizer=None,
           fast_linear: bool = True, on_token: Callable[[int, int], None] | None = None) -> Rollout:
    """Complete each prompt (token ids, no padding) in one batch; greedy when ``temperature == 0``.

    ``seeds[i]`` seeds row i's own generator (DT-5); without seeds, rows draw from generators seeded off the global
    torch RNG. A row stops at an eos id (kept as its last token, so a policy can learn to stop) or when its decoded
    completion contains a stop string (``tokenizer`` needed); the batch stops when every row has. On CPU, fp32
    linear layers run through oneDNN for the call (``onednn_linears``; ``fast_linear=False`` keeps ``F.linear``).
    ``on_token(row, token)`` is called for each new token as it is chosen (streaming).
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample() needs non-empty prompts (encode them with encode_prompt: bos counts)")
    if any(t >= SLOT_BASE for p in prompt_ids for t in p):
        from tuneforge.methods.p_tuning import handles_slots

        if not handles_slots(model):
            raise ValueError("these prompts hold P-tuning template slots (ids >= 2**30), but the model carries no "
                             "P-tuning adapter with a template to fill them; encode prompts for this model "
                             "(encode_prompt(tokenizer, prompt, model_template(model)))")
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or ())
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    B = len(prompt_ids)
    if seeds is None:
        seeds = torch.randint(0, 2**62, (B,)).tolist()
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    stopper = _Stopper(tokenizer, eos, stop)
    fast = onednn_linears(model, B) if fast_linear and device.type == "cpu" else contextlib.nullcontext()
    try:  # outputs are cloned below into ordinary tensors, usable in autograd
        with torch.inference_mode(), fast:
            tokens, logps, alive, completions = _decode(model, prompt_ids, pad_id, device, gens, stopper,
                                                        max_new_tokens, temperature, top_k, top_p, on_token)
    finally:
        model.train(was_training)
    tok_t = torch.stack(tokens, 1).clone() if tokens else torch.zeros((B, 0), dtype=torch.long)
    lp_t = torch.stack(logps, 1).clone() if logps else torch.zeros((B, 0))
    lengths = torch.tensor([len(c) for c in completions])
    out_mask = (torch.arange(tok_t.shape[1])[None, :] < lengths[:, None]).long()
    texts = [tokenizer.decode(c, skip_special_tokens=True) if tokenizer is not None else "" for c in completions]
    texts = [_cut(t, stop) for t in texts]
    return Rollout(prompt_ids=[list(p) for p in prompt_ids], tokens=tok_t, logprobs=lp_t, mask=out_mask,
                   texts=texts, finished=(~alive).tolist())


def _decode(model, prompt_ids, pad_id, device, gens, stopper, max_new_tokens, temperature, top_k, top_p,
            on_token=None):
    """The token loop: prefill, then one cached forward per new token until every row has ended."""
    B = len(prompt_ids)
    ids, mask = (t.to(device) for t in _left_pad(prompt_ids, pad_id))
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, P): padded rows start at position 0, as generate() does
    names = {"cache": "cache" if _accepts(model, "cache") else "past_key_values",
             "keep_last": _accepts(model, "logits_to_keep")}
    tokens, logps = [], []
    alive = torch.ones(B, dtype=torch.bool)
    completions: list[list[int]] = [[] for _ in range(B)]
    cache, step_ids, step_pos = None, ids, pos
    for t in range(max_new_tokens):
        if t == 0:
            logits, cache = _prefill(model, prompt_ids, ids, mask, pos, names)  # (B, V)
        else:
            logits, cache = _next_logits(model, step_ids, mask, step_pos, cache, names)  # (B, V)
        logits = logits.cpu()
        if temperature > 0:
            scaled = logits / temperature
            nxt = sample_tokens(filter_logits(scaled, top_k, top_p), _uniforms(gens))
        else:
            scaled = logits
            nxt = logits.argmax(-1)
        lp = scaled.gather(-1, nxt[:, None]).squeeze(-1) - scaled.logsumexp(-1)  # (B,) log-softmax at nxt
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        tokens.append(nxt)
        logps.append(torch.where(alive, lp, torch.zeros_like(lp)))
        for i in alive.nonzero().flatten().tolist():
            completions[i].append(int(nxt[i]))
            if on_token is not None:
                on_token(i, int(nxt[i]))
            if stopper.done(int(nxt[i]), completions[i]):
                alive[i] = False
        if not alive.any():
            break
        step_ids = nxt[:, None].to(device)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
    return tokens, logps, alive, completions


def eos_ids_of(model, tokenizer) -> set[int]:
    """Every id that ends a completion: the tokenizer's eos and the model's generation config eos id(s)."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    for e in ([extra] if isinstance(extra, int) else (extra or [])):
        ids.add(int(e))
    return ids


def generate(model, tokenizer, prompts: list, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = 0, stop: list[str] | None = None,
             batch_size: int = 32) -> list[str]:
    """Complete each prompt (a string or a message list); greedy when temperature == 0. Returns the new text only.

    With a ``seed``, prompt i is sampled from its own generator seeded by (seed, i): its output does not depend on
    the batch size or on the other prompts.
    """
    if getattr(model.config, "is_encoder_decoder", False):  # T5: the prompt is the encoder's input
        from tuneforge.train.seq2seq_generate import generate_seq2seq

        return generate_seq2seq(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, stop=stop, batch_size=batch_size)
    pad = pad_id_of(tokenizer)
    eos = eos_ids_of(model, tokenizer)
    template = model_template(model)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p, template) for p in prompts[start:start + batch_size]]
        seeds = None if seed is None else [request_seed(seed, start + i) for i in range(len(chunk))]
        r = sample(model, chunk, pad_id=pad, eos_ids=eos, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, seeds=seeds, stop=stop, tokenizer=tokenizer)
        out.extend(r.texts)
    return out


def request_seed(*parts: int) -> int:
    """A 62-bit seed mixed from integers (run seed, step, row, sample index): distinct parts give unrelated
    streams, and the same parts give the same stream in any process."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 2
