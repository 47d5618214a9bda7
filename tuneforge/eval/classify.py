"""``tuneforge classify`` and classification ``eval``: a trained classifier's predictions on texts or a file.

A file's rows are read as training rows are (``data/classification.py``: ``text``/``sentence`` or a pair, JSONL/CSV/
TSV/Parquet); the label column is optional here. When every row has one, the predictions are scored (accuracy,
macro-F1, loss) against the model's own label set, and a label outside it is an error naming the file and line.
"""

from __future__ import annotations

import torch

from tuneforge.algorithms.classification import evaluate, forward_logits
from tuneforge.data.classification import (LABEL, RowProblem, build_classification_dataset, collate_classification,
                                           has_pair_template, parse_row)
from tuneforge.data.readers import iter_raw_rows
from tuneforge.data.report import DataError
from tuneforge.methods._soft_prompt import input_budget
from tuneforge.models.labels import model_labels


PLACEHOLDERS = (None, -1, "-1", "")  # what an unlabelled split holds in its label column (GLUE test files: -1)


def is_classifier(model) -> bool:
    """A sequence classifier with at least two classes (a one-label score head is a reward model)."""
    return type(model).__name__.endswith("ForSequenceClassification") and len(model_labels(model)) >= 2


@torch.no_grad()
def classify_texts(model, tok, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32,
                   max_len: int = 512) -> list[dict]:
    """``{"label", "probs": {name: p}}`` per text (or pair)."""
    names = model_labels(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    max_len = input_budget(model, max_len)
    if pairs is not None and any(b is not None for b in pairs) and not has_pair_template(tok):
        raise DataError(f"sentence pairs need a tokenizer with a pair template (a separator between the texts), and "
                        f"{type(tok).__name__} has none; join the texts into one")
    out = []
    for i in range(0, len(texts), batch_size):
        a = texts[i:i + batch_size]
        b = pairs[i:i + batch_size] if pairs is not None else [None] * len(a)
        rows = []
        for x, y in zip(a, b):
            enc = tok(x, y, truncation=True, max_length=max_len)
            row = {"input_ids": enc["input_ids"], "class_label": 0}
            if "token_type_ids" in enc:
                row["token_type_ids"] = enc["token_type_ids"]
            rows.append(row)
        batch = {k: v.to(next(model.parameters()).device) for k, v in collate_classification(rows, pad).items()}
        probs = torch.softmax(forward_logits(model, batch).float(), -1).tolist()
        out += [{"label": names[max(range(len(p)), key=p.__getitem__)],
                 "probs": {n: round(q, 6) for n, q in zip(names, p)}} for p in probs]
    return out


def classify_file(model, tok, path: str, batch_size: int = 32, max_len: int = 512) -> tuple[list[dict], dict | None]:
    """Predictions for every row of ``path`` (file order, each with its ``line``) and, when every row is labelled
    with one of the model's classes, the metrics against those labels. A label column of placeholders (a test
    split's -1 or null) only means there is nothing to score."""
    rows, problems, labelled = [], [], True
    for raw in iter_raw_rows(path):
        if raw.problem is not None:
            problems.append((path, raw.line, raw.problem))
            continue
        labelled &= raw.value.get(LABEL) not in PLACEHOLDERS  # (a real label outside the set is an error below)
        value = {**raw.value, LABEL: "?"}
        try:
            a, b, _ = parse_row(value)
        except RowProblem as e:
            problems.append((path, raw.line, str(e)))
            continue
        rows.append((raw.line, a, b))
    if problems:
        raise DataError(f"{path}: {len(problems)} bad row(s)", problems)
    if not rows:
        raise DataError(f"{path}: no rows to classify")
    max_len = input_budget(model, max_len)
    pairs = [r[2] for r in rows] if any(r[2] is not None for r in rows) else None
    preds = classify_texts(model, tok, [r[1] for r in rows], pairs, batch_size, max_len)
    preds = [{"line": line, **p} for (line, _, _), p in zip(rows, preds)]
    if not labelled:
        return preds, None
    ds = build_classification_dataset(path, tok, labels=model_labels(model), max_len=max_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return preds, evaluate(model, ds, lambda r: collate_classification(r, pad), batch_size,
                           next(model.parameters()).device)
