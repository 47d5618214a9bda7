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
    from tuneforge.methods import AdapterError

    try:
        labels = json.loads(file.read_text(encoding="utf-8"))["labels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{file}: unreadable ({exc}); it should hold {{\"labels\": [\"name\", ...]}}") from None
    if not isinstance(labels, list) or len(labels) < 2:
        raise AdapterError(f"{file}: 'labels' must be a list of at least two class names")
    return [str(x) for x in labels]


def adapter_labels(directory: str | Path) -> list[str] | None:
    """The classes of a classification adapter: ``labels.json``, else (a PEFT ``SEQ_CLS`` adapter, which keeps no
    names) ``LABEL_0 ... LABEL_{K-1}`` with K the rows of its saved head, as ``transformers`` names unnamed classes;
    None for an adapter without a classification head."""
    named = read_labels(directory)
    if named is not None:
        return named
    cfg_file = Path(directory) / "adapter_config.json"
    weights = Path(directory) / "adapter_model.safetensors"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if cfg.get("task_type") != "SEQ_CLS" or not weights.is_file():
        return None
    from safetensors import safe_open

    heads = cfg.get("modules_to_save") or []
    with safe_open(str(weights), "pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys()
                if any(k.endswith(f".{h}.weight") or k.endswith(f".{h}.out_proj.weight") for h in heads)]
    return [f"LABEL_{i}" for i in range(min(rows))] if rows else None
