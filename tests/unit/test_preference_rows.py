"""Preference pairs and rankings as rows: the shared prompt is truncated once for every response (bos kept), a ranking
is one row whose responses are each scored by one forward, and its K-choose-2 pairs are averaged (InstructGPT,
Ouyang et al. 2022, sec. 3.5) by the reward model, DPO and ORPO alike."""

from __future__ import annotations

import json
import math
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import base_config

from _chartok import char_tokenizer
from tuneforge import api
from tuneforge.algorithms import orpo, reward
from tuneforge.config import RunConfig
from tuneforge.data import IGNORE, build_dataset, collate, collate_preference
from tuneforge.data.collate import pair_index, preference_responses
from tuneforge.data.tokenize import truncate_shared
from tuneforge.eval.metrics import preference_accuracy
from tuneforge.models.tiny import build_tiny

BOS, EOS = 1, 2


def write(tmp_path, rows, name="d.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def split(tok, ids, labels) -> tuple[str, str]:
    """(prompt text with specials, supervised text) of one sequence."""
    return (tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE]),
            tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE]))


# --- item 6: the shared prompt is truncated once ------------------------------------------------------------------


def test_truncate_shared_golden():
    head, tails = [BOS, 10, 11, 12, 13], [[20, 21, EOS], [30, EOS]]
    assert truncate_shared(head, tails, 8, "left", keep=1) == (head, tails)  # fits: untouched
    assert truncate_shared(head, tails, 6, "left", keep=1) == ([BOS, 12, 13], tails)  # oldest prompt tokens go
    assert truncate_shared(head, tails, 6, "left", keep=0) == ([11, 12, 13], tails)
    assert truncate_shared(head, tails, 6, "right", keep=1) == (head, [[20], [30]])  # responses lose their end
    # a response longer than max_len - bos: the prompt is emptied for all, and that response loses its end
    assert truncate_shared(head, [[20, 21, 22, 23, 24, EOS], [30, EOS]], 4, "left", keep=1) == (
        [BOS], [[20, 21, 22], [30, EOS]])
    assert truncate_shared(head, tails, 5, "right") == (head, [[], []])  # no room: the caller drops the row


@pytest.mark.parametrize("rows", [
    [{"prompt": "p" * 10 + "Q", "chosen": "cc", "rejected": "rrrrrr"}],
    [{"prompt": "p" * 10 + "Q", "ranking": ["cc", "rrrrrr", "s"]}],
])
def test_left_truncation_gives_every_response_the_same_prompt_and_keeps_bos(tmp_path, rows):
    tok = char_tokenizer(bos=True)
    ds = build_dataset(write(tmp_path, rows), tok, max_len=12, truncation="left")
    seqs = preference_responses(ds[0])
    prompts = {split(tok, ids, labels)[0] for ids, labels in seqs}
    assert prompts == {"<s>pppQ"}  # 12 = bos + 4 prompt tokens + "rrrrrr</s>"; the same 4 for every response
    responses = [split(tok, ids, labels)[1] for ids, labels in seqs]
    assert responses == [r + "</s>" for r in (rows[0].get("ranking") or [rows[0]["chosen"], rows[0]["rejected"]])]
    assert max(len(ids) for ids, _ in seqs) == 12
    assert ds.report.exceeded == ds.report.truncated == 1


def test_right_truncation_keeps_the_prompt_and_cuts_each_response(tmp_path):
    tok = char_tokenizer(bos=True)
    ds = build_dataset(write(tmp_path, [{"prompt": "abc", "chosen": "x" * 10, "rejected": "yy"}]), tok, max_len=8)
    assert [split(tok, ids, labels) for ids, labels in preference_responses(ds[0])] == [
        ("<s>abc", "xxxx"), ("<s>abc", "yy</s>")]


def test_sft_left_truncation_keeps_bos(tmp_path):
    tok = char_tokenizer(bos=True)
    row = build_dataset(write(tmp_path, [{"text": "abcdefghij"}]), tok, max_len=5, truncation="left")[0]
    assert tok.decode(row["input_ids"]) == "<s>hij</s>"


# --- item 12: a ranking is one row, one forward per response, its pairs averaged ---------------------------------


@pytest.fixture
def ranked(tmp_path):
    rows = [{"prompt": "rev ab:", "ranking": ["ba", "bb", "ab"]},
            {"prompt": "rev cd:", "chosen": "dc", "rejected": "cd"}]
    return build_dataset(write(tmp_path, rows), char_tokenizer(bos=True), max_len=32)


def test_a_ranking_is_one_row_and_collates_each_response_once(ranked):
    tok = char_tokenizer(bos=True)
    assert len(ranked) == 2 and [r["line"] for r in ranked.rows] == [1, 2]
    batch = collate_preference(ranked.rows, pad_id=0)
    assert batch["input_ids"].shape[0] == 5  # 3 + 2 responses, not 2 x (3 + 1) pair sides
    text = [split(tok, ids.tolist(), lab.tolist())[1] for ids, lab in zip(batch["input_ids"], batch["labels"])]
    pairs = [(text[c], text[r]) for c, r in zip(batch["chosen_index"].tolist(), batch["rejected_index"].tolist())]
    assert pairs == [("ba</s>", "bb</s>"), ("ba</s>", "ab</s>"), ("bb</s>", "ab</s>"), ("dc</s>", "cd</s>")]
    assert batch["pair_weight"].tolist() == pytest.approx([1 / 3] * 3 + [1.0])
    assert ranked.report.total_tokens == sum(len(ids) for r in ranked.rows for ids, _ in preference_responses(r))


def test_pairs_alone_keep_dpos_chosen_then_rejected_layout_and_unindexed_batches_read_as_halves():
    rows = [{"input_ids": [1, 5], "labels": [IGNORE, 5], "rejected_input_ids": [1, 6], "rejected_labels": [IGNORE, 6]},
            {"input_ids": [1, 7], "labels": [IGNORE, 7], "rejected_input_ids": [1, 8], "rejected_labels": [IGNORE, 8]}]
    batch = collate_preference(rows, 0)
    assert batch["input_ids"][:, 1].tolist() == [5, 7, 6, 8]
    c, r, w = pair_index(batch)
    assert (c.tolist(), r.tolist(), w.tolist()) == ([0, 1], [2, 3], [1.0, 1.0])
    c, r, w = pair_index({"input_ids": torch.zeros(6, 3)})  # online DPO's fresh pairs
    assert (c.tolist(), r.tolist(), w.tolist()) == ([0, 1, 2], [3, 4, 5], [1.0] * 3)


def test_reward_step_golden_averages_each_rankings_pairs(monkeypatch):
    """r = [1, .5, 0, -.5, -1]; ranking (0, 2, 4) and pair (1, 3): loss = (mean of the ranking's three
    −log σ(gap)) + (the pair's), over 2 rows."""
    monkeypatch.setattr(reward, "scores", lambda model, batch: torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0]))
    batch = {"chosen_index": torch.tensor([0, 0, 2, 1]), "rejected_index": torch.tensor([2, 4, 4, 3]),
             "pair_weight": torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])}
    loss, m = reward.step(None, batch, reward.Config(), SimpleNamespace(normaliser=2.0))
    sp1, sp2 = math.log1p(math.exp(-1)), math.log1p(math.exp(-2))
    assert float(loss) == pytest.approx(((2 * sp1 + sp2) / 3 + sp1) / 2, rel=1e-6)  # 0.2822061
    assert float(loss) == pytest.approx(0.2822061, abs=1e-6)
    assert m["pairwise_accuracy"] == pytest.approx(1.0) and m["pairs"] == 4
    assert m["reward_gap"] == pytest.approx(((1 + 2 + 1) / 3 + 1) / 2)


def test_reward_step_scores_each_response_once_and_averages_the_ranking(ranked):
    model, _ = build_tiny("llama")
    reward.attach_head(model)
    seen = []
    model.base_model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].shape[0]),
                                               with_kwargs=True)
    row = ranked[0]
    loss, m = reward.step(model, collate_preference([row], 0), reward.Config(), SimpleNamespace(normaliser=1.0))
    assert seen == [3] and m["pairs"] == 3  # one forward, one sequence per response
    seqs = [{"input_ids": ids, "labels": lab} for ids, lab in preference_responses(row)]
    r = reward.scores(model, collate(seqs, 0))
    mean = sum(-F.logsigmoid(r[i] - r[j]) for i, j in combinations(range(3), 2)) / 3
    assert float(loss.detach()) == pytest.approx(float(mean.detach()), rel=1e-5)


def test_orpo_loss_of_a_ranking_is_the_mean_of_its_pairs(ranked):
    model, _ = build_tiny("llama")
    row = ranked[0]
    ctx = SimpleNamespace(normaliser=1.0)
    loss, _ = orpo.step(model, collate_preference([row], 0), orpo.Config(), ctx)
    seqs = preference_responses(row)
    per_pair = []
    for i, j in combinations(range(3), 2):
        pair = {"input_ids": seqs[i][0], "labels": seqs[i][1], "rejected_input_ids": seqs[j][0],
                "rejected_labels": seqs[j][1]}
        per_pair.append(float(orpo.step(model, collate_preference([pair], 0), orpo.Config(), ctx)[0]))
    assert float(loss) == pytest.approx(sum(per_pair) / 3, rel=1e-5)


def test_preference_accuracy_counts_every_pair_of_a_ranking(ranked):
    model, _ = build_tiny("llama")
    assert preference_accuracy(model, ranked, pad_id=0)["pairs"] == 4


@pytest.mark.parametrize("algo", ["reward", "dpo", "orpo"])
def test_rankings_train_under_every_preference_algorithm(tmp_path, algo):
    rows = [{"prompt": f"rev {a}{b}:", "ranking": [b + a, b + b, a + b]} for a, b in ("ab", "cd", "ef", "gh")] * 2
    d = base_config(tmp_path, write(tmp_path, rows), max_steps=2, batch_size=2)
    d["algorithm"] = {"name": algo}
    hist = api.train(RunConfig.model_validate(d)).result.history
    assert all(math.isfinite(h["loss"]) for h in hist)
    acc = "pairwise_accuracy" if algo == "reward" else "preference_accuracy"
    assert all(0.0 <= h[acc] <= 1.0 for h in hist)
