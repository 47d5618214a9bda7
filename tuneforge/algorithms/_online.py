"""What the online algorithms (PPO, GRPO, rejection sampling, online DPO / RLAIF) share: the sampling settings, the
prompt rows they read, rollouts with per-request seeds, and scoring.

Prompt rows are ordinary prompt/completion (or chat) training rows: the prompt is everything before the row's last
supervised span, encoded exactly as training encodes it, and the supervised span is the reference answer, which
the ``exact_match`` reward compares against and PPO-ptx trains on.

Each completion j of data row r at loop step s is sampled from its own generator seeded by (run seed, s, r, j).
Sampling is therefore reproducible per request, independent of batch composition and of the number of
processes, and a resumed run (same step counter) draws exactly the rollouts the uninterrupted run drew.

The sampling temperature T is part of the policy: completions are drawn from softmax(z / T), and the
policy-gradient algorithms (PPO, GRPO) score π, π_old and π_ref at the same T, as TRL does. Top-k / top-p truncation
is not renormalised when scoring (TRL neither): with it on, what is sampled is the truncated distribution, and the
ratios and KL terms carry that known bias; keep ``top_k: 0`` and ``top_p: 1`` for exactly on-policy updates.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.algorithms import rewards as R
from tuneforge.algorithms._logps import token_logps_from_model
from tuneforge.algorithms._reference import _with_reference
from tuneforge.data import collate
from tuneforge.train import dist as D
from tuneforge.train.precision import frozen_weights_as
from tuneforge.train.rollout import Rollout, eos_ids_of, pad_id_of, request_seed, sample

IGNORE = -100
log = logging.getLogger("tuneforge")


class Sampling(BaseModel):
    """Sampling settings shared by every online algorithm's config."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0, description="sampling temperature T (> 0: online algorithms explore); "
                                                      "PPO/GRPO train the policy softmax(z / T) they sample")
    top_k: int = Field(0, ge=0, description="0 = off; truncation is not renormalised in PPO/GRPO's ratios (as TRL)")
    top_p: float = Field(1.0, gt=0, le=1, description="1 = off; as top_k, a known bias of the ratios when on")
    stop: list[str] = Field(default_factory=list, description="stop strings that end a completion")
    rollout_precision: Literal["auto", "bf16"] = Field(
        "auto", description="auto = sample in the run's precision (exactly on-policy); bf16 = sample with frozen "
                            "weights in bf16 under autocast even when training in fp32 (faster rollouts, slightly "
                            "off-policy, as with a separate bf16 inference engine)")


def split_row(row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference answer ids) of a tokenized training row: the cut is the start of its last supervised
    span (a chat row's last assistant turn)."""
    labels, ids = row["labels"], row["input_ids"]
    start = None
    for t in range(len(labels) - 1, 0, -1):
        if labels[t] != IGNORE and labels[t - 1] == IGNORE:
            start = t
            break
    if start is None:
        raise ValueError(f"row at line {row.get('line')}: no prompt/answer boundary (online algorithms read "
                         "prompt/completion or chat rows)")
    return list(ids[:start]), [x for x in labels[start:] if x != IGNORE]


def where(row: dict, path: str | None = None) -> str:
    return f"{path or 'data'}:{row.get('line', '?')}"


def roll_out(model, rows: list[dict], n: int, cfg, ctx) -> tuple[Rollout, list[int]]:
    """``n`` completions of each row's prompt (row-major: row 0's n, then row 1's ...); returns the rollout and,
    per completion, the index of its row."""
    tok = ctx.algo_state["tokenizer"]
    prompts, owner, seeds = [], [], []
    for k, row in enumerate(rows):
        p, _ = split_row(row)
        for j in range(n):
            prompts.append(p)
            owner.append(k)
            seeds.append(request_seed(ctx.seed, ctx.step, row.get("row_id", k), j))
    fast = frozen_weights_as(model) if cfg.rollout_precision == "bf16" else contextlib.nullcontext()
    with fast:
        r = sample(model, prompts, pad_id=pad_id_of(tok), eos_ids=eos_ids_of(model, tok),
                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   seeds=seeds, stop=cfg.stop or None, tokenizer=tok)
    return r, owner


def score(roll: Rollout, rows: list[dict], owner: list[int], fns: list[tuple], ctx
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined rewards (N,) and validity (N,) of every completion; invalid ones are logged with their rows."""
    tok = ctx.algo_state["tokenizer"]
    answers_ids = [split_row(rows[k])[1] for k in owner]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    prompts = [decode(p) for p in roll.prompt_ids]
    answers = [decode(a) for a in answers_ids]
    places = [where(rows[k], ctx.algo_state.get("data_path")) for k in owner]
    comp_ids = [roll.completion_ids(i) for i in range(len(owner))]
    turns = [rows[k].get("prompt_messages") for k in owner]  # a chat row's prompt as turns, for reward models
    total, valid = R.combined_rewards(fns, prompts, roll.texts, answers, roll.prompt_ids, comp_ids, places, tok,
                                      prompt_messages=turns)
    if not bool(valid.all()):
        bad = sorted({places[i] for i in (~valid).nonzero().flatten().tolist()})
        log.warning("%d completion(s) got a non-finite reward and are skipped (rows %s)", int((~valid).sum()),
                    ", ".join(bad[:8]))
    return total, valid


def reference_token_logps(model, batch: dict, state: dict, temperature: float) -> torch.Tensor:
    """Per-token response log-probs (B, T-1) under π_ref at the sampling temperature: KL(π || π_ref) must compare
    the tempered policy with the reference tempered alike."""
    return _with_reference(model, state, lambda m: token_logps_from_model(m, batch, temperature)[0])


def gather_ids(ids: list[int], dist: D.Dist) -> list[int]:
    """Every process's integer ids, in rank order (two sums over processes, no pickling): what an algorithm needs
    to make a choice that depends on the global batch rather than on how it is split over processes."""
    if dist.world == 1:
        return list(ids)
    counts = torch.zeros(dist.world, dtype=torch.int64, device=dist.device)
    counts[dist.rank] = len(ids)
    D.all_reduce_sum_(counts, dist)
    start, total = int(counts[:dist.rank].sum()), int(counts.sum())
    buf = torch.zeros(total, dtype=torch.int64, device=dist.device)
    buf[start:start + len(ids)] = torch.tensor(ids, dtype=torch.int64, device=dist.device)
    return D.all_reduce_sum_(buf, dist).tolist()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def collate_rows(rows: list[dict], tok, device) -> dict:
    return to_device(collate(rows, pad_id_of(tok)), device)


def chunks(items: list, size: int) -> list[list]:
    return [items[s:s + size] for s in range(0, len(items), max(size, 1))]


def device_of(model) -> torch.device:
    return next(model.parameters()).device
