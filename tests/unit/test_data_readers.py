"""Readers (JSONL / CSV / Parquet), format detection, per-row schema reasons and the BI-1 bad-rows scenario."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _chartok import char_tokenizer
from tuneforge.data import DataError, build_dataset, check_file
from tuneforge.data import read_rows
from tuneforge.data.readers import iter_raw_rows
from tuneforge.data.schema import RowError, detect_format, validate

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_bytes(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def jsonl(rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n"


# --- JSONL ----------------------------------------------------------------------------------------------------------


def test_jsonl_bom_crlf_blank_lines_and_line_numbers(tmp_path):
    data = b"\xef\xbb\xbf" + b'{"text": "a"}\r\n\r\n   \r\n{"text": "b"}\r\n'
    rows = list(iter_raw_rows(write_bytes(tmp_path, "d.jsonl", data)))
    assert [(r.line, r.value, r.problem) for r in rows] == [(1, {"text": "a"}, None), (4, {"text": "b"}, None)]


def test_jsonl_bad_rows_become_problems_not_exceptions(tmp_path):
    data = b'{"text": "ok"}\n{"text": \n[1, 2]\n"str"\n{"text": "\xff\xfe"}\n' + b"[" * 100_000 + b"\n"
    rows = list(iter_raw_rows(write_bytes(tmp_path, "d.jsonl", data)))
    assert [r.line for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].problem is None
    assert rows[1].problem.startswith("invalid JSON")
    assert "expected a JSON object, got array" in rows[2].problem
    assert "got string" in rows[3].problem
    assert "invalid UTF-8" in rows[4].problem
    assert rows[5].problem.startswith("invalid JSON")  # deep nesting: RecursionError is caught


def test_json_extension_is_read_as_json_lines(tmp_path):
    rows = list(iter_raw_rows(write_bytes(tmp_path, "d.json", jsonl([{"text": "a"}, {"text": "b"}]))))
    assert [r.value["text"] for r in rows] == ["a", "b"]


def test_read_rows_yields_only_well_formed_dicts(tmp_path):
    path = write_bytes(tmp_path, "d.jsonl", jsonl([{"prompt": "p"}, "{bad", "[1]", {"text": 3}]))
    assert list(read_rows(path)) == [{"prompt": "p"}, {"text": 3}]


def test_unknown_extension_and_missing_file_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        iter_raw_rows(write_bytes(tmp_path, "d.txt", b"x"))
    with pytest.raises(DataError, match="no such file"):
        iter_raw_rows(str(tmp_path / "missing.jsonl"))


# --- CSV ------------------------------------------------------------------------------------------------------------


def test_csv_header_multiline_record_and_problems(tmp_path):
    data = (
        b"\xef\xbb\xbfprompt,completion\r\n"  # BOM + CRLF
        b"p1,c1\r\n"
        b'"multi\r\nline",c2\r\n'  # record spans lines 3-4
        b"\r\n"
        b"only-one-field\r\n"  # line 6
        b"p\xff,c\r\n"  # line 7: invalid UTF-8
        b"p8,c8\r\n"
    )
    rows = list(iter_raw_rows(write_bytes(tmp_path, "d.csv", data)))
    assert [r.line for r in rows] == [2, 3, 6, 7, 8]
    assert rows[0].value == {"prompt": "p1", "completion": "c1"}
    assert rows[1].value == {"prompt": "multi\r\nline", "completion": "c2"}
    assert rows[2].problem == "expected 2 fields (from the header), got 1"
    assert rows[3].problem == "prompt: invalid UTF-8"
    assert rows[4].value == {"prompt": "p8", "completion": "c8"}


def test_csv_quoting_errors_cost_one_record(tmp_path):
    data = b'text\n"x"y\nok\n"unterminated\nmore\n'
    rows = list(iter_raw_rows(write_bytes(tmp_path, "d.csv", data)))
    assert [(r.line, r.problem) for r in rows] == [
        (2, "invalid CSV: ',' expected after '\"'"),
        (3, None),
        (4, "invalid CSV: unexpected end of data"),
    ]


def test_csv_messages_cell_is_parsed_as_json(tmp_path):
    cell = json.dumps(CHAT["messages"]).replace('"', '""')
    data = f'messages,id\n"{cell}",1\n"not json",2\n'.encode()
    rows = list(iter_raw_rows(write_bytes(tmp_path, "d.csv", data)))
    assert rows[0].value["messages"] == CHAT["messages"]
    assert rows[1].line == 3 and rows[1].problem.startswith("messages: CSV cell is not valid JSON")


# --- Parquet --------------------------------------------------------------------------------------------------------


def test_parquet_rows_are_numbered_from_one_and_nested_columns_work(tmp_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT, {"messages": None}]), path)
    rows = list(iter_raw_rows(path))
    assert [r.line for r in rows] == [1, 2, 3]
    assert rows[0].value == CHAT
    ds = build_dataset(path, char_tokenizer(), skip_bad_rows=True)
    assert len(ds) == 2 and ds.report.bad_rows == [(path, 3, "messages: expected an array of {role, content} "
                                                   "objects, got null")]


def test_corrupt_parquet_is_a_file_level_error(tmp_path):
    with pytest.raises(DataError, match="cannot read Parquet"):
        iter_raw_rows(write_bytes(tmp_path, "d.parquet", b"PAR1 not really"))


# --- formats and schema reasons -------------------------------------------------------------------------------------


def test_detect_format_priority():
    assert detect_format({"messages": [], "prompt": "", "completion": "", "text": ""}) == "messages"
    assert detect_format({"prompt": "", "completion": "", "text": ""}) == "prompt_completion"
    assert detect_format({"prompt": "", "text": ""}) == "text"
    assert detect_format({"id": 1}) is None


def turns(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize(
    "row, fmt, reason",
    [
        ({"text": 3}, "text", "text: expected a string, got number"),
        ({"txt": "a"}, "text", "text: missing required field"),
        ({"text": "  "}, "text", "text: empty string (nothing to learn from)"),
        ({"prompt": "p", "completion": ""}, "prompt_completion", "completion: empty string"),
        ({"completion": "c"}, "prompt_completion", "prompt: missing required field"),
        ({"text": "a"}, "messages", "messages: missing required field"),
        ({"messages": "hi"}, "messages", "messages: expected an array of {role, content} objects, got string"),
        ({"messages": []}, "messages", "messages: empty array"),
        ({"messages": [5]}, "messages", "messages[0]: expected an object with role and content, got number"),
        (turns(("user", "a"), ("assistant", "b"), ("bot", "c")), "messages",
         "messages[2].role: 'bot' is not one of system, user, assistant"),
        ({"messages": [{"content": "a"}]}, "messages", "messages[0].role: missing required field"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, "messages",
         "messages[0].content: expected a string, got array"),
        ({"messages": [{"role": "user"}]}, "messages", "messages[0].content: missing required field"),
        (turns(("user", "a"), ("assistant", " ")), "messages", "messages[1].content: empty assistant content"),
        (turns(("system", "s"), ("user", "a")), "messages", "messages: no assistant turn"),
        (turns(("assistant", "a")), "messages", "messages[0].role: a conversation cannot start with an assistant"),
        (turns(("user", "a\ud800"), ("assistant", "b")), "messages", "messages[0].content: contains an unpaired"),
    ],
)
def test_schema_reasons_name_the_field(row, fmt, reason):
    with pytest.raises(RowError) as err:
        validate(row, fmt)
    assert str(err.value).startswith(reason)


def test_extra_top_level_and_turn_keys_are_ignored():
    row = {"id": 7, "messages": [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]}
    assert validate(row, "messages") == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_auto_format_is_per_file_from_first_recognised_row(tmp_path):
    path = write_bytes(tmp_path, "d.jsonl", jsonl(["{bad", {"id": 1}, {"prompt": "p", "completion": "c"}, CHAT]))
    report = check_file(path)
    assert report.format == "prompt_completion"
    fields = [(ln, r.split(":")[0]) for _, ln, r in report.bad_rows]
    assert fields == [(1, "invalid JSON"), (2, "prompt"), (4, "prompt")]


# --- BI-1: many bad rows --------------------------------------------------------------------------------------------

MALFORMED = [
    b'{"messages": [{"role": "user", "content": "hi"}',  # bad JSON
    b'{"text_only": "no messages here"}',  # missing messages
    b'{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',  # wrong role
    b'{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "yo"}]}',  # non-string content
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',  # empty assistant
    b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}',  # bad UTF-8
]


def bi1_file(tmp_path) -> tuple[str, list[int]]:
    """10,000 rows with BOM + CRLF; 1,000 malformed rows of six kinds at random positions."""
    rng = random.Random(1)
    bad_at = set(rng.sample(range(10_000), 1_000))
    lines = []
    for i in range(10_000):
        if i in bad_at:
            lines.append(MALFORMED[i % len(MALFORMED)])
        else:
            row = turns(("user", f"question {i}"), ("assistant", f"answer {i}"))
            lines.append(json.dumps(row).encode())
    path = write_bytes(tmp_path, "bi1.jsonl", b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    return path, sorted(i + 1 for i in bad_at)


def test_bi1_every_bad_row_is_listed_then_skipped(tmp_path):
    path, bad_lines = bi1_file(tmp_path)
    tok = char_tokenizer()
    report_path = tmp_path / "report.json"
    with pytest.raises(DataError) as err:
        build_dataset(path, tok, max_len=64, report_path=str(report_path))
    assert [ln for _, ln, _ in err.value.problems] == bad_lines
    message = str(err.value)
    assert f"{path}:{bad_lines[0]}: " in message and f"{path}:{bad_lines[49]}: " in message
    assert f"{path}:{bad_lines[50]}: " not in message and "... and 950 more" in message
    saved = json.loads(report_path.read_text())
    assert [p["line"] for p in saved["bad_rows"]] == bad_lines

    ds = build_dataset(path, tok, max_len=64, skip_bad_rows=True)
    assert ds.report.used_rows == len(ds) == 9_000
    assert ds.report.total_rows == 10_000 and len(ds.report.bad_rows) == 1_000
    assert ds[0]["line"] == ds[0]["row_id"] + 1
