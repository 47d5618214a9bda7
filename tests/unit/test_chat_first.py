"""Chat-first generation and evaluation: prompts of chat rows are the turns before the last assistant turn (the
answer is never fed back), ``generate --prompt`` wraps a chat model's prompt in its template unless ``--raw`` and
streams it, ``eval --exact-match`` scores chat rows and refuses a file with none it can score, ``chat`` keeps its
history, and the streamed text equals the decoded completion for byte-level and SentencePiece tokenizers."""

import json

import pytest
import torch
from _tokenizers import llama2_like, smollm2_like
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tuneforge.cli import _prompt_of, main
from tuneforge.data.report import DataError
from tuneforge.eval.examples import answer_examples
from tuneforge.models.tiny import build_tiny
from tuneforge.serve.chat import chat_loop
from tuneforge.serve.stream import TextStream, stream_generate
from tuneforge.tasks import exact_match

CHAT = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]


def _write(tmp_path, rows):
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(f)


def test_chat_examples_answer_the_last_assistant_turn_from_what_precedes_it(tmp_path):
    ex = answer_examples(_write(tmp_path, [{"messages": CHAT}, {"prompt": "p", "completion": "c"}, {"text": "t"}]))
    assert [(e.prompt, e.answer, e.line) for e in ex] == [(CHAT[:4], "a2", 1), ("p", "c", 2)]
    assert all("a2" not in json.dumps(e.prompt) for e in ex)
    assert _prompt_of(json.dumps({"messages": CHAT}), chat=True) == CHAT[:4]
    assert _prompt_of("plain text", chat=True) == [{"role": "user", "content": "plain text"}]
    assert _prompt_of("plain text", chat=False) == "plain text"
    # a prompt/completion row's prompt goes in raw, as training and eval --exact-match feed it
    assert _prompt_of(json.dumps({"prompt": "p ->", "completion": "c"}), chat=True) == "p ->"


def test_a_file_with_nothing_to_score_is_an_error_naming_what_it_holds(tmp_path):
    path = _write(tmp_path, [{"text": "a"}, {"text": "b"}, {"prompt": "x", "chosen": "y", "rejected": "z"}])
    with pytest.raises(DataError, match=r"no row can be scored by exact match \(the file holds 2 text, 1 preference"):
        answer_examples(path)


def test_eval_exact_match_on_chat_rows_and_exit_2_on_none(tmp_path, capsys):
    path = _write(tmp_path, [{"messages": CHAT}, {"messages": CHAT[:3]}])
    with pytest.raises(SystemExit) as code:
        main(["eval", "--model", "tiny:llama", "--data", path, "--exact-match", "--max-new-tokens", "3"])
    assert code.value.code == 0 and json.loads(capsys.readouterr().out)["n"] == 2
    bad = _write(tmp_path, [{"text": "only text"}])
    with pytest.raises(SystemExit) as code:
        main(["eval", "--model", "tiny:llama", "--data", bad, "--exact-match"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.startswith("error:") and "no row can be scored" in err


@pytest.mark.parametrize("raw", [False, True])
def test_generate_prompt_uses_the_template_unless_raw(monkeypatch, capsys, raw):
    seen = []
    monkeypatch.setattr("tuneforge.serve.stream.stream_generate",
                        lambda model, tok, prompt, write, **kw: (seen.append(prompt), write("ok"))[1])
    with pytest.raises(SystemExit):
        main(["generate", "--model", "tiny:llama", "--prompt", "hello"] + (["--raw"] if raw else []))
    assert seen == ["hello" if raw else [{"role": "user", "content": "hello"}]]
    assert capsys.readouterr().out == "ok\n"


def test_streaming_writes_the_completion_as_it_is_generated():
    model, tok = build_tiny("llama", seed=0)
    pieces = []
    text = stream_generate(model, tok, "copy abc:", pieces.append, max_new_tokens=6, temperature=0.0)
    from tuneforge.train.rollout import generate

    assert "".join(pieces) == text == generate(model, tok, ["copy abc:"], max_new_tokens=6)[0]
    assert len(pieces) > 1  # more than one write: it streamed


def _byte_level_bpe():
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["héllo wörld ✓ 日本語 🙂 the cat sat on the mat"] * 20,
                             trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                 show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core)


@pytest.mark.parametrize("make", [_byte_level_bpe, llama2_like, smollm2_like])
def test_text_stream_equals_decoding_the_whole(make):
    tok = make()
    for text in ["héllo wörld ✓ 日本語 🙂", "the cat sat\n\non the  mat", "Answer: four"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        s = TextStream(tok)
        got = [s.push(t) for t in ids]
        assert "".join(got) + s.flush() == tok.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in p for p in got)  # never half a character


def test_chat_keeps_history_and_reset_clears_it():
    model, tok = build_tiny("llama", seed=0)
    lines = iter(["hi", "again", "/reset", "new", "/exit"])
    seen = []
    import tuneforge.serve.chat as C

    real = C.stream_generate
    C.stream_generate = lambda m, t, history, write, **kw: (seen.append([dict(x) for x in history]), "r")[1]
    try:
        history = chat_loop(model, tok, system="sys", read=lambda _: next(lines), write=lambda s: None)
    finally:
        C.stream_generate = real
    assert [len(h) for h in seen] == [2, 4, 2]  # system + user; + reply + user; after /reset: system + user
    assert history == [{"role": "system", "content": "sys"}, {"role": "user", "content": "new"},
                       {"role": "assistant", "content": "r"}]


def test_exact_match_keeps_as_many_lines_as_the_answer():
    assert exact_match("four\nmore text", "four") and not exact_match("\nfour", "four")
    assert exact_match("line one\nline two\nextra", "line one\nline two")
