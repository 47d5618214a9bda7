"""Special tokens follow the tokenizer (bos added, not added, or a bos that is a chat marker), rows are the
tokenizer's encoding of their joined text (no "▁" at the prompt/completion seam), and the rollout encodes prompts as
training rows do."""

from __future__ import annotations

import json

import pytest

from _chartok import char_tokenizer as chartok
from _tokenizers import llama2_like, smollm2_like
from tuneforge.data import IGNORE, build_dataset
from tuneforge.data.tokenize import leading_specials
from tuneforge.models.tiny import char_tokenizer as tiny_tokenizer
from tuneforge.train.rollout import encode_prompt

TOKENIZERS = {
    "bos_added": lambda: chartok(bos=True),  # post-processor adds <s>, as Llama's does
    "llama2_like": llama2_like,  # SentencePiece-style, adds <s>
    "bos_not_added": tiny_tokenizer,  # has a bos token but never adds it (GPT-2-like)
    "no_bos": lambda: chartok(bos=False),
    "smollm2_like": smollm2_like,  # bos = <|im_start|>, not added
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def write(tmp_path, rows, name="d.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def own(tok, text: str) -> list[int]:
    """What the tokenizer itself makes of a text: its special tokens included."""
    return list(tok(text)["input_ids"])


def head_of(row) -> list[int]:
    return [t for t, lab in zip(row["input_ids"], row["labels"]) if lab == IGNORE]


# --- item: bos follows the tokenizer ------------------------------------------------------------------------------


def test_leading_specials_are_what_the_tokenizer_puts_first():
    assert leading_specials(chartok(bos=True)) == [chartok().bos_token_id]
    assert leading_specials(llama2_like()) == [llama2_like().bos_token_id]
    assert leading_specials(tiny_tokenizer()) == []
    assert leading_specials(chartok(bos=False)) == []
    assert leading_specials(smollm2_like()) == []


def test_text_and_prompt_completion_rows_are_the_tokenizers_own_encoding(tmp_path, tok):
    text = write(tmp_path, [{"text": "the cat sat"}], "t.jsonl")
    pc = write(tmp_path, [{"prompt": "reverse abc:", "completion": " cba"}], "pc.jsonl")
    eos = [tok.eos_token_id]
    assert build_dataset(text, tok)[0]["input_ids"] == own(tok, "the cat sat") + eos
    row = build_dataset(pc, tok)[0]
    assert row["input_ids"] == own(tok, "reverse abc: cba") + eos
    supervised = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE]
    assert tok.decode(supervised).endswith("cba" + tok.eos_token)


def test_smollm2_rows_do_not_start_with_a_role_less_im_start(tmp_path):
    tok = smollm2_like()
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.bos_token_id == im_start
    for rows in ([{"text": "hello"}], [{"prompt": "hi", "completion": " there"}],
                 [{"prompt": "hi", "chosen": " yes", "rejected": " no"}]):
        row = build_dataset(write(tmp_path, rows), tok)[0]
        assert im_start not in row["input_ids"]
        assert im_start not in row.get("rejected_input_ids", [])
    assert im_start not in encode_prompt(tok, "hi")


def test_smollm2_messages_are_the_template_rendering_with_one_im_start_per_turn(tmp_path):
    tok = smollm2_like()
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    row = build_dataset(write(tmp_path, [{"messages": turns}]), tok)[0]
    assert row["input_ids"] == tok.apply_chat_template(turns, tokenize=True, return_dict=False)
    assert row["input_ids"].count(tok.bos_token_id) == len(turns)


def test_rollout_prompts_equal_the_prompt_part_of_training_rows(tmp_path, tok):
    rows = [{"prompt": p, "completion": " done"} for p in ("reverse abc:", "Question: two?", "hello world")]
    ds = build_dataset(write(tmp_path, rows), tok)
    for r, row in zip(rows, ds.rows):
        assert encode_prompt(tok, r["prompt"]) == head_of(row) == own(tok, r["prompt"])


def test_an_empty_prompt_starts_from_bos_when_the_tokenizer_adds_nothing(tmp_path):
    """The first response token needs a context; ``generate`` likewise starts from bos when given no input."""
    for tok in (tiny_tokenizer(), smollm2_like(), chartok(bos=True)):
        row = build_dataset(write(tmp_path, [{"prompt": "", "completion": "ab"}]), tok)[0]
        assert row["input_ids"][0] == tok.bos_token_id and head_of(row) == [tok.bos_token_id]
        assert encode_prompt(tok, "") == [tok.bos_token_id]
    row = build_dataset(write(tmp_path, [{"prompt": "", "completion": "ab"}]), chartok(bos=False))[0]
    assert row["input_ids"] == own(chartok(bos=False), "ab") + [2]  # no bos to start from: as the tokenizer does


# --- item: the prompt/completion seam -----------------------------------------------------------------------------

SEAMS = [("Question: two?\n", "yes"), ("Answer:", " yes"), ("Answer: ", "yes"), ("", "yes"), ("hello", " world")]


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_dummy_prefix_tokenizer_inserts_a_space_when_pieces_are_encoded_apart(scheme):
    """The premise: with a Metaspace pre-tokenizer, encoding a completion alone prepends "▁", so concatenating
    separately encoded pieces is not the encoding of the joined text (and decodes with an extra space)."""
    tok = llama2_like(scheme)
    apart = tok("Question: two?\n", add_special_tokens=False)["input_ids"] + tok("yes", add_special_tokens=False)[
        "input_ids"]
    joint = tok("Question: two?\nyes", add_special_tokens=False)["input_ids"]
    assert apart != joint and tok.decode(apart) == "Question: two?\n yes"


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_prompt_completion_rows_are_the_joint_encoding_with_an_exact_boundary(tmp_path, scheme):
    tok = llama2_like(scheme)
    ds = build_dataset(write(tmp_path, [{"prompt": p, "completion": c} for p, c in SEAMS]), tok)
    for (p, c), row in zip(SEAMS, ds.rows):
        assert row["input_ids"] == own(tok, p + c) + [tok.eos_token_id]
        assert tok.decode(row["input_ids"], skip_special_tokens=True) == p + c  # no stray "▁" anywhere
        response = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE],
                              skip_special_tokens=True)
        if p.endswith(" "):  # "Answer: " + "yes" -> "▁yes": the merged token belongs to the response
            assert response == "yes" and head_of(row) == own(tok, p)[:-1]
        else:
            assert response == c.lstrip(" ") and head_of(row) == own(tok, p)  # what generation starts from


def test_messages_rows_are_the_joint_encoding_of_the_rendering(tmp_path):
    tok = llama2_like()
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
             {"role": "user", "content": "two?"}, {"role": "assistant", "content": "four"}]
    row = build_dataset(write(tmp_path, [{"messages": turns}]), tok)[0]
    rendered = tok.apply_chat_template(turns, tokenize=False)
    assert row["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    spans, cur = [], []
    for t, lab in zip(row["input_ids"], row["labels"]):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            spans, cur = spans + [cur], []
    spans += [cur] if cur else []
    assert [tok.decode(s) for s in spans] == ["yes</s>", "four</s>"]


def test_preference_responses_share_the_prompt_tokens_even_across_a_seam_merge(tmp_path):
    """"Answer: " merges with "yes" but not with "\\nno": the shared prompt is the part both encodings agree on."""
    tok = llama2_like()
    row = build_dataset(write(tmp_path, [{"prompt": "Answer: ", "chosen": "yes", "rejected": "\nno"}]), tok)[0]
    n = len(head_of(row))
    assert row["input_ids"][:n] == row["rejected_input_ids"][:n] and row["rejected_labels"][:n] == [IGNORE] * n
    assert row["input_ids"] == own(tok, "Answer: yes") + [tok.eos_token_id]
    assert row["rejected_input_ids"] == own(tok, "Answer: \nno") + [tok.eos_token_id]
