"""Reference-answer examples for exact-match evaluation, from prompt/completion rows and chat (``messages``) rows.

A chat row is scored the way it is used: the model is given every turn *before* the last assistant turn, rendered
with the chat template and its generation prompt, and its reply is compared with that last assistant turn. The
answer is never part of what the model sees. A file with no row that can be scored is an error that says which
formats it holds, never an ``exact_match`` over zero rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tuneforge.data.readers import iter_raw_rows
from tuneforge.data.report import DataError
from tuneforge.data.schema import RowError, detect_format, validate


@dataclass(frozen=True)
class Example:
    prompt: str | list[dict]  # text, or the conversation before the answer (messages)
    answer: str
    line: int


def answer_examples(path: str) -> list[Example]:
    """Every row of ``path`` that has a reference answer, in file order."""
    out, kinds = [], Counter()
    for raw in iter_raw_rows(path):
        fmt = detect_format(raw.value) if isinstance(raw.value, dict) else None
        try:
            ex = _example(raw.value, fmt, raw.line) if fmt in ("prompt_completion", "messages") else None
        except RowError:
            ex, fmt = None, "invalid"
        kinds[fmt or "unrecognised"] += 1
        if ex is not None:
            out.append(ex)
    if not out:
        held = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "no rows"
        raise DataError(f"{path}: no row can be scored by exact match (the file holds {held}); it needs "
                        "prompt/completion rows or messages rows whose last assistant turn is the reference answer")
    return out


def _example(value: dict, fmt: str, line: int) -> Example | None:
    payload = validate(value, fmt)
    if fmt == "prompt_completion":
        return Example(payload[0], payload[1], line)
    last = max(i for i, t in enumerate(payload) if t["role"] == "assistant")
    return Example(payload[:last], payload[last]["content"], line)
