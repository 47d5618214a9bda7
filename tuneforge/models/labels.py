"""A classifier's class names beside its adapter: ``labels.json`` = ``{"labels": [name of class 0, ...]}``.

A full fine-tune keeps them where ``transformers`` does (``config.json``'s ``id2label``); an adapter directory has no
model config, so they go in this small file, which PEFT ignores. Loading an adapter onto its base model needs them
first: the head it restores must be built with the same number of classes.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "labels.json"


def model_labels(model) -> list[str]:
    """Class names of a sequence classifier, in class-id order."""
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(int(k) for k in id2label)] if id2label else []


def save_labels(model, directory: str | Path) -> None:
    from tuneforge.safeio import atomic_write_text

    atomic_write_text(Path(directory) / FILE, json.dumps({"labels": model_labels(model)}, indent=2) + "\n")


def read_labels(directory: str | Path) -> list[str] | None:
    """The labels saved beside an adapter (None when the directory has none)."""
    file = Path(directory) / FILE
    if not file.exists():
        return None
    try:
        labels = json.loads(file.read_text(encoding="utf-8"))["labels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: unreadable ({exc}); it should hold {{\"labels\": [\"name\", ...]}}") from None
    if not isinstance(labels, list) or len(labels) < 2:
        raise ValueError(f"{file}: 'labels' must be a list of at least two class names")
    return [str(x) for x in labels]
