"""Errors and the per-file report of what the data pipeline kept, cut and threw away.

Data problems are collected rather than raised one at a time: a user fixing a 10,000-row file wants every bad line in
one go, not one per run. ``DataError`` therefore carries the full list of ``(file, line, reason)`` problems and
formats only the first 50 into its message; the rest go to the JSON report when a ``report_path`` is given.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

Problem = tuple[str, "int | None", str]  # (file, 1-based line or None for whole-file problems, reason)

MESSAGE_LIMIT = 50
NO_SUPERVISED = "no supervised tokens after truncation"
TOO_LONG_DROPPED = "too long (truncation=drop)"
SLOTS_CUT = ("left truncation kept a P-tuning template's tokens after the prompt without a prompt token before "
             "them")


def format_problem(problem: Problem) -> str:
    """``file:line: reason``, or ``file: reason`` when the problem has no single line."""
    file, line, reason = problem
    return f"{file}:{line}: {reason}" if line is not None else f"{file}: {reason}"


class DataError(ValueError):
    """A data file cannot be used as asked; ``problems`` lists every offending row, not just the first.

    Subclassing ``ValueError`` keeps ``except ValueError`` callers working; the message is self-contained so a CLI
    can print ``str(err)`` and stop.
    """

    def __init__(self, summary: str, problems: list[Problem] | None = None, *, hint: str | None = None):
        self.summary = summary
        self.problems: list[Problem] = list(problems or [])
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [self.summary]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines.extend("  " + format_problem(p) for p in self.problems[:MESSAGE_LIMIT])
            if len(self.problems) > MESSAGE_LIMIT:
                lines.append(f"  ... and {len(self.problems) - MESSAGE_LIMIT} more")
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


@dataclass
class DataReport:
    """What happened to every row of one file; ``summary()`` is what ``tuneforge data check`` prints.

    ``exceeded`` counts rows longer than ``max_len`` before truncation (whatever was then done to them), so the
    summary can say up front how much of the data the length limit touched.
    """

    path: str
    format: str
    total_rows: int = 0
    bad_rows: list[Problem] = field(default_factory=list)
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    used_rows: int = 0
    max_len: int = 0
    truncation: str = "right"
    exceeded: int = 0
    supervised_tokens: int = 0
    total_tokens: int = 0
    tokenized: bool = False  # False for a schema-only check (no tokenizer): lengths were not measured

    @property
    def ok(self) -> bool:
        """True when the file would train as-is: no bad rows and at least one usable row."""
        return not self.bad_rows and self.used_rows > 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def length_line(self) -> str:
        if not self.tokenized:
            return f"lengths not checked against max_len={self.max_len} (no tokenizer given)"
        action = {
            "right": f"cut at the end to {self.max_len} tokens",
            "left": f"cut at the start to {self.max_len} tokens",
            "drop": "dropped",
            "error": "rejected (truncation=error)",
        }.get(self.truncation, self.truncation)
        return f"{self.exceeded} row(s) exceeded max_len={self.max_len} and were {action}"

    def summary(self) -> str:
        lines = [
            f"{self.path} ({self.format}): {self.used_rows} of {self.total_rows} rows usable",
            self.length_line(),
        ]
        if self.bad_rows:
            lines.append(f"{len(self.bad_rows)} bad row(s):")
            lines.extend("  " + format_problem(p) for p in self.bad_rows[:MESSAGE_LIMIT])
            if len(self.bad_rows) > MESSAGE_LIMIT:
                lines.append(f"  ... and {len(self.bad_rows) - MESSAGE_LIMIT} more")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"dropped {n} row(s): {reason}")
        if self.total_tokens:
            share = self.supervised_tokens / self.total_tokens
            lines.append(f"{self.total_tokens} tokens, {self.supervised_tokens} supervised ({share:.1%})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["bad_rows"] = [{"file": f, "line": ln, "reason": r} for f, ln, r in self.bad_rows]
        out["ok"] = self.ok
        return out

    def write(self, report_path: str) -> None:
        """Write the full report (every bad row, not just the first 50) as JSON."""
        parent = os.path.dirname(os.path.abspath(report_path))
        os.makedirs(parent, exist_ok=True)
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def render_sample(row: dict, tokenizer) -> str:
    """One tokenized row as the model sees it, with the tokens that carry loss wrapped in ``[[...]]``.

    This is the fastest way to catch a chat template, special-token or masking mistake before training
    (``--show-sample`` on ``tuneforge data check`` and ``tuneforge validate``). A P-tuning template's virtual
    token j after the prompt shows as ``<Pj>``.
    """
    from tuneforge.data.template import SLOT_BASE

    ids, labels = row["input_ids"], row["labels"]
    out, run, supervised = [], [], False
    for i, tok_id in enumerate(ids):
        sup = labels[i] != -100 and i > 0
        if (sup != supervised or tok_id >= SLOT_BASE) and run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"[[{text}]]" if supervised else text)
            run = []
        supervised = sup
        if tok_id >= SLOT_BASE:  # a P-tuning template's virtual token after the prompt
            out.append(f"<P{tok_id - SLOT_BASE}>")
            continue
        run.append(tok_id)
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        out.append(f"[[{text}]]" if supervised else text)
    n_sup = sum(1 for x in labels[1:] if x != -100)
    return f"{''.join(out)}\n({len(ids)} tokens, {n_sup} with loss, shown in [[...]])"
