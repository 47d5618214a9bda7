"""Shared-prompt scoring: responses that follow the same prompt are scored with the prompt computed once.

A DPO pair is two sequences with one prompt, a GRPO group G sequences with one prompt; scored as separate rows, every
prompt token runs through the model (forward, and backward for the policy) once per response. Packing a group into
one row, ``prompt[:-1] | prompt[-1] + response_1 | prompt[-1] + response_2 | ...``, with an attention mask that lets
each segment see the shared prompt and itself only, and position ids that restart each segment where the prompt
ends, gives every response token exactly the attention context and position it has in its own row: the same
log-probs (up to summation order), for ``P + G·(R+1) - 1`` tokens instead of ``G·(P+R)``. Each segment starts with a
copy of the prompt's last token so that the logits predicting a response's first token sit inside its segment and
the usual shift (position t predicts token t+1) holds in the packed row. This is the prefix sharing of Wang et al.
2024 (https://arxiv.org/abs/2410.20305, DPO) and of Prefix Grouper (Liu et al. 2025,
https://arxiv.org/abs/2506.05433, GRPO), here found from the token ids themselves, so every algorithm that scores
responses through ``_logps`` gets it, for preference pairs, rankings and sampled groups alike.

When it is used (otherwise, or with ``train.share_prompts: false``, the rows are scored as they are):

* the model takes a 4D attention mask (``sdpa`` or ``eager``: transformers' masking passes a 4D mask through
  unchanged; ``flash_attention_2`` cannot take one) and positions from ``position_ids`` (rotary or learned): not
  ALiBi (Bloom, MPT, Falcon with ``alibi``), whose biases are built from the 2D mask;
* no row is longer than a sliding attention window (Mistral, Gemma 2/3, Qwen2 with ``use_sliding_window``): the
  4D mask replaces the model's windowed one, which equals plain causal attention only within the window;
* every row is right-padded with a 2D mask and supervises nothing on its padding; no per-example adapter selection
  is active (it keys on batch rows), nor a soft prompt (prompt/prefix tuning: its virtual tokens' columns go in
  front of a 2D mask); no dropout is active (a shared prompt would share one dropout mask);
* the packed batch is cheaper: its estimated cost (linear layers per position, padding included, plus attention
  scores, quadratic in the row length) is at most 1 − ``MIN_SAVING`` of the unpacked batch's. Long responses after
  a short prompt, or a few shared rows among many unrelated ones (each padded to the packed length), are not.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

IGNORE = -100
MIN_SAVING = 0.1  # share only when the estimated cost falls by at least this fraction
ALIBI_TYPES = ("bloom", "mpt")  # position biases from the 2D mask (Falcon: config.alibi)
ATTRIBUTE = "tuneforge_share_prompts"  # set on the model by the training loop (train.share_prompts)


def enable(model: nn.Module, on: bool) -> None:
    setattr(model, ATTRIBUTE, bool(on))


def _usable(model: nn.Module, batch: dict) -> bool:
    if not getattr(model, ATTRIBUTE, False) or "position_ids" in batch or "attention_mask" not in batch:
        return False
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if batch["attention_mask"].dim() != 2:
        return False
    from tuneforge.data.template import SLOT_BASE

    if bool((batch["input_ids"] >= SLOT_BASE).any()):  # P-tuning template slots: a reference pass without the
        return False  # adapter reads each as a copy of the token before it, which a packed row does not keep
    if getattr(cfg, "model_type", None) in ALIBI_TYPES or getattr(cfg, "alibi", False) or not _takes_positions(model):
        return False
    if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return False
    from tuneforge.methods import _soft_prompt
    from tuneforge.methods._scope import PerExample, adapter_layers

    if _soft_prompt.active(model):  # virtual tokens take a 2D mask (their columns go in front of it)
        return False
    return not any(isinstance(m.active, PerExample) for m in adapter_layers(model))


def _takes_positions(model: nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def sliding_window(config) -> int | None:
    """The attention window a row must fit in for the packed (plain causal) mask to equal the model's own."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    w = getattr(config, "sliding_window", None)
    return int(w) if w else None


def _cost(config, rows: int, width: int) -> float:
    """Relative cost of a forward over ``rows`` x ``width`` positions: the linear layers per position (attention
    projections and MLP, ~2 (4 d^2 + 3 d f) FLOPs) and attention scores per row (~4 d per query-key pair)."""
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1
    f = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    return rows * width * 2 * (4 * d * d + 3 * d * f) + rows * width * width * 4 * d


def prompt_groups(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
                  ) -> tuple[list[list[int]], list[int], list[int]] | None:
    """Rows grouped by identical prompt (the ids before a row's first supervised label), in order of first row.

    Returns ``(groups, prompt_len, length)``: each group's row indices, each row's prompt length and real length, or
    None when a row is not right-padded (its mask is not ones then zeros)."""
    B, T = input_ids.shape
    lengths = attention_mask.sum(1).tolist()
    if any(int(attention_mask[b, :n].sum()) != n for b, n in enumerate(lengths)):
        return None  # a hole or left padding: positions are not 0..n-1
    sup = labels != IGNORE
    if bool((sup & (attention_mask == 0)).any()):
        return None  # a supervised label on padding: the packed row would not hold it
    first = torch.where(sup.any(1), sup.float().argmax(1), torch.zeros(B, dtype=torch.long)).tolist()
    ids = input_ids.tolist()
    index: dict[tuple, int] = {}
    groups: list[list[int]] = []
    for b in range(B):
        key = (first[b], tuple(ids[b][:first[b]])) if first[b] >= 2 else ("alone", b)
        if key not in index:
            index[key] = len(groups)
            groups.append([])
        groups[index[key]].append(b)
    return groups, first, lengths


def segments(groups: list[list[int]], prompt_len: list[int], length: list[int]) -> list[list[tuple[int, int, int]]]:
    """Per packed row, the ``(row, start, end)`` slices of original rows it holds: a lone row whole, a group as its
    prompt without the last token, then each member from that token on."""
    out = []
    for g in groups:
        p = prompt_len[g[0]]
        whole = [(g[0], 0, length[g[0]])]
        out.append(whole if len(g) == 1 else [(g[0], 0, p - 1)] + [(b, p - 1, length[b]) for b in g])
    return out


def _width(segs: list[list[tuple[int, int, int]]]) -> int:
    return max(sum(e - s for _, s, e in sg) for sg in segs)


def pack(batch: dict, groups: list[list[int]], prompt_len: list[int], length: list[int], mask_dtype: torch.dtype
         ) -> tuple[dict, torch.Tensor]:
    """The packed batch (one row per group) and ``order``: for the supervised next-token positions of the original
    batch, in row-major order, the index of the same position among the packed batch's (also row-major), so that
    ``packed_values[order]`` lays per-token values out as the original batch's."""
    ids, labels = batch["input_ids"], batch["labels"]
    B, T = ids.shape
    segs = segments(groups, prompt_len, length)
    Tp = _width(segs)
    G = len(groups)
    out_ids = torch.zeros((G, Tp), dtype=ids.dtype, device=ids.device)  # padding: masked, never supervised
    out_labels = torch.full((G, Tp), IGNORE, dtype=labels.dtype, device=labels.device)
    positions = torch.zeros((G, Tp), dtype=torch.long, device=ids.device)
    segment = -1 - torch.arange(Tp, device=ids.device).repeat(G, 1)  # padding: a unique negative id each
    source = torch.full((G, Tp), -1, dtype=torch.long, device=ids.device)  # original b * T + t of each position
    for r, sg in enumerate(segs):
        at = 0
        for k, (b, s, e) in enumerate(sg):
            n = e - s
            out_ids[r, at:at + n] = ids[b, s:e]
            out_labels[r, at:at + n] = labels[b, s:e]
            positions[r, at:at + n] = torch.arange(s, e, device=ids.device)
            segment[r, at:at + n] = k
            source[r, at:at + n] = b * T + torch.arange(s, e, device=ids.device)
            at += n
    # query t sees key s <= t of its own segment, and a response segment (k > 0) sees the shared prompt (k = 0); a
    # segment's first label is the prompt's, unsupervised, so no target is predicted across a segment boundary
    same = segment[:, :, None] == segment[:, None, :]
    prompt = (segment[:, None, :] == 0) & (segment[:, :, None] > 0)
    allowed = (same | prompt) & torch.ones((Tp, Tp), dtype=torch.bool, device=ids.device).tril()
    mask = allowed[:, None]
    if mask_dtype != torch.bool:
        mask = torch.where(mask, torch.zeros((), dtype=mask_dtype, device=ids.device),
                           torch.tensor(torch.finfo(mask_dtype).min, dtype=mask_dtype, device=ids.device))
    packed = {"input_ids": out_ids, "labels": out_labels, "position_ids": positions, "attention_mask": mask}
    # supervised next-token positions: label position t (>= 1) is predicted at t - 1, i.e. targets = labels[:, 1:]
    keep_p = out_labels[:, 1:] != IGNORE
    src = source[:, 1:][keep_p]  # original b * T + t of each packed target, packed row-major order
    keep_o = labels[:, 1:] != IGNORE
    orig = (torch.arange(B, device=ids.device)[:, None] * T + torch.arange(1, T, device=ids.device))[keep_o]
    rank = torch.searchsorted(orig, src)  # where each packed target sits in the original order
    return packed, torch.argsort(rank)


def share_prompts(model: nn.Module, batch: dict) -> tuple[dict, torch.Tensor] | None:
    """``(packed batch, order)`` when sharing prompts is possible and worth it for this batch (see the module
    docstring), else None."""
    if not _usable(model, batch):
        return None
    found = prompt_groups(batch["input_ids"], batch["labels"], batch["attention_mask"])
    if found is None:
        return None
    groups, prompt_len, length = found
    if all(len(g) == 1 for g in groups):
        return None
    window = sliding_window(model.config)
    if window is not None and max(length) > window:
        return None
    B, T = batch["input_ids"].shape
    packed_cost = _cost(model.config, len(groups), _width(segments(groups, prompt_len, length)))
    if packed_cost > (1 - MIN_SAVING) * _cost(model.config, B, T):
        return None
    eager = getattr(model.config, "_attn_implementation", None) == "eager"
    return pack(batch, groups, prompt_len, length, torch.float32 if eager else torch.bool)
