"""Shared log-probability helpers: every algorithm scores tokens the same way.

Labels are unshifted (Hugging Face convention): position t's logits predict token t+1, and label -100 marks a token
that carries no loss (prompt, padding). Computing the output head only on supervised positions (``lm_head_on``)
skips the largest matmul for every masked token — prompts are often most of an SFT row.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.algorithms._head_logps import fusable_head, head_token_logps
from tuneforge.algorithms._prefix import share_prompts
from tuneforge.data.seq2seq import model_inputs

IGNORE = -100


def shift(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> targets (B, T-1) for logits[:, :-1]."""
    return labels[:, 1:]


_HEAD_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
log = logging.getLogger("tuneforge")


def _head(model: nn.Module, inputs: dict | None = None) -> nn.Module | None:
    """The output head when logits are exactly ``head(base_model(...).last_hidden_state)``, else None.

    The fused paths below skip the model's own forward after the decoder, so anything a model does between the
    decoder and its logits would be lost: soft-capping (Gemma 2), Cohere's ``logit_scale``, Granite's division by
    ``logits_scaling``, MiniCPM's hidden-state scaling, FalconH1's ``lm_head_multiplier``... Rather than list every
    such model, the first call for a model proves the assumption on one row of its batch (``head_matches_logits``)
    and falls back to the model's own forward, with a log line, when it does not hold.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    if head is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None  # known not to be a plain head: use the model's own forward
    if model not in _HEAD_CHECKED and inputs is not None:
        ok, diff = head_matches_logits(model, head, inputs)
        _HEAD_CHECKED[model] = ok
        if not ok:
            log.warning("%s: logits are not the output head applied to the last hidden state (max |difference| "
                        "%.3g on one row); token log-probs use the model's own forward", type(model).__name__, diff)
    return head if _HEAD_CHECKED.get(model, True) else None


CHECK_POSITIONS = 16  # the head check compares the last 16 positions' logits: (1, 16, V), never (1, T, V)


@torch.no_grad()
def head_matches_logits(model: nn.Module, head: nn.Module, inputs: dict) -> tuple[bool, float]:
    """Whether ``head(base_model(x).last_hidden_state)`` equals ``model(x).logits`` on the first row of ``inputs``.

    Only the last ``CHECK_POSITIONS`` positions are compared (``logits_to_keep`` where the model takes it), so the
    check never holds a full (T, V) logits tensor: a 150k-token vocabulary at T = 4096 would be 2.4 GB in fp32.
    Both forwards run under one forked RNG state seeded alike (every CUDA device forked, as ``manual_seed`` seeds
    them all), so dropout draws the same masks in both and the training run's random stream is untouched (resume
    stays exact). A per-example adapter selection names one adapter per batch row; the single-row check runs under
    the first row's. The tolerance is relative to the logits' size and wide enough for bf16/fp16 rounding (different
    matmul shapes), far below any real scaling (x1/8, x10...).
    """
    from tuneforge.methods._scope import PerExample, adapter_layers, adapter_scope

    row = {k: v[:1] for k, v in inputs.items()}
    k = min(CHECK_POSITIONS, row["input_ids"].shape[1])
    per_example = [m.active for m in adapter_layers(model) if isinstance(m.active, PerExample)]
    scope = adapter_scope(model, per_example[0].names[0]) if per_example else contextlib.nullcontext()
    keep = {"logits_to_keep": k} if _accepts(model, "logits_to_keep") else {}
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with scope, torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        ref = model(**row, use_cache=False, **keep).logits[:, -k:]  # (1, k, V)
        torch.manual_seed(0)
        fused = head(model.base_model(**row, use_cache=False).last_hidden_state[:, -k:])
    if fused.shape != ref.shape:
        return False, float("inf")
    diff = float((fused.float() - ref.float()).abs().max())
    exact = ref.dtype == fused.dtype == torch.float32  # fp32 logits: only summation order differs
    tol = 1e-4 if exact else 3e-2  # half-precision logits: a few ulps of their size
    return diff <= tol * (1.0 + float(ref.float().abs().max())), diff


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def supervised_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N positions whose next token is supervised, and those N target ids.

    Runs the decoder once, then the output head only where it is needed.
    """
    targets = shift(batch["labels"])  # (B, T-1)
    keep = targets != IGNORE  # (B, T-1)
    inputs = model_inputs(batch)
    head = None if "encoder_input_ids" in batch else _head(model, inputs)  # an encoder-decoder: its own forward
    if head is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1]  # (B, T-1, V)
        return logits[keep], targets[keep]
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
    return head(hidden[keep]), targets[keep]  # (N, V), (N,)


def tempered(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits (or, for a bias-free head, the hidden states it multiplies) divided by the sampling temperature T.

    The online algorithms sample from softmax(z / T) (``train/rollout.py``), so π, π_old and π_ref must all be
    scored at the same T: an untempered π would make every update off-policy with no correction and the KL terms
    compare other distributions than the ones sampled (TRL tempers policy and reference logits alike). Top-k/top-p
    truncation is not renormalised here, as in TRL: with either on, the sampled distribution is the truncated one and
    the ratios carry that (documented) bias.
    """
    return x if temperature == 1.0 else x / temperature


def _inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    targets = shift(batch["labels"])  # (B, T-1)
    return targets, targets != IGNORE, model_inputs(batch)


def _fused(model: nn.Module, batch: dict, temperature: float = 1.0):
    """(hidden (B, T-1, H), log p (N,), keep (B, T-1)) through the chunked head+softmax, or None when the model's
    head cannot be fused (an adapted or quantised head, soft-capped logits)."""
    targets, keep, inputs = _inputs(batch)
    if "encoder_input_ids" in batch:  # an encoder-decoder (T5 scales the decoder's output before its head)
        return None
    head = _head(model, inputs)
    if head is None or not fusable_head(head) or (temperature != 1.0 and head.bias is not None):
        return None  # (a biased head: z / T ≠ W (h / T) + b, so tempered log-probs take the model's own head)
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
    return hidden, head_token_logps(head, tempered(hidden[keep], temperature), targets[keep]), keep


def supervised_token_logps(model: nn.Module, batch: dict, temperature: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of every supervised next token (N,) in fp32, and the (B, T-1) mask of where they sit; with a
    ``temperature`` T, log softmax(z / T): the distribution the rollout engine samples from.

    A plain linear head goes through the chunked head+softmax of ``_head_logps`` (no (N, V) logits are kept);
    anything else (an adapted or quantised head, soft-capped logits) through the model's own head. Rows that share a
    prompt (a preference pair, a sampled group) are scored with the prompt computed once (``_prefix``).
    """
    shared = share_prompts(model, batch)
    if shared is not None:
        packed, order = shared
        return _token_logps(model, packed, temperature)[0][order], _inputs(batch)[1]
    return _token_logps(model, batch, temperature)


def _token_logps(model: nn.Module, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    fused = _fused(model, batch, temperature)
    if fused is not None:
        return fused[1], fused[2]
    _, keep, _ = _inputs(batch)
    logits, picked = supervised_logits(model, batch)  # (N, V), (N,)
    if picked.numel() == 0:
        return logits.sum(-1) * 0.0, keep
    return -F.cross_entropy(tempered(logits.float(), temperature), picked, reduction="none"), keep


def token_cross_entropy_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross entropy over supervised tokens, and their count (0 tokens -> a graph-connected 0)."""
    logps, keep = supervised_token_logps(model, batch)
    return -logps.sum(), int(keep.sum())


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log p(label) from full logits (B, T, V) and unshifted labels (B, T) -> (B, T-1), 0 where masked."""
    targets = shift(labels)
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = targets != IGNORE
    picked = lp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked * mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of supervised token log-probs per row -> (B,)."""
    return token_logps(logits, labels).sum(-1)


def sequence_logps_from_model(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed supervised-token log-probs per row (B,) and the supervised token count per row (B,), through the
    same chunked head as SFT (no (B, T, V) logits are kept)."""
    logps, keep = supervised_token_logps(model, batch)  # (N,), (B, T-1)
    per_row = torch.zeros(keep.shape, dtype=logps.dtype, device=logps.device).masked_scatter(keep, logps)
    return per_row.sum(1), keep.sum(1)


def token_logps_from_model(model: nn.Module, batch: dict, temperature: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the supervised next tokens laid out as (B, T-1) (0 elsewhere), and the (B, T-1)
    float mask of where they sit: what the policy-gradient losses (PPO, GRPO) take, at their sampling temperature."""
    logps, keep = supervised_token_logps(model, batch, temperature)  # (N,), (B, T-1)
    per_token = torch.zeros(keep.shape, dtype=logps.dtype, device=logps.device).masked_scatter(keep, logps)
    return per_token, keep.to(logps.dtype)


def token_logps_and_hidden(model: nn.Module, batch: dict, temperature: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``token_logps_from_model``, plus the decoder's last hidden states (B, T-1, H) from the same forward at the
    supervised positions (zero elsewhere): an actor-critic (PPO) reads its value head off the trunk that produced
    the policy, in one pass, and only where the response is. Rows sharing a prompt are packed as in
    ``supervised_token_logps``, so policy, π_old and reference log-probs come from the same layout."""
    shared = share_prompts(model, batch)
    logps, hidden = _kept_logps_and_hidden(model, shared[0] if shared else batch, temperature)  # (N,), (N, H)
    if shared:
        logps, hidden = logps[shared[1]], hidden[shared[1]]
    _, keep, _ = _inputs(batch)
    per_token = torch.zeros(keep.shape, dtype=logps.dtype, device=logps.device).masked_scatter(keep, logps)
    full = hidden.new_zeros(*keep.shape, hidden.shape[-1]).masked_scatter(keep[..., None], hidden)
    return per_token, keep.to(logps.dtype), full


def _kept_logps_and_hidden(model: nn.Module, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p (N,) and last hidden states (N, H) at a batch's supervised next-token positions, row-major."""
    fused = _fused(model, batch, temperature)
    if fused is not None:
        hidden, logps, keep = fused
        return logps, hidden[keep]
    targets, keep, inputs = _inputs(batch)
    out = model(**inputs, use_cache=False, output_hidden_states=True)
    logits = tempered(out.logits[:, :-1][keep].float(), temperature)  # (N, V)
    return -F.cross_entropy(logits, targets[keep], reduction="none"), out.hidden_states[-1][:, :-1][keep]
