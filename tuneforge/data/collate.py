"""Batching: right-padded batches, and packed batches whose examples cannot see each other.

Labels stay UNshifted (HF convention: ``logits[:, :-1]`` predict ``labels[:, 1:]``), so a batch can be handed to
``model(**batch)`` and its built-in loss, or to our own loss code, unchanged.
"""

from __future__ import annotations

from itertools import combinations

import torch

from tuneforge.data.tokenize import IGNORE


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``rows`` to the longest one.

    Returns ``input_ids`` (B, T) padded with ``pad_id``, ``labels`` (B, T) with -100 on padding (never derived from
    ``pad_id``, which may equal eos), and ``attention_mask`` (B, T) long, 1 on real tokens.
    """
    if not rows:
        raise ValueError("collate() needs at least one row")
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(row["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def preference_responses(row: dict) -> list[tuple[list[int], list[int]]]:
    """A preference row's ``(input_ids, labels)`` sequences, best first: chosen and rejected of a pair, or all K
    responses of a ranking (``ranking_input_ids`` / ``ranking_labels``)."""
    if "ranking_input_ids" in row:
        return list(zip(row["ranking_input_ids"], row["ranking_labels"]))
    return [(row["input_ids"], row["labels"]), (row["rejected_input_ids"], row["rejected_labels"])]


def collate_preference(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference rows (pairs and rankings) -> one right-padded batch holding each response once, so a single forward
    scores them all, plus which responses each pair compares.

    Sequences are laid out by rank: every row's best response, then every row's second, and so on. For pairs alone
    that is all chosen then all rejected, DPO's concatenated forward. A ranking of K responses contributes K
    sequences and its K-choose-2 (better, worse) pairs, all in this batch element: InstructGPT (Ouyang et al. 2022,
    sec. 3.5) found that shuffling a ranking's comparisons into separate examples over-fits the reward model, since
    each response then enters K-1 independent updates, and that one forward per response is also much cheaper.

    Returns ``collate()``'s keys for the N sequences and, per pair (P,): ``chosen_index`` / ``rejected_index`` (long,
    into the N sequences) and ``pair_weight`` (float, 1 / the number of pairs of its row), so that a weighted sum of
    per-pair losses counts every row once with its pairs averaged (InstructGPT's eq. 1 divides by K-choose-2).
    These three keys are not model inputs: pass the model ``input_ids`` / ``attention_mask`` only.
    """
    if not rows:
        raise ValueError("collate_preference() needs at least one row")
    per_row = [preference_responses(r) for r in rows]
    slot: dict[tuple[int, int], int] = {}
    seqs: list[dict] = []
    for k in range(max(len(resp) for resp in per_row)):
        for b, resp in enumerate(per_row):
            if k < len(resp):
                slot[b, k] = len(seqs)
                seqs.append({"input_ids": resp[k][0], "labels": resp[k][1]})
    chosen, rejected, weight = [], [], []
    for b, resp in enumerate(per_row):
        pairs = list(combinations(range(len(resp)), 2))
        chosen += [slot[b, i] for i, _ in pairs]
        rejected += [slot[b, j] for _, j in pairs]
        weight += [1.0 / len(pairs)] * len(pairs)
    batch = collate(seqs, pad_id)
    batch["chosen_index"] = torch.tensor(chosen, dtype=torch.long)  # (P,)
    batch["rejected_index"] = torch.tensor(rejected, dtype=torch.long)  # (P,)
    batch["pair_weight"] = torch.tensor(weight, dtype=torch.float32)  # (P,)
    return batch


def pair_index(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen_index, rejected_index, pair_weight)`` of a preference batch. A batch built without them (online
    DPO's fresh pairs: chosen rows first, rejected after) is read as its two halves, each pair weighing 1."""
    if "chosen_index" in batch:
        return batch["chosen_index"], batch["rejected_index"], batch["pair_weight"]
    n = batch["input_ids"].shape[0]
    b = n // 2
    idx = torch.arange(b, device=batch["input_ids"].device)
    return idx, idx + b, torch.ones(b, device=idx.device)


def pack_rows(rows: list[dict], max_len: int) -> list[list[dict]]:
    """Greedy, order-preserving (next-fit) bins whose total length is <= ``max_len``.

    Order is kept so that a seeded shuffle before packing fully determines the batches; next-fit wastes a little
    more room than first-fit-decreasing but never reorders data. A row longer than ``max_len`` is an error: rows
    should already be truncated to the same ``max_len`` by ``build_dataset``.
    """
    bins: list[list[dict]] = []
    current: list[dict] = []
    used = 0
    for row in rows:
        n = len(row["input_ids"])
        if n > max_len:
            raise ValueError(f"row {row.get('row_id', '?')} has {n} tokens, more than the packing max_len={max_len}")
        if current and used + n > max_len:
            bins.append(current)
            current, used = [], 0
        current.append(row)
        used += n
    if current:
        bins.append(current)
    return bins


def collate_packed(
    bins: list[list[dict]], pad_id: int, *, mask_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Collate bins from ``pack_rows``; each bin becomes one right-padded sequence. Returns:

    - ``input_ids`` (B, T) long: the bin's examples concatenated, then ``pad_id``.
    - ``labels`` (B, T) long, UNshifted: each example's labels, except that its *first* position is -100, because in
      a packed row that label would be predicted from the previous example's last token; -100 on padding. With
      this, ``labels[:, 1:]`` supervises exactly the tokens each example supervises on its own.
    - ``position_ids`` (B, T) long: 0, 1, ... restarting at every example (0 on padding), so rotary (Llama,
      GPT-NeoX) and learned absolute (GPT-2) positions match an unpacked forward. GPT-2 computes positions from
      ``arange`` when none are given, so they must be passed to the model.
    - ``attention_mask`` (B, 1, T, T), block-diagonal causal: query t may attend key s iff s <= t and both belong to
      the same example. Padding tokens attend only to themselves, so no softmax row is empty (no NaN). By default it
      is *additive* float32 (0 = attend, ``finfo(float32).min`` = blocked) because transformers' eager attention
      adds the mask to the scores (a bool mask would be added as 0/1, silently wrong) while SDPA accepts a float32
      mask for fp32/bf16/fp16 queries. ``mask_dtype=torch.bool`` (True = attend) is 4x smaller and works with SDPA
      only.

    Why a 4D mask: in transformers 5.x ``create_causal_mask`` (used by Llama, GPT-2 and GPT-NeoX) returns a 4D
    ``attention_mask`` unchanged, for both ``sdpa`` and ``eager``, with or without a KV cache. The same models can
    instead rebuild this mask from ``position_ids`` alone, but only when ``attention_mask`` is omitted *and* no
    cache exists, i.e. with ``use_cache=False`` (otherwise the forward creates a ``DynamicCache`` and packing
    detection is silently skipped). That is the route for ``flash_attention_2``, which cannot take a 4D mask: drop
    the ``attention_mask`` key, keep ``position_ids``, pass ``use_cache=False``. The 4D mask costs B*T*T elements,
    e.g. 64 MiB for B=4, T=2048 in float32.
    """
    if not bins or not all(bins):
        raise ValueError("collate_packed() needs at least one bin and no empty bins")
    B = len(bins)
    T = max(sum(len(r["input_ids"]) for r in rows) for rows in bins)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    segment = -1 - torch.arange(T).repeat(B, 1)  # (B, T) example index; padding gets a unique negative id each
    for b, rows in enumerate(bins):
        start = 0
        for k, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[b, start : start + n] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[b, start + 1 : start + n] = torch.tensor(row["labels"][1:], dtype=torch.long)
            position_ids[b, start : start + n] = torch.arange(n)
            segment[b, start : start + n] = k
            start += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": block_causal_mask(segment, mask_dtype),
    }


def block_causal_mask(segment: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) mask allowing key s for query t iff s <= t and same segment."""
    T = segment.shape[1]
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    causal = torch.ones((T, T), dtype=torch.bool).tril()  # (T, T)
    allowed = (same & causal)[:, None]  # (B, 1, T, T)
    if dtype == torch.bool:
        return allowed
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, torch.zeros((), dtype=dtype), blocked)
