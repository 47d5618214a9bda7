"""Classification rows: a text (or a sentence pair) and its label.

Accepted rows, in JSONL, CSV, TSV (GLUE's format: SST-2 is ``sentence<TAB>label``) or Parquet:

* ``{"text": ..., "label": ...}`` (``sentence`` is read as ``text``);
* ``{"text_a": ..., "text_b": ..., "label": ...}`` for a sentence pair (``sentence1``/``sentence2`` likewise),
  joined by the tokenizer's own pair template (BERT's ``[CLS] a [SEP] b [SEP]`` with segment ids), so the model sees
  pairs as it was pre-trained to.

**Labels are names.** A label may be a string or an integer; both are kept as the string the user wrote (``1`` and
``"1"`` are one class), so TSV and JSONL files of one task agree. The label set is the run's ``algorithm.labels``
when given, else every label of the training file, sorted (numerically when all are integers: SST-2's 0 = negative
stays class 0). It is saved with the model (``id2label``), and every other file (held-out, ``tuneforge eval``) is
mapped through it: a label outside the set is an error naming the file, line and field, not a silent new class.

A row is tokenized once: ``input_ids`` (and ``token_type_ids`` where the tokenizer makes them) and its class index
``class_label``. A text longer than ``max_len`` is cut at its end (``truncation: right``; for a pair, the longer text
first, as ``transformers`` does), dropped, or refused (``error``).
"""

from __future__ import annotations

import random
from typing import Any

from tuneforge.data.dataset import TokenizedDataset
from tuneforge.data.readers import iter_raw_rows, json_type
from tuneforge.data.report import TOO_LONG_DROPPED, DataError, DataReport

FORMAT = "classification"
TEXT_KEYS = ("text", "sentence")
PAIR_KEYS = (("text_a", "text_b"), ("sentence1", "sentence2"))
LABEL = "label"


class RowProblem(ValueError):
    """One row is unusable; the message names the field."""


def is_classification_row(value: dict) -> bool:
    """A row with a ``label`` and a text (or pair) field: what ``auto`` detection calls classification."""
    return LABEL in value and (any(k in value for k in TEXT_KEYS) or any(a in value for a, _ in PAIR_KEYS))


def label_name(value: Any) -> str:
    """The class a label cell names: integers (and integral floats, as CSV/Parquet may give) as their digits,
    strings stripped."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise RowProblem(f"{LABEL}: expected a string or an integer, got {json_type(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise RowProblem(f"{LABEL}: {value!r} is not a class name (use an integer or a string)")
        value = int(value)
    name = str(value).strip()
    if not name:
        raise RowProblem(f"{LABEL}: empty")
    return name


def parse_row(value: dict) -> tuple[str, str | None, str]:
    """``(text_a, text_b or None, label name)`` of a row, or ``RowProblem`` naming the field."""
    if LABEL not in value:
        raise RowProblem(f"{LABEL}: missing (classification rows need a label column)")
    pair = next(((a, b) for a, b in PAIR_KEYS if a in value or b in value), None)
    if pair is not None:
        texts = [_text(value, k) for k in pair]
        return texts[0], texts[1], label_name(value[LABEL])
    key = next((k for k in TEXT_KEYS if k in value), None)
    if key is None:
        raise RowProblem(f"text: missing (expected {' or '.join(TEXT_KEYS)}, or a pair "
                         f"{' / '.join('+'.join(p) for p in PAIR_KEYS)})")
    return _text(value, key), None, label_name(value[LABEL])


def _text(value: dict, key: str) -> str:
    if key not in value:
        raise RowProblem(f"{key}: missing (a sentence pair needs both texts)")
    text = value[key]
    if not isinstance(text, str):
        raise RowProblem(f"{key}: expected a string, got {json_type(text)}")
    if not text.strip():
        raise RowProblem(f"{key}: empty")
    return text


def sorted_labels(names) -> list[str]:
    """Numerically when every name is an integer (``2`` before ``10``), else alphabetically."""
    names = set(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def has_pair_template(tokenizer) -> bool:
    """Whether the tokenizer marks where the second text of a pair starts (separator or segment ids): without it
    a pair would be one run-on text."""
    both = tokenizer("a", "b", add_special_tokens=True)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"] + tokenizer("b", add_special_tokens=False)["input_ids"]
    return both["input_ids"] != plain or len(set(both.get("token_type_ids") or [0])) > 1


class ClassificationDataset(TokenizedDataset):
    """Rows ``{"input_ids", ["token_type_ids",] "class_label", "row_id", "line"}``; ``labels`` the class names
    (index = class id). Each row weighs one in a step's normaliser."""

    def __init__(self, rows: list[dict], report: DataReport, path: str, labels: list[str]):
        super().__init__(rows, report, path)
        self.labels = labels

    def n_supervised(self, i: int) -> int:
        return 1

    def split(self, fraction: float, seed: int = 0) -> tuple["ClassificationDataset", "ClassificationDataset"]:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"split fraction must be in (0, 1), got {fraction!r}")
        n = len(self.rows)
        if n < 2:
            raise DataError(f"{self.path}: cannot hold out an eval split from {n} usable row(s)")
        held = set(random.Random(seed).sample(range(n), min(n - 1, max(1, round(n * fraction)))))
        parts = ([r for i, r in enumerate(self.rows) if i not in held], [r for i, r in enumerate(self.rows) if i in held])
        return tuple(ClassificationDataset(p, self.report, self.path, self.labels) for p in parts)

    def __repr__(self) -> str:
        return f"ClassificationDataset({self.path!r}, rows={len(self.rows)}, labels={self.labels})"


def read_labels(path: str) -> list[str]:
    """The sorted label names of a file's well-formed rows (the label set of a training file)."""
    names = set()
    for raw in iter_raw_rows(path):
        if raw.value is not None:
            try:
                names.add(parse_row(raw.value)[2])
            except RowProblem:
                continue
    return sorted_labels(names)


def build_classification_dataset(path: str, tokenizer, labels: list[str] | None = None, *, max_len: int = 512,
                                 truncation: str = "right", skip_bad_rows: bool = False,
                                 report_path: str | None = None) -> ClassificationDataset:
    """Read, validate and tokenize a classification file; every bad row is listed in one ``DataError``.

    ``labels``: the class names to map through (a held-out file is mapped through the training file's set);
    None takes the file's own sorted set."""
    if truncation not in ("right", "drop", "error"):
        raise DataError(f"{path}: truncation={truncation!r} does not apply to classification rows; use right "
                        "(cut each text at its end), drop or error")
    raw = list(iter_raw_rows(path))
    report = DataReport(path=path, format=FORMAT, max_len=max_len, truncation=truncation, total_rows=len(raw))
    parsed = []
    for row_id, r in enumerate(raw):
        if r.problem is not None:
            report.bad_rows.append((path, r.line, r.problem))
            continue
        try:
            parsed.append((row_id, r.line, *parse_row(r.value)))
        except RowProblem as e:
            report.bad_rows.append((path, r.line, str(e)))
    if not raw:
        raise DataError(f"{path}: the file has no rows")
    labels = list(labels) if labels is not None else sorted_labels(p[4] for p in parsed)
    index = {name: i for i, name in enumerate(labels)}
    if any(p[3] is not None for p in parsed) and not has_pair_template(tokenizer):
        line = next(p[1] for p in parsed if p[3] is not None)
        raise DataError(f"{path}:{line}: text_b: sentence pairs need a tokenizer with a pair template (a separator "
                        f"between the texts), and {type(tokenizer).__name__} has none; join the texts into one "
                        "text field, or use an encoder's tokenizer (BERT, RoBERTa)")
    rows, too_long = [], []
    for row_id, line, a, b, name in parsed:
        if name not in index:
            report.bad_rows.append((path, line, f"{LABEL}: {name!r} is not one of the run's labels "
                                                f"({', '.join(labels)})"))
            continue
        enc = tokenizer(a, b, truncation=False, add_special_tokens=True)
        if len(enc["input_ids"]) > max_len:
            report.exceeded += 1
            if truncation == "error":
                too_long.append((path, line, f"{len(enc['input_ids'])} tokens > max_len={max_len}"))
                continue
            if truncation == "drop":
                report.dropped[TOO_LONG_DROPPED] = report.dropped.get(TOO_LONG_DROPPED, 0) + 1
                continue
            enc = tokenizer(a, b, truncation=True, max_length=max_len, add_special_tokens=True)
            report.truncated += 1
        row = {"input_ids": list(enc["input_ids"]), "class_label": index[name], "row_id": row_id, "line": line}
        if "token_type_ids" in enc:
            row["token_type_ids"] = list(enc["token_type_ids"])
        rows.append(row)
        report.total_tokens += len(row["input_ids"])
    report.tokenized = True
    report.used_rows = len(rows)
    report.supervised_tokens = len(rows)
    try:
        if report.bad_rows and not skip_bad_rows:
            raise DataError(f"{path}: {len(report.bad_rows)} bad row(s)", report.bad_rows,
                            hint="Fix them, or set data.skip_bad_rows: true to train without them.")
        if too_long:
            raise DataError(f"{path}: {len(too_long)} row(s) are longer than max_len={max_len} (truncation='error')",
                            too_long, hint="Raise max_len, or choose truncation right|drop.")
        if not rows:
            raise DataError(f"{path}: no usable rows left")
    finally:
        if report_path:
            report.write(report_path)
    return ClassificationDataset(rows, report, path, labels)


def collate_classification(rows: list[dict], pad_id: int) -> dict:
    """Right-padded ``input_ids``/``attention_mask`` (and ``token_type_ids``, padded with 0) and ``class_labels``."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long) if "token_type_ids" in rows[0] else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        if types is not None:
            types[i, :n] = torch.tensor(r["token_type_ids"])
    out = {"input_ids": ids, "attention_mask": mask,
           "class_labels": torch.tensor([r["class_label"] for r in rows], dtype=torch.long)}
    if types is not None:
        out["token_type_ids"] = types
    return out
