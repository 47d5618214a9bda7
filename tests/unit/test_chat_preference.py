"""Preference rows in the conversational form TRL users have: ``prompt`` as messages and ``chosen`` / ``rejected``
(or a ``ranking``) as assistant messages, or whole conversations sharing their opening turns. They are rendered
through the chat template exactly as TRL renders them (``trl.data_utils``), so a chat model is preference-trained on
the text it sees at inference."""

import json

import pytest
from _tokenizers import smollm2_like

from tuneforge.data import build_dataset
from tuneforge.data.collate import preference_responses
from tuneforge.data.report import DataError

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
CHOSEN = [{"role": "assistant", "content": "Paris."}]
REJECTED = [{"role": "assistant", "content": "Lyon, I think."}]


def _write(tmp_path, rows, name="p.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(f)


def _seqs(tmp_path, rows, tok=None, **kw):
    ds = build_dataset(_write(tmp_path, rows), tok or smollm2_like(), **kw)
    return ds, [preference_responses(r) for r in ds.rows]


def test_explicit_prompt_renders_as_the_template_does(tmp_path):
    tok = smollm2_like()
    ds, [[(c_ids, c_lab), (r_ids, r_lab)]] = _seqs(tmp_path, [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], tok)
    head = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    # the template's rendering up to the response's end-of-turn marker (where generation stops; the newline the
    # template writes after it is dropped), no extra eos
    assert c_ids == tok.apply_chat_template(PROMPT + CHOSEN, tokenize=True, return_dict=False)[:-1]
    assert r_ids == tok.apply_chat_template(PROMPT + REJECTED, tokenize=True, return_dict=False)[:-1]
    assert c_lab[:len(head)] == [-100] * len(head) and c_lab[len(head):] == c_ids[len(head):]  # the response only
    assert tok.decode(c_ids[len(head):]) == "Paris.<|im_end|>" and c_ids[-1] == tok.eos_token_id


def test_matches_trl_rendering(tmp_path):
    trl_data = pytest.importorskip("trl.data_utils")
    tok = smollm2_like()
    row = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    text = trl_data.apply_chat_template(row, tok)
    _, [[(c_ids, c_lab), (r_ids, _)]] = _seqs(tmp_path, [row], tok)
    n = c_lab.index(next(x for x in c_lab if x != -100))
    assert tok.decode(c_ids[:n]) == text["prompt"]
    assert tok.decode(c_ids[n:]) + "\n" == text["chosen"] and tok.decode(r_ids[n:]) + "\n" == text["rejected"]


def test_implicit_prompt_and_string_responses_give_the_same_rows(tmp_path):
    explicit = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    implicit = {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED}  # Anthropic HH style
    strings = {"prompt": PROMPT, "chosen": "Paris.", "rejected": "Lyon, I think."}
    got = [_seqs(tmp_path, [r])[1] for r in (explicit, implicit, strings)]
    assert got[0] == got[1] == got[2]


def test_conversational_ranking_is_one_row(tmp_path):
    ranking = [CHOSEN, [{"role": "assistant", "content": "Marseille."}], REJECTED]
    ds, [seqs] = _seqs(tmp_path, [{"prompt": PROMPT, "ranking": ranking}])
    assert len(ds) == 1 and len(seqs) == 3 and len({tuple(s[0]) for s in seqs}) == 3


@pytest.mark.parametrize("row,reason", [
    ({"prompt": PROMPT + CHOSEN, "chosen": CHOSEN, "rejected": REJECTED}, "prompt: ends with an assistant turn"),
    ({"prompt": PROMPT, "chosen": [{"role": "user", "content": "x"}], "rejected": REJECTED}, "chosen[0].role"),
    ({"prompt": PROMPT, "chosen": CHOSEN, "rejected": CHOSEN}, "identical responses"),
    ({"prompt": "a string", "chosen": 3, "rejected": REJECTED}, "prompt: expected a list of {role, content}"),
    ({"chosen": PROMPT + CHOSEN, "rejected": PROMPT}, "rejected: the conversation must end with the assistant"),
    # no prompt turn: the template's system message and markup would be scored as the response
    ({"prompt": [], "chosen": CHOSEN, "rejected": REJECTED}, "prompt: no turn before the responses"),
    ({"chosen": CHOSEN, "rejected": REJECTED}, "prompt: no turn before the responses"),
])
def test_bad_conversational_rows_name_the_field(tmp_path, row, reason):
    with pytest.raises(DataError) as e:
        build_dataset(_write(tmp_path, [row]), smollm2_like())
    assert reason in str(e.value) and ":1" in str(e.value)


def test_without_a_chat_template_it_says_so(tmp_path):
    tok = smollm2_like()
    tok.chat_template = None
    with pytest.raises(DataError, match="need a chat template"):
        build_dataset(_write(tmp_path, [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}]), tok)


def test_rlaif_labelling_keeps_the_conversational_form(tmp_path):
    """``tuneforge label`` on conversational pairs: the judge reads a transcript, the labelled rows stay messages
    (so DPO renders them through the policy's chat template)."""
    from tuneforge.algorithms.rlaif import judge_text, label_rows, read_response_pairs

    pairs = _write(tmp_path, [{"prompt": PROMPT, "responses": [REJECTED, CHOSEN]},
                              {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED}], "pairs.jsonl")
    rows = read_response_pairs(pairs)
    assert rows[0]["prompt"] == PROMPT and rows[1]["responses"] == [CHOSEN, REJECTED]
    seen = []

    def judge(prompts, a, b):
        import torch

        seen.extend(prompts)
        return torch.tensor([0.0 if "Lyon" in x else 1.0 for x in a])

    out, ties = label_rows(judge, rows)
    assert ties == 0 and all(r["chosen"] == CHOSEN and r["rejected"] == REJECTED for r in out)
    assert seen[0] == "system: Be brief.\nuser: Capital of France?" == judge_text(PROMPT)
    ds, _ = _seqs(tmp_path, out)  # the labelled file is a valid conversational preference file
    assert len(ds) == 2
