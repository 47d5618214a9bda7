"""Tokenization and loss spans per format, truncation policies, empty results, warnings and the JSON report."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from _chartok import char_tokenizer
from tuneforge.data import IGNORE, DataError, build_dataset, check_file
from tuneforge.data.report import NO_SUPERVISED, TOO_LONG_DROPPED

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write(tmp_path, rows, name="d.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def supervised_text(tok, row) -> str:
    """Decode the tokens that carry loss (labels[1:] != -100), in order."""
    return tok.decode([t for t in row["labels"][1:] if t != IGNORE])


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- formats --------------------------------------------------------------------------------------------------------


def test_text_format_supervises_every_token_with_bos_and_eos(tmp_path, tok):
    ds = build_dataset(write(tmp_path, [{"text": "hello"}]), tok)
    row = ds[0]
    assert row["input_ids"] == [BOS] + ids_of(tok, "hello") + [EOS]
    assert row["labels"] == row["input_ids"]
    assert ds.n_supervised(0) == 6 and (row["row_id"], row["line"]) == (0, 1)


def test_text_format_without_bos(tmp_path):
    tok = char_tokenizer(bos=False)
    row = build_dataset(write(tmp_path, [{"text": "hi"}]), tok)[0]
    assert row["input_ids"] == ids_of(tok, "hi") + [EOS]


def test_prompt_completion_boundary_is_exact(tmp_path, tok):
    row = build_dataset(write(tmp_path, [{"prompt": "Q: 2+2?", "completion": " 4"}]), tok)[0]
    p, c = ids_of(tok, "Q: 2+2?"), ids_of(tok, " 4")
    assert row["input_ids"] == [BOS] + p + c + [EOS]
    assert row["labels"] == [IGNORE] * (1 + len(p)) + c + [EOS]
    assert supervised_text(tok, row) == " 4</s>"


def test_messages_supervise_only_assistant_turns(tmp_path, tok):
    row = chat(("system", "be nice"), ("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao"))
    got = build_dataset(write(tmp_path, [row]), tok)[0]
    assert tok.decode(got["input_ids"]) == tok.apply_chat_template(row["messages"], tokenize=False)
    assert supervised_text(tok, got) == "hello</s>ciao</s>"
    starts = [i for i, t in enumerate(got["labels"]) if t != IGNORE and got["labels"][i - 1] == IGNORE]
    assert [tok.decode(got["input_ids"][s - len("<|assistant|>") : s]) for s in starts] == ["<|assistant|>"] * 2


# RELIABILITY.md BI-6
def test_messages_without_chat_template_names_file_and_suggests_prompt_completion(tmp_path):
    path = write(tmp_path, [chat(("user", "a"), ("assistant", "b"))])
    with pytest.raises(DataError, match="no chat template") as err:
        build_dataset(path, char_tokenizer(chat_template=None))
    assert path in str(err.value) and "prompt/completion" in str(err.value)


# RELIABILITY.md BI-6
def test_template_that_is_not_prefix_stable_is_rejected(tmp_path):
    # Drops every assistant turn but the last, as some reasoning templates do with past thoughts.
    template = (
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|{{ m.role }}|>{{ m.content }}</s>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    path = write(tmp_path, [chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))])
    with pytest.raises(DataError, match="not prefix-stable") as err:
        build_dataset(path, char_tokenizer(chat_template=template))
    assert f"{path}:1:" in str(err.value)


def test_template_exception_is_a_bad_row(tmp_path):
    template = "{% if messages|length > 2 %}{{ raise_exception('too many turns') }}{% endif %}" + (
        "{% for m in messages %}{{ m.content }}</s>{% endfor %}"
    )
    rows = [chat(("user", "a"), ("assistant", "b")), chat(("user", "a"), ("assistant", "b"), ("user", "c"),
                                                       ("assistant", "d"))]
    path = write(tmp_path, rows)
    with pytest.raises(DataError, match="too many turns"):
        build_dataset(path, char_tokenizer(chat_template=template))
    ds = build_dataset(path, char_tokenizer(chat_template=template), skip_bad_rows=True)
    assert len(ds) == 1 and ds.report.bad_rows[0][1] == 2


# --- truncation -----------------------------------------------------------------------------------------------------


def long_rows():
    return [{"prompt": "p" * 4, "completion": "c" * 20}, {"prompt": "q", "completion": "d"}]


# RELIABILITY.md BI-3
def test_truncation_right_and_left(tmp_path, tok):
    path = write(tmp_path, long_rows())
    right = build_dataset(path, tok, max_len=10, truncation="right")
    assert right[0]["input_ids"] == [BOS] + ids_of(tok, "pppp" + "c" * 5)
    left = build_dataset(path, tok, max_len=10, truncation="left")
    assert left[0]["input_ids"] == [BOS] + ids_of(tok, "c" * 8) + [EOS]  # the tokenizer's bos survives the cut
    for ds in (right, left):
        assert ds.report.exceeded == 1 and ds.report.truncated == 1 and len(ds) == 2
        assert "1 row(s) exceeded max_len=10" in ds.report.summary().splitlines()[1]
        assert all(len(r["input_ids"]) <= 10 for r in ds.rows)


# RELIABILITY.md BI-3
def test_truncation_drop_counts_rows(tmp_path, tok):
    ds = build_dataset(write(tmp_path, long_rows()), tok, max_len=10, truncation="drop")
    assert len(ds) == 1 and ds.report.dropped == {TOO_LONG_DROPPED: 1} and ds[0]["line"] == 2


# RELIABILITY.md BI-3
def test_truncation_error_lists_every_offender_with_length(tmp_path, tok):
    rows = long_rows() + long_rows()
    path = write(tmp_path, rows)
    with pytest.raises(DataError) as err:
        build_dataset(path, tok, max_len=10, truncation="error")
    assert err.value.problems == [(path, 1, "26 tokens > max_len=10"), (path, 3, "26 tokens > max_len=10")]


def test_row_with_no_supervised_tokens_after_cut_is_dropped_and_warned(tmp_path, tok):
    rows = [{"prompt": "p" * 30, "completion": "c"}] + [{"prompt": "q", "completion": "d"}] * 9
    with pytest.warns(UserWarning, match=r"1 of 10 rows \(10.0%\)"):
        ds = build_dataset(write(tmp_path, rows), tok, max_len=16)
    assert len(ds) == 9 and ds.report.dropped == {NO_SUPERVISED: 1}
    assert all(ds.n_supervised(i) > 0 for i in range(len(ds)))


def test_no_warning_when_few_rows_lose_supervision(tmp_path, tok):
    rows = [{"prompt": "p" * 30, "completion": "c"}] + [{"prompt": "q", "completion": "d"}] * 30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(build_dataset(write(tmp_path, rows), tok, max_len=16)) == 30


# --- empty results, errors, report ----------------------------------------------------------------------------------


# RELIABILITY.md BI-2
def test_empty_file_is_an_error_naming_the_file(tmp_path, tok):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\r\n\n")
    with pytest.raises(DataError, match="empty.jsonl: the file has no rows"):
        build_dataset(str(path), tok)


# RELIABILITY.md BI-2
def test_everything_filtered_names_each_filter(tmp_path, tok):
    path = write(tmp_path, [{"prompt": "p" * 30, "completion": "c"}] * 3 + [{"prompt": 1, "completion": "c"}])
    with pytest.raises(DataError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_dataset(path, tok, max_len=8, skip_bad_rows=True)
    msg = str(err.value)
    assert f"{path}: no usable rows left" in msg
    assert "1 skipped as bad rows" in msg and f"3 dropped: {NO_SUPERVISED}" in msg


def test_error_message_lists_first_50_and_report_has_all(tmp_path, tok):
    path = write(tmp_path, [{"text": 1}] * 120)
    report_path = tmp_path / "sub" / "report.json"
    with pytest.raises(DataError) as err:
        build_dataset(path, tok, report_path=str(report_path))
    assert len(err.value.problems) == 120
    assert str(err.value).count(f"{path}:") == 50 + 1  # 50 problems + the summary line
    assert "... and 70 more" in str(err.value)
    assert len(json.loads(report_path.read_text())["bad_rows"]) == 120


# RELIABILITY.md BI-6
def test_pad_equal_eos_warns_and_eos_stays_supervised(tmp_path, caplog):
    """Said once, as a log line (no UserWarning with a source path), however many files are read."""
    import warnings

    from tuneforge.data import dataset

    dataset._PAD_IS_EOS_SAID.clear()
    tok = char_tokenizer(pad_is_eos=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            ds = build_dataset(write(tmp_path, [{"prompt": "a", "completion": "b"}]), tok)
    said = [r for r in caplog.records if "pad_token == eos_token" in r.getMessage()]
    assert len(said) == 1 and said[0].getMessage().startswith("note: ")
    assert ds[0]["labels"][-1] == EOS == tok.pad_token_id


def test_check_file_reports_without_raising_or_writing(tmp_path, tok):
    path = write(tmp_path, long_rows() + [{"prompt": 3}])
    before = set(os.listdir(tmp_path))
    report = check_file(path, tok, max_len=10, truncation="error")
    assert set(os.listdir(tmp_path)) == before
    assert not report.ok and report.used_rows == 1
    reasons = [(ln, r) for _, ln, r in report.bad_rows]
    assert reasons == [(1, "26 tokens > max_len=10"), (3, "prompt: expected a string, got number")]
    assert "1 row(s) exceeded max_len=10 and were rejected" in report.summary()
    schema_only = check_file(path)
    assert schema_only.used_rows == 2 and len(schema_only.bad_rows) == 1
    assert "lengths not checked" in schema_only.summary()


def test_invalid_arguments_are_rejected(tmp_path, tok):
    path = write(tmp_path, [{"text": "a"}])
    with pytest.raises(ValueError, match="truncation"):
        build_dataset(path, tok, truncation="middle")
    with pytest.raises(ValueError, match="format"):
        build_dataset(path, tok, format="chat")


def test_split_holds_out_a_seeded_fraction(tmp_path, tok):
    ds = build_dataset(write(tmp_path, [{"text": f"row {i}"} for i in range(20)]), tok)
    train, held = ds.split(0.25, seed=3)
    assert (len(train), len(held)) == (15, 5)
    assert sorted(r["row_id"] for r in train.rows + held.rows) == list(range(20))
    assert [r["row_id"] for r in held.rows] == [r["row_id"] for r in ds.split(0.25, seed=3)[1].rows]
    assert held.rows == sorted(held.rows, key=lambda r: r["row_id"])
    with pytest.raises(DataError, match="cannot hold out"):
        build_dataset(write(tmp_path, [{"text": "one"}]), tok).split(0.5)
