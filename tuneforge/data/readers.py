"""Row readers for JSONL, CSV and Parquet that turn bad rows into problems instead of exceptions.

Every reader yields ``RawRow(line, value, problem)``: exactly one of ``value`` (a dict of fields) and ``problem`` (a
human reason) is set, and ``line`` is where a user should look: the 1-based file line for JSONL and CSV (the first
line of a multi-line CSV record), the 1-based row number for Parquet. Nothing a row contains can make a reader
raise; only whole-file trouble (missing file, unknown extension, unreadable Parquet) raises ``DataError``, because
there is no row to blame.

Files are read as bytes and decoded line by line so that one line of invalid UTF-8 costs one row, not the file.
A UTF-8 byte-order mark and CRLF endings (Windows editors, Excel exports) are accepted silently.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from tuneforge.data.report import DataError

BOM = b"\xef\xbb\xbf"
JSON_LINES_EXTS = (".jsonl", ".json")
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True, slots=True)
class RawRow:
    line: int
    value: dict | None
    problem: str | None = None


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for messages a user reading their JSON will recognise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def read_rows(path: str) -> Iterator[dict]:
    """The file's well-formed rows as plain dicts, silently skipping bad ones: for callers such as ``tuneforge
    eval`` that only need raw fields (e.g. prompts to generate from) and leave validation to ``check_file``."""
    return (row.value for row in iter_raw_rows(path) if row.value is not None)


def iter_raw_rows(path: str) -> Iterator[RawRow]:
    """Yield every non-blank row of ``path`` as a ``RawRow``, choosing the reader by extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {ext or '(none)'!r}; use one of {', '.join(EXTENSIONS)}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if ext in JSON_LINES_EXTS:
        return read_jsonl(path)
    if ext in (".csv", ".tsv"):
        return read_csv(path, tabs=ext == ".tsv")
    return read_parquet(path)


# --- JSON lines ---------------------------------------------------------------------------------------------------


def read_jsonl(path: str) -> Iterator[RawRow]:
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(BOM):
        data = data[len(BOM):]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        value, problem = parse_json_line(raw)
        yield RawRow(lineno, value, problem)


def parse_json_line(raw: bytes) -> tuple[dict | None, str | None]:
    """Decode one line; returns ``(object, None)`` or ``(None, reason)`` and never raises."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 (byte {e.start + 1} of the line)"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} (column {e.colno})"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
        return None, f"invalid JSON: {e}"
    if not isinstance(value, dict):
        hint = " (a .json file must hold one object per line, not one array)" if isinstance(value, list) else ""
        return None, f"expected a JSON object, got {json_type(value)}{hint}"
    return value, None


# --- CSV ----------------------------------------------------------------------------------------------------------


def read_csv(path: str, tabs: bool = False) -> Iterator[RawRow]:
    """Header row = field names; a ``messages`` cell holds the turns as JSON (a cell cannot hold a list).

    ``tabs``: tab-separated values as GLUE ships them (SST-2's ``sentence<TAB>label``): cells are split at tabs
    only, quotes are ordinary characters (GLUE's sentences contain unbalanced ones), and a row with more or fewer
    cells than the header is reported with its line.

    Bytes that are not UTF-8 are kept as surrogate escapes while parsing, so the CSV state machine stays in step,
    and the record holding them is reported rather than the whole file failing.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(BOM):
        data = data[len(BOM):]
    text = data.decode("utf-8", errors="surrogateescape")
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long documents are legitimate; the default 128 KiB is not a data error
    try:
        # strict: a stray or unterminated quote is reported, instead of silently swallowing the rest of the file
        src = io.StringIO(text, newline="")
        reader = (csv.reader(src, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True) if tabs
                  else csv.reader(src, strict=True))
        yield from _csv_records(reader)
    finally:
        csv.field_size_limit(old_limit)


def _csv_records(reader) -> Iterator[RawRow]:
    header: list[str] | None = None
    end = 0  # last physical line consumed so far
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            end = max(reader.line_num, start)
            yield RawRow(start, None, f"invalid CSV: {e}")
            continue
        end = reader.line_num
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue  # a blank line; a line of empty fields is a row and gets validated
        if header is None:
            header = [c.strip() for c in cells]
            continue
        value, problem = _csv_row(header, cells)
        yield RawRow(start, value, problem)


def _csv_row(header: list[str], cells: list[str]) -> tuple[dict | None, str | None]:
    if len(cells) != len(header):
        return None, f"expected {len(header)} fields (from the header), got {len(cells)}"
    row: dict[str, Any] = {}
    for name, cell in zip(header, cells):
        if _has_surrogates(cell):
            return None, f"{name}: invalid UTF-8"
        row[name] = cell
    if isinstance(row.get("messages"), str):
        try:
            row["messages"] = json.loads(row["messages"])
        except (ValueError, RecursionError) as e:
            return None, f"messages: CSV cell is not valid JSON ({e})"
    return row, None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --- Parquet ------------------------------------------------------------------------------------------------------


def read_parquet(path: str) -> Iterator[RawRow]:
    """Rows in file order; ``line`` is the 1-based row number since Parquet has no lines."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet file ({e})") from e
    return _parquet_rows(path, pf)


def _parquet_rows(path: str, pf) -> Iterator[RawRow]:
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            for value in batch.to_pylist():  # list[dict]: nested columns arrive as lists / dicts
                n += 1
                yield RawRow(n, value)
    except Exception as e:
        raise DataError(f"{path}: cannot read Parquet file after row {n} ({e})") from e
