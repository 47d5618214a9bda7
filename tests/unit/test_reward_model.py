"""Reward modelling: a scalar head trained with the Bradley-Terry loss, saved beside the adapter, read back by
`tuneforge score`; every method trains under it."""

import json
import math

import pytest
import torch
from conftest import base_config, write_jsonl

from tuneforge import api
from tuneforge.algorithms import reward
from tuneforge.cli import main
from tuneforge.config import RunConfig
from tuneforge.demo import LEARNING_SETUPS
from tuneforge.models.tiny import build_tiny
from tuneforge.tasks import preference_pairs


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", preference_pairs("reverse", 48, seed=1))


def _cfg(tmp_path, data, method=None, **train):
    d = base_config(tmp_path, data, **train)
    d["algorithm"] = {"name": "reward"}
    if method is not None:
        d["method"] = method if isinstance(method, list) else [method]
    return RunConfig.model_validate(d)


def test_score_is_the_head_on_the_last_real_token():
    model, _ = build_tiny("llama")
    head = reward.attach_head(model)
    with torch.no_grad():
        head.weight.normal_()
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    r = reward.scores(model, {"input_ids": ids, "attention_mask": mask})
    alone = reward.scores(model, {"input_ids": ids[:1, :3], "attention_mask": mask[:1, :3]})
    assert torch.allclose(r[0], alone[0], atol=1e-5)  # padding after the last token changes nothing


def test_training_runs_and_saves_the_head(tmp_path, pairs_file):
    out = api.train(_cfg(tmp_path, pairs_file, max_steps=2))
    assert math.isfinite(out.result.history[0]["loss"])
    assert (out.saved / reward.HEAD_FILE).exists()


def test_full_finetuned_reward_model_saves_a_clean_hf_model(tmp_path, pairs_file):
    from transformers import AutoModelForCausalLM

    out = api.train(_cfg(tmp_path, pairs_file, {"name": "full"}, max_steps=1))
    AutoModelForCausalLM.from_pretrained(out.saved)  # no unknown reward_head weight inside
    assert (out.saved / reward.HEAD_FILE).exists()


@pytest.mark.parametrize("label", list(LEARNING_SETUPS))
def test_every_method_trains_a_reward_model(tmp_path, pairs_file, label):
    method, _ = LEARNING_SETUPS[label]
    method = {**method, "calibration_batches": 1} if isinstance(method, dict) and method["name"] == "sparse" \
        else method
    if isinstance(method, list):  # the demo's set-ups are for its 4 blocks; tiny:llama has 2
        method = [{**m, "drop_layers": 1} if m["name"] == "adapter_drop" else m for m in method]
    out = api.train(_cfg(tmp_path, pairs_file, method, max_steps=2))
    assert all(math.isfinite(h["loss"]) for h in out.result.history)


def test_score_cli_reads_the_head_back(tmp_path, pairs_file, capsys):
    out = api.train(_cfg(tmp_path, pairs_file, max_steps=3, learning_rate=1e-2))
    resp = write_jsonl(tmp_path / "resp.jsonl", [{"prompt": "rev abc:", "completion": "cba"},
                                                 {"prompt": "rev abc:", "completion": "abc"}])
    with pytest.raises(SystemExit):
        main(["score", "--model", "tiny:llama", "--adapter", str(out.saved), "--data", resp])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines() if x.startswith("{")]
    assert [set(x) for x in lines] == [{"line", "score"}] * 2
    with pytest.raises(SystemExit):
        main(["score", "--model", "tiny:llama", "--adapter", str(out.saved), "--data", pairs_file])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["pairs"] == last["rows"] == 48 and 0.0 <= last["pairwise_accuracy"] <= 1.0
    # a ranking prints all K scores, and its K-choose-2 pairs count once per row in the accuracy
    ranked = write_jsonl(tmp_path / "ranked.jsonl", [{"prompt": "rev abc:", "ranking": ["cba", "cab", "abc"]},
                                                     {"prompt": "rev ab:", "chosen": "ba", "rejected": "ab"}])
    with pytest.raises(SystemExit):
        main(["score", "--model", "tiny:llama", "--adapter", str(out.saved), "--data", ranked])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines() if x.startswith("{")]
    s = lines[0]["scores"]
    assert len(s) == 3 and set(lines[1]) == {"line", "chosen", "rejected"}
    want = ((s[0] > s[1]) + (s[0] > s[2]) + (s[1] > s[2])) / 3 / 2 + (lines[1]["chosen"] > lines[1]["rejected"]) / 2
    assert lines[-1]["rows"] == 2 and lines[-1]["pairs"] == 4
    assert lines[-1]["pairwise_accuracy"] == pytest.approx(want)


def test_ranking_of_k_expands_to_k_choose_2_pairs_with_the_better_first():
    pairs = reward.ranking_pairs(["best", "mid", "worst"])
    assert [(a, b) for a, b in pairs] == [("best", "mid"), ("best", "worst"), ("mid", "worst")]


def test_a_ranking_row_stays_one_row_whose_pairs_are_better_first(tmp_path):
    """A ranking is one training row (its K-choose-2 comparisons train together, InstructGPT sec. 3.5); its pairs
    come out of collate_preference, the better response first."""
    from tuneforge.data import build_dataset, collate_preference
    from tuneforge.data.report import DataError
    from tuneforge.models.tiny import char_tokenizer

    rows = [{"prompt": "rev ab:", "ranking": ["ba", "bb", "ab"]}, {"prompt": "rev cd:", "chosen": "dc", "rejected": "cd"}]
    ds = build_dataset(write_jsonl(tmp_path / "rank.jsonl", rows), char_tokenizer(), max_len=32)
    assert ds.report.format == "preference" and len(ds) == 2
    tok = char_tokenizer()
    batch = collate_preference(ds.rows, tok.pad_token_id)
    text = [tok.decode([t for t, l in zip(ids.tolist(), lab.tolist()) if l != -100], skip_special_tokens=True)
            for ids, lab in zip(batch["input_ids"], batch["labels"])]
    decoded = [(text[c], text[r]) for c, r in zip(batch["chosen_index"].tolist(), batch["rejected_index"].tolist())]
    assert decoded == [("ba", "bb"), ("ba", "ab"), ("bb", "ab"), ("dc", "cd")]
    assert [r["line"] for r in ds.rows] == [1, 2]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "ranking": ["a"]}, {"prompt": "p", "ranking": ["a", "a"]}])
    with pytest.raises(DataError) as e:
        build_dataset(bad, char_tokenizer(), max_len=32)
    assert "bad.jsonl:1" in str(e.value) and "bad.jsonl:2" in str(e.value) and "repeated" in str(e.value)


def test_sequence_classification_model_trains_its_own_score_head(tmp_path, pairs_file, capsys):
    """A *ForSequenceClassification checkpoint (num_labels = 1) is a reward model as it is: its score head trains
    (with the method's adapters), is saved beside the adapter, and `tuneforge score` reads it back."""
    from transformers import AutoModelForSequenceClassification

    from tuneforge.models.tiny import _make_config, char_tokenizer

    tok = char_tokenizer()
    config = _make_config("llama", None, tok)
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    d = base_config(tmp_path, pairs_file, max_steps=3, learning_rate=1e-2)
    d.update(model={"path": str(tmp_path / "rm")}, algorithm={"name": "reward"})
    out = api.train(RunConfig.model_validate(d))
    assert all(math.isfinite(h["loss"]) for h in out.result.history)
    from tuneforge.safeio import load_safetensors

    assert set(load_safetensors(out.saved / reward.HEAD_FILE)) == {"weight"}  # the model's own bias-free score
    with pytest.raises(SystemExit):
        main(["score", "--model", str(tmp_path / "rm"), "--adapter", str(out.saved), "--data", pairs_file])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["pairs"] == 48
