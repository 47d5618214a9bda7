"""Reward modelling: a scalar score r(x, y) trained on human (or AI) preferences with the Bradley-Terry model
(Ouyang et al. 2022, InstructGPT, https://arxiv.org/abs/2203.02155, eq. 1):

    L = −log σ(r(x, y_w) − r(x, y_l) − m)

P(y_w ≻ y_l) = σ(r_w − r_l) is the Bradley-Terry probability that the chosen response wins; ``margin`` m (Llama 2,
Touvron et al. 2023, eq. 2) asks for a larger gap on pairs labelled as clearly better. InstructGPT collects
rankings of K responses and trains on all K-choose-2 pairs of each ranking together (``ranking_pairs``), which it
found both cheaper (one forward per response, not per pair) and less prone to over-fitting than shuffled pairs
(sec. 3.5: each response would otherwise enter K-1 separate updates). So a ranking is one dataset row and one batch
element: ``collate_preference`` puts its K responses in the batch once each with the indices of its pairs, ``step``
scores each response with one forward, and the ranking's loss is the mean over its pairs (eq. 1's 1/(K choose 2)),
so every row, pair or ranking, counts once in the step's mean.

The score r(x, y) is a linear head on the decoder's hidden state at the response's last token (its eos): the
``score`` head of a sequence-classification model (``*ForSequenceClassification`` with one label, trained in place),
or, on a causal LM, one added as ``model.reward_head`` (small random weights: a zero head would give the adapters below it no gradient
at first) and trained together with whatever the method trains. It is saved beside the adapter/model as ``reward_head.safetensors``; ``tuneforge score``
reads it back.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

DATA_FORMATS = ("preference",)
HEAD_FILE = "reward_head.safetensors"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["reward"] = "reward"
    margin: float = Field(0.0, ge=0, description="required reward gap m in −log σ(r_w − r_l − m)")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) and stats: pairwise accuracy (r_w > r_l) and the mean reward gap."""
    gap = r_chosen - r_rejected
    losses = -F.logsigmoid(gap - margin)
    return losses, {"pairwise_accuracy": (gap > 0).float().mean().detach(), "reward_gap": gap.mean().detach()}


def ranking_pairs(ranking: list) -> list[tuple]:
    """All K-choose-2 (better, worse) pairs of a list ordered best first: [a, b, c] -> (a,b), (a,c), (b,c)."""
    if len(ranking) < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got {len(ranking)}")
    return list(combinations(ranking, 2))


# ------------------------------------------------------------------------------------------------- the score head
def is_sequence_classifier(model: nn.Module) -> bool:
    """A ``*ForSequenceClassification`` model with one label: its own ``score`` head is the reward head."""
    score = getattr(model, "score", None)
    return isinstance(score, nn.Linear) and score.out_features == 1


def has_head(model: nn.Module) -> bool:
    return hasattr(model, "reward_head") or is_sequence_classifier(model)


def attach_head(model: nn.Module) -> nn.Linear:
    """The trainable scalar head: a sequence classifier's ``score``, or (added once to a causal LM) ``reward_head``
    in fp32, seeded by the run's seed."""
    if is_sequence_classifier(model):
        return model.score.requires_grad_(True)
    if not hasattr(model, "reward_head"):
        hidden = model.config.hidden_size
        dev = next(model.parameters()).device
        model.reward_head = nn.Linear(hidden, 1, bias=True, device=dev, dtype=torch.float32)
        nn.init.normal_(model.reward_head.weight, std=1.0 / hidden ** 0.5)  # random, so adapters get gradient
        nn.init.zeros_(model.reward_head.bias)
    model.reward_head.requires_grad_(True)
    return model.reward_head


def scores(model: nn.Module, batch: dict) -> torch.Tensor:
    """r(x, y) per row (B,): the head on the hidden state of each row's last real token (right padding)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    last = batch["attention_mask"].sum(1) - 1  # (B,)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    head = model.score if is_sequence_classifier(model) else model.reward_head
    return head(h.to(head.weight.dtype)).float().squeeze(-1)


def save_head(model: nn.Module, out_dir: str | Path) -> None:
    from tuneforge.safeio import save_safetensors

    head = model.score if is_sequence_classifier(model) else model.reward_head
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                     Path(out_dir) / HEAD_FILE, metadata={"format": "pt"})


def load_head(model: nn.Module, directory: str | Path) -> None:
    from tuneforge.safeio import load_safetensors

    file = Path(directory) / HEAD_FILE
    if not file.exists() and is_sequence_classifier(model):
        return  # a sequence-classification checkpoint carries its score head in its own weights
    if not file.exists():
        raise FileNotFoundError(f"{file}: no reward head here (was this directory written by a reward run?)")
    head = attach_head(model)
    head.load_state_dict(load_safetensors(file))


@torch.no_grad()
def score_dataset(model: nn.Module, dataset, pad_id: int, batch_size: int = 32) -> list[float] | list[tuple]:
    """Scores of every row (prompt/completion or text rows), or per preference row the tuple of its responses'
    scores, best first: (chosen, rejected) for a pair, K scores for a ranking."""
    from tuneforge.data import collate
    from tuneforge.data.collate import preference_responses

    pairs = bool(len(dataset)) and _is_preference(dataset[0])
    out: list = []
    dev = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        groups = [preference_responses(r) for r in rows] if pairs else [[(r["input_ids"], r["labels"])] for r in rows]
        seqs = [{"input_ids": ids, "labels": labels} for g in groups for ids, labels in g]
        r = iter(scores(model, {k: v.to(dev) for k, v in collate(seqs, pad_id).items()}).tolist())
        out += [tuple(next(r) for _ in g) for g in groups] if pairs else list(r)
    return out


def _is_preference(row: dict) -> bool:
    return "rejected_input_ids" in row or "ranking_input_ids" in row


# ------------------------------------------------------------------------------------------------- training step
def prepare(model, cfg: Config, state: dict) -> None:
    attach_head(model)


def row_weight(dataset, i: int) -> int:
    """Each preference row, a pair or a whole ranking, counts once in the step's mean."""
    return 1


def step(model, batch: dict, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    """One micro-batch of preference rows (``collate_preference``): one score per response, a Bradley-Terry loss per
    pair, each row's pairs averaged (``pair_weight``), summed over rows and divided by the step's row count."""
    from tuneforge.data.collate import pair_index

    r = scores(model, batch)  # (N,): every response of the micro-batch once
    chosen, rejected, weight = pair_index(batch)  # (P,) each
    losses, _ = bradley_terry_loss(r[chosen], r[rejected], cfg.margin)  # (P,)
    norm = max(ctx.normaliser, 1.0)
    gap = (r[chosen] - r[rejected]).detach()
    return (weight * losses).sum() / norm, {"pairwise_accuracy": float((weight * (gap > 0)).sum()) / norm,
                                            "reward_gap": float((weight * gap).sum()) / norm,
                                            "pairs": int(chosen.numel())}
