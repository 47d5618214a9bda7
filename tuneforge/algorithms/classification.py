"""Sequence classification: cross entropy of a classification head over the model's representation of the input.

L = -(1/N) sum_i log softmax(W h_i + b)[y_i] over the N rows of the optimizer step (Devlin et al. 2019, BERT,
https://arxiv.org/abs/1810.04805, sec. 4.1: "the only new parameters introduced during fine-tuning are classification
layer weights W ∈ R^{K×H}", h the final hidden state of [CLS] through the pooler). The model is the architecture's
own ``*ForSequenceClassification`` (BERT's [CLS] pooler, a decoder's last non-pad token), so checkpoints, PEFT and
``transformers`` pipelines agree on what the head reads. Normalising by the rows of the *whole* step (every
micro-batch and process) makes gradient accumulation and data parallelism equal one large batch, as for SFT's tokens.

The head (``classifier``/``pre_classifier``/``score``, what PEFT lists in ``modules_to_save``) is new and trains in
full beside whatever the method trains; it is saved with the adapter in PEFT's layout. Metrics: accuracy and
macro-F1 (the unweighted mean of per-class F1, so a minority class counts as much as the majority: Ding et al.'s
GLUE tables report accuracy, F1 matters once classes are skewed).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tuneforge.models.arch import task_head_names

DATA_FORMATS = ("classification",)
DISABLE_DROPOUT_DEFAULT = False  # BERT fine-tunes with its dropout on (Devlin et al. 2019, sec. A.3)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["classification"] = "classification"
    labels: list[str] | None = Field(None, description="the class names in class-id order; default: every label "
                                                       "of the training file, sorted (numerically for integers)")

    @field_validator("labels", mode="before")
    @classmethod
    def _distinct(cls, v):
        if isinstance(v, list):
            v = [str(x).strip() for x in v]
            if len(v) < 2 or len(set(v)) != len(v):
                raise ValueError("labels: give at least two distinct class names")
        return v


def row_weight(dataset, i: int) -> int:
    """Every row counts once in the step's normaliser."""
    return 1


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, normaliser: float) -> torch.Tensor:
    """Summed cross entropy of this micro-batch's rows / rows of the whole step. logits (B, K), targets (B,)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(normaliser, 1.0)


def forward_logits(model, batch: dict) -> torch.Tensor:
    """The classifier's logits (B, K) for a collated batch (``collate_classification``)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return model(**inputs).logits


def prepare(model, cfg: Config, state: dict) -> None:
    """The head trains in full (it is new); the method decides the rest."""
    heads = task_head_names(model)
    if not heads:
        raise ValueError(f"{type(model).__name__} has no classification head (classifier/score); load the model "
                         "with its labels (tuneforge does this for algorithm: classification)")
    for name in heads:
        getattr(model, name).requires_grad_(True)


def step(model, batch: dict, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    logits = forward_logits(model, batch)
    targets = batch["class_labels"]
    correct = (logits.argmax(-1) == targets).sum().item()  # summed over micro-batches by the loop: / the step's rows
    return loss_fn(logits, targets, ctx.normaliser), {"accuracy": correct / max(ctx.normaliser, 1.0)}


def scores(predicted: list[int], gold: list[int], n_classes: int) -> dict:
    """Accuracy and macro-F1 (a class absent from both predictions and gold is left out of the mean)."""
    acc = sum(p == g for p, g in zip(predicted, gold)) / max(len(gold), 1)
    f1s = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


@torch.no_grad()
def predict(model, dataset, collate, batch_size: int = 32, device=None) -> tuple[list[list[float]], float]:
    """Class probabilities per row (file order) and the mean cross entropy over the dataset."""
    was = model.training
    model.eval()
    probs, total = [], 0.0
    try:
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            logits = forward_logits(model, batch).float()
            total += F.cross_entropy(logits, batch["class_labels"], reduction="sum").item()
            probs += torch.softmax(logits, -1).tolist()
    finally:
        model.train(was)
    return probs, total / max(len(dataset), 1)


def evaluate(model, dataset, collate, batch_size: int = 32, device=None) -> dict:
    """Held-out loss, accuracy and macro-F1."""
    probs, loss = predict(model, dataset, collate, batch_size, device)
    pred = [max(range(len(p)), key=p.__getitem__) for p in probs]
    gold = [dataset[i]["class_label"] for i in range(len(dataset))]
    return {"loss": loss, **scores(pred, gold, len(dataset.labels))}
