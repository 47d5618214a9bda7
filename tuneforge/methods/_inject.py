"""Find the modules a method targets and swap them in place.

Target names follow PEFT's convention so recipes carry over: a name matches a module whose dotted path equals it or
ends with ``.<name>``; a string starting with ``re:`` is a regular expression matched against the full path. Unlike
PEFT (peft#1959), *every* name must match something: a typo in one of seven names is an error that lists the
unmatched names and the closest real module names, not a silently smaller adapter.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from tuneforge.models import arch


class TargetError(ValueError):
    """A target module name that matches nothing, or a target of a type the method cannot wrap."""


def _matches(path: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], path) is not None
    return path == target or path.endswith("." + target)


def logical_path(model: nn.Module, path: str) -> str:
    """``path`` without the ``base`` segments of layers that wrap a block or sub-layer (bottleneck adapters): a
    parallel adapter around ``mlp`` moves ``mlp.down_proj`` to ``mlp.base.down_proj``, and a later method's target
    ``mlp.down_proj`` still means it."""
    parts, keep, module = path.split("."), [], model
    for part in parts:
        wraps_around = getattr(module, "is_adapter_layer", False) and not getattr(module, "wraps_linear", True)
        if not (part == "base" and wraps_around):
            keep.append(part)
        module = getattr(module, part, None) if module is not None else None
    return ".".join(keep)


def find_targets(model: nn.Module, targets: list[str], candidates: dict[str, nn.Module] | None = None,
                 exclude: list[str] | None = None) -> dict[str, nn.Module]:
    """Modules among ``candidates`` (default: every linear layer but the output head) matched by ``targets``
    (against their ``logical_path``)."""
    candidates = arch.linear_modules(model) if candidates is None else candidates
    exclude = exclude or []
    found: dict[str, nn.Module] = {}
    unmatched = []
    names: dict[str, str] = {}
    for p in sorted(candidates, key=lambda q: q.count(".")):  # a wrapper and the module it wraps name one place:
        name = logical_path(model, p)  # the outermost stands for it
        if name not in names:
            names[name] = p
    names = {p: name for name, p in names.items()}
    candidates = {p: m for p, m in candidates.items() if p in names}
    for t in targets:
        hits = {p: m for p, m in candidates.items()
                if _matches(names[p], t) and not any(_matches(names[p], e) for e in exclude)}
        if not hits:
            unmatched.append(t)
        found.update(hits)
    if unmatched:
        raise TargetError(_unmatched_message(model, unmatched, candidates))
    return found


def _unmatched_message(model: nn.Module, unmatched: list[str], candidates: dict[str, nn.Module]) -> str:
    leaves = sorted({p.rsplit(".", 1)[-1] for p in candidates})
    lines = [f"target module(s) {', '.join(map(repr, unmatched))} match no layer of this "
             f"{type(model).__name__}."]
    for t in unmatched:
        close = difflib.get_close_matches(t.removeprefix("re:"), leaves, n=10, cutoff=0.3)
        if close:
            lines.append(f"  closest to {t!r}: {', '.join(close)}")
    lines.append(f"  layer names this model has: {', '.join(leaves[:40])}")
    return "\n".join(lines)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    # the new module takes the mode of the one it replaces: a layer added to a model in eval mode must not run
    # its dropout (or AdapterDrop's training k) until the model is put in training mode
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)


def copy_checked(expected: dict, tensors: dict, what: str, hint: str = "in the model") -> None:
    """Copy a file's ``tensors`` into a method's ``expected`` ones (same keys, same shapes), or say what differs."""
    import torch

    if set(expected) != set(tensors):
        raise KeyError(f"{what} weights do not fit this model: missing {sorted(set(expected) - set(tensors))[:4]}, "
                       f"unexpected {sorted(set(tensors) - set(expected))[:4]}")
    with torch.no_grad():
        for key, target in expected.items():
            if target.shape != tensors[key].shape:
                raise ValueError(f"{key}: shape {tuple(tensors[key].shape)} in the file, {tuple(target.shape)} {hint}")
            target.copy_(tensors[key])


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting shared (tied) tensors once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
