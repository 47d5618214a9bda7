"""BI-7: random bytes and random JSON never crash ``check_file``; every rejection carries a line number."""

from __future__ import annotations

import json
import random

import pytest

from _chartok import char_tokenizer
from tuneforge.data import check_file

N = 2_000


def random_bytes_line(rng: random.Random) -> bytes:
    """Mostly noise, sometimes JSON-ish fragments, never a newline (each string is one line)."""
    pool = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\r", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"null",
            b'"messages"', b'"role"', b'"text"', b"\\ud800", b"1e999", b"-", b"0"]
    parts = []
    for _ in range(rng.randint(0, 12)):
        if rng.random() < 0.5:
            parts.append(rng.choice(pool))
        else:
            parts.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))))
    return b"".join(parts).replace(b"\n", b" ")


def random_text(rng: random.Random) -> str:
    alphabet = "ab </s><|user|>\t\"\\é\u2028\ud800\x00"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))


def random_json(rng: random.Random, depth: int = 0):
    """Random nested value, biased towards the keys and shapes the pipeline looks for."""
    kinds = ["null", "bool", "int", "float", "str", "list", "dict", "row"] if depth < 4 else ["null", "int", "str"]
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-(10**20), 10**20)
    if kind == "float":
        return rng.choice([0.5, -1e308, 3.14])
    if kind == "str":
        return random_text(rng)
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "dict":
        keys = ["messages", "text", "prompt", "completion", "role", "content", "x"]
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return random_row(rng, depth)


def random_value(rng: random.Random):
    """A top-level row: half near-valid messages rows, half arbitrary JSON values."""
    return random_row(rng, 0) if rng.random() < 0.5 else random_json(rng)


def random_row(rng: random.Random, depth: int) -> dict:
    """A near-valid messages row with random damage, so validation is exercised deeply, not just at the top."""
    bad_roles = ["system", "bot", None, 3, "assistant"]
    turns = []
    for i in range(rng.randint(0, 4)):
        role = ("user", "assistant")[i % 2] if rng.random() < 0.85 else rng.choice(bad_roles)
        turn = {"role": role, "content": random_text(rng)}
        if rng.random() < 0.1:
            turn["content"] = random_json(rng, depth + 1)
        if rng.random() < 0.05:
            del turn["role"]
        turns.append(turn)
    return {"messages": turns if rng.random() < 0.9 else random_json(rng, depth + 1)}


def assert_report_sane(report, n_lines: int):
    assert report.total_rows <= n_lines
    for file, line, reason in report.bad_rows:
        assert isinstance(line, int) and 1 <= line <= n_lines, (file, line, reason)
        assert isinstance(reason, str) and reason
    assert report.used_rows + len(report.bad_rows) + sum(report.dropped.values()) == report.total_rows
    report.summary()


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_random_bytes_lines(tmp_path, with_tokenizer):
    rng = random.Random(7)
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b"\n".join(random_bytes_line(rng) for _ in range(N)))
    report = check_file(str(path), char_tokenizer() if with_tokenizer else None)
    assert_report_sane(report, N)
    assert report.bad_rows  # noise cannot all be valid rows


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_random_json_values(tmp_path, with_tokenizer):
    rng = random.Random(11)
    path = tmp_path / "values.jsonl"
    path.write_text("\n".join(json.dumps(random_value(rng)) for _ in range(N)))  # ensure_ascii: one line each
    report = check_file(str(path), char_tokenizer() if with_tokenizer else None, format="messages", max_len=48)
    assert_report_sane(report, N)
    assert report.bad_rows and report.used_rows > 0  # the fuzz reaches both outcomes


def test_random_json_values_auto_format(tmp_path):
    rng = random.Random(13)
    path = tmp_path / "auto.jsonl"
    path.write_text("\n".join(json.dumps(random_value(rng)) for _ in range(N)))
    assert_report_sane(check_file(str(path), char_tokenizer(), max_len=16, truncation="error"), N)
