"""``build_dataset`` and ``check_file``: one file in, every row accounted for, tokenized rows out.

The pipeline is read -> detect format -> validate every row -> tokenize -> truncate. Every row that does not make it
to the end is either a *bad row* (its content is wrong: reported with file:line and, unless ``skip_bad_rows``, fatal)
or a *dropped row* (it is fine but unusable under the current settings, e.g. too long with ``truncation="drop"``:
counted by reason). Problems are collected over the whole file before raising so one run shows all of them, and
everything is decided before training starts: an empty result is an error here, not a crash at step 0.
"""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

from tuneforge.data.collate import preference_responses
from tuneforge.data.readers import RawRow, iter_raw_rows
from tuneforge.data.report import NO_SUPERVISED, SLOTS_CUT, TOO_LONG_DROPPED, DataError, DataReport, Problem
from tuneforge.data.schema import FORMATS, RowError, detect_format, validate
from tuneforge.data.tokenize import (IGNORE, TRUNCATIONS, Encoder, SlotsCut, n_supervised, response_labels, truncate,
                                     truncate_shared)

log = logging.getLogger("tuneforge")

NO_SUPERVISED_WARN_FRACTION = 0.05
SKIP_HINT = "Fix these rows, or set skip_bad_rows=True (config: data.skip_bad_rows: true) to drop and report them."


class TokenizedDataset:
    """In-memory, list-backed dataset of rows ``{"input_ids", "labels", "row_id", "line"}`` (labels UNshifted).

    A preference row is one pair (``rejected_input_ids`` / ``rejected_labels`` beside the chosen ones) or one whole
    ranking (``ranking_input_ids`` / ``ranking_labels``: its K responses best first); ``collate_preference`` batches
    both.

    ``row_id`` is the 0-based index of the row among the file's non-blank rows and ``line`` where it sits in the
    file, so any training-time anomaly can be traced back to its source row. A messages row also keeps
    ``prompt_messages``, the turns before its last assistant turn (the prompt online algorithms sample from), so a
    reward model can encode that conversation itself; a row cut at its end (right truncation) has none, as its last
    supervised span may then be an earlier turn.
    """

    def __init__(self, rows: list[dict], report: DataReport, path: str):
        self.rows = rows
        self.report = report
        self.path = path

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def n_supervised(self, i: int) -> int:
        """Tokens of row ``i`` that carry loss: count of ``labels[1:] != -100``."""
        return n_supervised(self.rows[i]["labels"])

    def lengths(self) -> list[int]:
        return [len(r["input_ids"]) for r in self.rows]

    def split(self, fraction: float, seed: int = 0) -> tuple["TokenizedDataset", "TokenizedDataset"]:
        """Hold out ``fraction`` of the rows (seeded, file order kept within each part) as an eval set.

        At least one row goes to each side, so a small fraction of a small file still yields an eval set; both parts
        share this dataset's report, which describes the file they came from.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"split fraction must be in (0, 1), got {fraction!r}")
        n = len(self.rows)
        if n < 2:
            raise DataError(f"{self.path}: cannot hold out an eval split from {n} usable row(s)")
        n_eval = min(n - 1, max(1, round(n * fraction)))
        held = set(random.Random(seed).sample(range(n), n_eval))
        train = [r for i, r in enumerate(self.rows) if i not in held]
        evals = [r for i, r in enumerate(self.rows) if i in held]
        return TokenizedDataset(train, self.report, self.path), TokenizedDataset(evals, self.report, self.path)

    def __repr__(self) -> str:
        return f"TokenizedDataset({self.path!r}, rows={len(self.rows)}, format={self.report.format!r})"


@dataclass
class _Scan:
    """Working state of one pass over a file."""

    report: DataReport
    fmt: str | None = None
    detected_line: int | None = None
    good: list[tuple[int, int, Any]] = field(default_factory=list)  # (row_id, line, payload)
    too_long: list[Problem] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def build_dataset(
    path: str,
    tokenizer,
    *,
    format: str = "auto",
    max_len: int = 512,
    truncation: str = "right",
    skip_bad_rows: bool = False,
    report_path: str | None = None,
    template=None,
) -> TokenizedDataset:
    """Read, validate and tokenize ``path``; raise ``DataError`` listing every problem before training can start.

    ``template``: a P-tuning ``PromptTemplate`` whose virtual tokens after the prompt get slot ids in every row
    (``data/template.py``); the model that reads the rows must carry that adapter.

    Raises when: the file is empty; any row is bad and ``skip_bad_rows`` is False; any row exceeds ``max_len`` with
    ``truncation="error"``; or nothing is left after filtering. The JSON report (all problems, not just the 50 in
    the message) is written to ``report_path`` whenever one is given, including on those errors.
    """
    _check_args(format, max_len, truncation)
    _warn_pad_is_eos(tokenizer)
    scan = _read_and_validate(path, format, max_len, truncation)
    try:
        _fail_if_empty(scan, path)
        encoder = Encoder(tokenizer, scan.fmt, path, template) if scan.fmt else None  # no chat template: say so first
        _fail_on_bad_rows(scan, path, skip_bad_rows)
        if encoder is not None:
            _tokenize_all(scan, encoder, max_len, truncation)
        _fail_on_bad_rows(scan, path, skip_bad_rows)  # rows the chat template rejected
        if scan.too_long:
            raise DataError(
                f"{path}: {len(scan.too_long)} row(s) are longer than max_len={max_len} (truncation='error')",
                scan.too_long,
                hint="Raise max_len, or choose truncation right|left|drop.",
            )
        _fail_if_nothing_left(scan, path)
    finally:
        if report_path:
            scan.report.write(report_path)
    _warn_unsupervised(scan.report)
    return TokenizedDataset(scan.rows, scan.report, path)


def check_file(
    path: str,
    tokenizer=None,
    *,
    format: str = "auto",
    max_len: int = 512,
    truncation: str = "right",
    report_path: str | None = None,
    template=None,
) -> DataReport:
    """Validate every row of ``path`` and return the report; writes nothing except ``report_path``.

    Unlike ``build_dataset`` no row can make this raise: bad rows, over-long rows under ``truncation="error"`` and an
    empty result all end up in the report (``report.ok`` is False). Only whole-file problems raise ``DataError``
    (missing file, unknown extension, unreadable Parquet, messages without a chat template, a chat template that is
    not prefix-stable). Without a tokenizer only the schema is checked.
    """
    _check_args(format, max_len, truncation)
    scan = _read_and_validate(path, format, max_len, truncation)
    if tokenizer is not None and scan.fmt:
        _tokenize_all(scan, Encoder(tokenizer, scan.fmt, path, template), max_len, truncation)
        scan.report.bad_rows.extend(scan.too_long)
        scan.report.bad_rows.sort(key=lambda p: (p[1] is None, p[1] or 0))
    elif tokenizer is None:
        scan.report.used_rows = len(scan.good)
    if report_path:
        scan.report.write(report_path)
    return scan.report


# --- steps --------------------------------------------------------------------------------------------------------


def _check_args(fmt: str, max_len: int, truncation: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (one token to condition on, one to predict), got {max_len!r}")


def _read_and_validate(path: str, fmt: str, max_len: int, truncation: str) -> _Scan:
    raw = list(iter_raw_rows(path))
    scan = _Scan(DataReport(path=path, format=fmt, max_len=max_len, truncation=truncation, total_rows=len(raw)))
    scan.fmt, scan.detected_line = _choose_format(raw, fmt)
    scan.report.format = scan.fmt or "unknown"
    for row_id, row in enumerate(raw):
        if row.problem is not None:
            scan.report.bad_rows.append((path, row.line, row.problem))
            continue
        try:
            scan.good.append((row_id, row.line, _payload(row.value, scan.fmt)))
        except RowError as e:
            scan.report.bad_rows.append((path, row.line, str(e)))
    return scan


def _choose_format(raw: list[RawRow], fmt: str) -> tuple[str | None, int | None]:
    """Explicit formats win; ``auto`` takes the first row whose keys identify one (a per-file decision, so that one
    odd row is reported as bad rather than silently trained in a different format)."""
    if fmt != "auto":
        return fmt, None
    for row in raw:
        if row.value is not None and (found := detect_format(row.value)) is not None:
            return found, row.line
    return None, None


def _payload(value: dict, fmt: str | None) -> Any:
    if fmt is None:
        keys = ", ".join(sorted(map(str, value))[:8]) or "none"
        raise RowError(f"no known fields: expected messages, prompt+completion or text (found keys: {keys})")
    return validate(value, fmt)


def _tokenize_all(scan: _Scan, encoder: Encoder, max_len: int, truncation: str) -> None:
    report, path = scan.report, encoder.path
    report.tokenized = True
    for row_id, line, payload in scan.good:
        if encoder.fmt == "preference":  # a pair or a whole ranking: one row, its prompt shared by every response
            try:
                head, tails = encoder.encode_responses(*payload)
            except RowError as e:
                report.bad_rows.append((path, line, str(e)))
                continue
            row = _fit_shared(scan, path, line, head, tails, max_len, truncation, encoder.keep(head))
        else:
            try:
                ids, labels = encoder.encode(payload, line)
            except RowError as e:
                report.bad_rows.append((path, line, str(e)))
                continue
            row = _fit(scan, path, line, ids, labels, max_len, truncation, encoder.keep(ids))
            if row is not None and encoder.fmt == "messages" and not (truncation == "right" and len(ids) > max_len):
                last = max((i for i, t in enumerate(payload) if t["role"] == "assistant"), default=None)
                if last is not None:
                    row["prompt_messages"] = payload[:last]
        if row is None:
            continue
        row["row_id"] = row_id
        scan.rows.append(row)
        seqs = preference_responses(row) if encoder.fmt == "preference" else [(row["input_ids"], row["labels"])]
        for ids, labels in seqs:
            report.total_tokens += len(ids)
            report.supervised_tokens += n_supervised(labels)
    report.used_rows = len(scan.rows)


def _fit(scan: _Scan, path: str, line: int, ids: list[int], labels: list[int], max_len: int, mode: str,
         keep: int = 0):
    """Apply the length policy to one row; returns the row dict or None when it was dropped/rejected (counted)."""
    report = scan.report
    cut = len(ids) > max_len
    if cut:
        report.exceeded += 1
        if mode == "drop":
            report.drop(TOO_LONG_DROPPED)
            return None
        if mode == "error":
            scan.too_long.append((path, line, f"{len(ids)} tokens > max_len={max_len}"))
            return None
        try:
            ids, labels = truncate(ids, labels, max_len, mode, keep)
        except SlotsCut:  # the prompt before a P-tuning template's slots would be cut away
            report.drop(SLOTS_CUT)
            return None
    if n_supervised(labels) == 0:
        report.drop(NO_SUPERVISED if cut else "no supervised tokens")
        return None
    if cut:
        report.truncated += 1
    return {"input_ids": ids, "labels": labels, "line": line}


def _fit_shared(scan: _Scan, path: str, line: int, head: list[int], tails: list[list[int]], max_len: int,
                mode: str, keep: int):
    """The length policy for a preference pair or ranking as one row: the shared prompt is cut once, identically for
    every response (``truncate_shared``). If any response is left nothing to learn (a prompt that fills
    ``max_len`` with right truncation), the whole row is dropped and counted once."""
    report = scan.report
    longest = len(head) + max(len(t) for t in tails)
    cut = longest > max_len
    if cut:
        report.exceeded += 1
        if mode == "drop":
            report.drop(TOO_LONG_DROPPED)
            return None
        if mode == "error":
            scan.too_long.append((path, line, f"{longest} tokens > max_len={max_len}"))
            return None
        try:
            head, tails = truncate_shared(head, tails, max_len, mode, keep)
        except SlotsCut:  # the prompt before a P-tuning template's slots would be cut away
            report.drop(SLOTS_CUT)
            return None
    seqs = [(head + t, [IGNORE] * len(head) + response_labels(t)) for t in tails]
    if any(n_supervised(labels) == 0 for _, labels in seqs):
        report.drop(NO_SUPERVISED if cut else "no supervised tokens")
        return None
    if cut:
        report.truncated += 1
    return _preference_row(seqs, line)


def _preference_row(seqs: list[tuple[list[int], list[int]]], line: int) -> dict:
    """``input_ids`` / ``labels`` are the best response (what eval loss and ``n_supervised`` read); a pair adds
    ``rejected_*``, a ranking of K > 2 lists all K sequences best first in ``ranking_*``."""
    row = {"input_ids": seqs[0][0], "labels": seqs[0][1], "line": line}
    if len(seqs) == 2:
        row.update(rejected_input_ids=seqs[1][0], rejected_labels=seqs[1][1])
    else:
        row.update(ranking_input_ids=[s[0] for s in seqs], ranking_labels=[s[1] for s in seqs])
    return row


# --- failure and warning policy -----------------------------------------------------------------------------------


def _fail_if_empty(scan: _Scan, path: str) -> None:
    if scan.report.total_rows == 0:
        raise DataError(f"{path}: the file has no rows (it is empty or only blank lines)")


def _fail_on_bad_rows(scan: _Scan, path: str, skip: bool) -> None:
    bad = scan.report.bad_rows
    if bad and not skip:
        where = f", detected from line {scan.detected_line}" if scan.detected_line else ""
        raise DataError(
            f"{path}: {len(bad)} of {scan.report.total_rows} rows are bad (format {scan.report.format!r}{where})",
            bad,
            hint=SKIP_HINT,
        )


def _fail_if_nothing_left(scan: _Scan, path: str) -> None:
    report = scan.report
    if report.used_rows:
        return
    parts = [f"{report.total_rows} row(s) read"]
    if report.bad_rows:
        parts.append(f"{len(report.bad_rows)} skipped as bad rows")
    parts += [f"{n} dropped: {reason}" for reason, n in sorted(report.dropped.items())]
    raise DataError(
        f"{path}: no usable rows left ({'; '.join(parts)})",
        report.bad_rows,
        hint=report.length_line() + ". Raise max_len or change truncation if length is the cause.",
    )


def _warn_unsupervised(report: DataReport) -> None:
    n = report.dropped.get(NO_SUPERVISED, 0)
    seen = report.total_rows - len(report.bad_rows)
    if seen and n / seen > NO_SUPERVISED_WARN_FRACTION:
        warnings.warn(
            f"{report.path}: {n} of {seen} rows ({n / seen:.1%}) were dropped because truncation to "
            f"max_len={report.max_len} ({report.truncation}) left them no supervised tokens; consider a larger "
            "max_len or truncation='left'",
            stacklevel=3,
        )
    n = report.dropped.get(SLOTS_CUT, 0)
    if seen and n / seen > NO_SUPERVISED_WARN_FRACTION:
        warnings.warn(
            f"{report.path}: {n} of {seen} rows ({n / seen:.1%}) were dropped because left truncation to "
            f"max_len={report.max_len} cut their prompt away before the P-tuning template's tokens after it; "
            "consider a larger max_len or shorter responses",
            stacklevel=3,
        )


_PAD_IS_EOS_SAID: set[tuple] = set()


def _warn_pad_is_eos(tokenizer) -> None:
    """Say once per tokenizer and process (not once per data file, as a ``UserWarning`` with a source path did)
    that pad == eos is harmless here."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), eos)
    if pad is not None and pad == eos and key not in _PAD_IS_EOS_SAID:
        _PAD_IS_EOS_SAID.add(key)
        log.warning(
            f"note: tokenizer pad_token == eos_token ({tokenizer.eos_token!r}): tuneforge builds labels from its own "
            "loss spans, not from the padding mask, so eos stays supervised and the model still learns to stop. Do "
            "not rebuild labels by masking pad_token_id.")
