"""Pieces of the online algorithms: reward functions and their failure policy, prompt/answer split, best-of-N
selection, pair labelling, the judge's position debiasing, and the loop's online path (accumulation ≡ batch)."""

import math

import pytest
import torch
from conftest import base_config, write_jsonl

from tuneforge.algorithms import _online as O
from tuneforge.algorithms import rewards as R
from tuneforge.algorithms.online_dpo import pair_rows
from tuneforge.algorithms.rejection_sampling import best_of
from tuneforge.algorithms.rlaif import debiased, label_rows
from tuneforge.api import train
from tuneforge.config import ConfigError, load_config
from tuneforge.tasks import make_examples
from tuneforge.train.rollout import Rollout


def _combine(cfgs, completions, answers=None):
    n = len(completions)
    return R.combined_rewards(R.reward_functions(cfgs), ["p"] * n, completions, answers or ["abc"] * n,
                              [[1]] * n, [[2]] * n, [f"f.jsonl:{i + 1}" for i in range(n)])


def test_builtin_rewards_and_weights():
    total, valid = _combine([R.ExactMatch(), R.Regex(pattern="[a-c]+", weight=0.5),
                             R.Length(target=3, weight=2.0)], ["abc", "ab", "xyz!"])
    # "abc": 1 + 0.5 + 0 ; "ab": 0 + 0.5 + 2·(−1/3) ; "xyz!": 0 + 0 + 2·(−1/3)
    assert torch.allclose(total, torch.tensor([1.5, 0.5 - 2 / 3, -2 / 3], dtype=torch.float64))
    assert valid.all()
    sim, _ = _combine([R.Similarity()], ["abc", "abd", "zzz"])
    assert sim[0] == 1.0 and 0 < sim[1] < 1 and sim[2] == 0.0


def test_reward_function_that_raises_names_itself_and_the_rows(tmp_path):
    f = tmp_path / "bad_reward.py"
    f.write_text("def score(prompts, completions, answers):\n    raise KeyError('boom')\n")
    with pytest.raises(R.RewardError, match=r"0:python raised KeyError.*f\.jsonl:1"):
        _combine([R.Python(function=f"{f}:score")], ["a", "b"])


def test_nan_and_wrong_count_rewards(tmp_path):
    f = tmp_path / "nan_reward.py"
    f.write_text("def score(prompts, completions, answers):\n    return [float('nan'), None, 1.0]\n"
                 "def short(prompts, completions, answers):\n    return [1.0]\n")
    total, valid = _combine([R.Python(function=f"{f}:score")], ["a", "b", "c"])
    assert valid.tolist() == [False, False, True] and total[2] == 1.0 and torch.isfinite(total).all()
    with pytest.raises(R.RewardError, match="returned 1 values for 3"):
        _combine([R.Python(function=f"{f}:short")], ["a", "b", "c"])


def test_unknown_reward_name_is_a_config_error(tmp_path, pc_file):
    cfg = base_config(tmp_path, pc_file)
    cfg["algorithm"] = {"name": "grpo", "rewards": [{"name": "exact_mach"}]}
    with pytest.raises(ConfigError, match="exact_mach"):
        load_config(cfg)


def test_split_row_cuts_at_the_last_supervised_span():
    row = {"input_ids": [1, 5, 6, 7, 8, 2], "labels": [-100, -100, -100, 7, 8, 2], "line": 3}
    assert O.split_row(row) == ([1, 5, 6], [7, 8, 2])
    chat = {"input_ids": list(range(10)), "labels": [-100, -100, 2, 3, -100, -100, -100, 7, 8, 9]}
    assert O.split_row(chat) == ([0, 1, 2, 3, 4, 5, 6], [7, 8, 9])
    with pytest.raises(ValueError, match="line 4"):
        O.split_row({"input_ids": [1, 2], "labels": [1, 2], "line": 4})


def test_best_of_picks_the_first_best_valid_sample_above_threshold():
    r = torch.tensor([0.0, 2.0, 2.0, 1.0, 5.0, -1.0, 3.0, 3.0, 0.5], dtype=torch.float64)
    valid = torch.tensor([True, True, True, True, False, True, False, False, False])
    assert best_of(r, valid, 3, None) == [1, 3]  # prompt 1's 5.0 is invalid; prompt 2 has no valid sample
    assert best_of(r, valid, 3, 1.5) == [1]


def _rollout(completions):
    n = max(len(c) for c in completions)
    toks = torch.tensor([c + [0] * (n - len(c)) for c in completions])
    mask = torch.tensor([[1] * len(c) + [0] * (n - len(c)) for c in completions])
    return Rollout([[1, 9]] * len(completions), toks, torch.zeros(toks.shape), mask, [""] * len(completions),
                   [True] * len(completions))


def test_pair_rows_orders_by_preference_and_skips_ties():
    roll = _rollout([[5, 2], [6, 2], [7, 2], [7, 2], [3], [4]])
    pairs, skipped = pair_rows(roll, torch.tensor([0.2, 0.9, float("nan")], dtype=torch.float64))
    assert skipped == 2 and len(pairs) == 1  # identical completions, and a NaN label
    chosen, rejected = pairs[0]
    assert chosen["input_ids"] == [1, 9, 6, 2] and rejected["input_ids"] == [1, 9, 5, 2]
    assert chosen["labels"][:2] == [-100, -100]


def test_judge_debiasing_cancels_position_bias():
    def biased(prompts, a, b):  # prefers the longer response, plus a 0.2 bonus for whatever is shown first
        return [min(1.0, (0.6 if len(x) > len(y) else 0.3) + 0.2) for x, y in zip(a, b)]

    p = debiased(biased, ["q"], ["long answer"], ["short"])
    assert p.item() == pytest.approx(0.5 * (0.8 + 1 - 0.5))
    rows, ties = label_rows(lambda p, a, b: debiased(biased, p, a, b),
                            [{"prompt": "q", "responses": ["x", "long"]}, {"prompt": "q", "responses": ["s", "s"]}])
    assert ties == 1 and rows[0]["chosen"] == "long" and rows[0]["rejected"] == "x"


def _grpo_weights(tmp_path, name, batch, accum):
    data = write_jsonl(tmp_path / "pc.jsonl", make_examples("copy", 16, seed=3))
    cfg = base_config(tmp_path, data, output_dir=str(tmp_path / name), max_steps=2, batch_size=batch,
                      grad_accum=accum, max_grad_norm=None)
    cfg["algorithm"] = {"name": "grpo", "num_generations": 4, "max_new_tokens": 5,
                        "rewards": [{"name": "length", "target": 3}, {"name": "similarity"}]}
    out = train(load_config(cfg))
    from tuneforge.safeio import load_safetensors

    return load_safetensors(out.saved / "adapter_model.safetensors"), out.result.history


@pytest.mark.parametrize("loss_type", ["grpo"])
def test_online_accumulation_equals_the_full_batch(tmp_path, loss_type):
    """4 prompts in one micro-batch ≡ 2 micro-batches of 2: rollouts are seeded per request, and each micro-batch
    loss is divided by the whole update's count of completions."""
    a, ha = _grpo_weights(tmp_path, "full", 4, 1)
    b, hb = _grpo_weights(tmp_path, "accum", 2, 2)
    assert [h["reward"] for h in ha] == [h["reward"] for h in hb]
    assert all(abs(x["loss"] - y["loss"]) < 1e-6 for x, y in zip(ha, hb))
    # Adam divides by sqrt(v) + eps: an element whose gradient is below eps (1e-8) turns a 1e-10 rounding
    # difference between the two summation orders into an update difference of up to lr; 2 steps at lr 1e-3.
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)
    assert math.isfinite(ha[-1]["loss"])


def test_bf16_rollouts_put_the_fp32_weights_back_untouched():
    from tuneforge.methods import METHODS, apply_methods
    from tuneforge.models.tiny import build_tiny
    from tuneforge.train.precision import frozen_weights_as
    from tuneforge.train.rollout import encode_prompt, sample

    model, tok = build_tiny("llama")
    apply_methods(model, [METHODS["lora"].Config(rank=4)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enc = [encode_prompt(tok, "copy abc:")]
    with frozen_weights_as(model) as n:
        assert n > 0 and model.lm_head.weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        r = sample(model, enc, pad_id=0, max_new_tokens=6, temperature=1.0, seeds=[1], tokenizer=tok)
    assert r.tokens.shape == (1, 6)
    after = model.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)


def test_ppo_and_grpo_score_with_a_trained_reward_model(tmp_path):
    """A reward run's adapter + head is a reward for the online algorithms (same vocabulary: ids scored as
    generated, eos appended where the head reads)."""
    from tuneforge.tasks import preference_pairs

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs("reverse", 16, seed=1))
    rm = base_config(tmp_path, pairs, output_dir=str(tmp_path / "rm"), max_steps=2)
    rm["algorithm"] = {"name": "reward"}
    saved = train(load_config(rm)).saved
    scorer = R.build(R.RewardModel(path=str(saved), base="tiny:llama"))
    from tuneforge.models.tiny import char_tokenizer

    tok = char_tokenizer()
    a = scorer([[1, 70, 71]], [[72, 73]], (["p"], ["c"]), tok)
    b = scorer([[1, 70, 71]], [[72, 73, tok.eos_token_id]], (["p"], ["c"]), tok)
    assert a == b and math.isfinite(a[0])  # eos is appended once, not twice
    data = write_jsonl(tmp_path / "pc.jsonl", make_examples("copy", 8, seed=3))
    for name in ("ppo", "grpo"):
        cfg = base_config(tmp_path, data, output_dir=str(tmp_path / name), max_steps=2, batch_size=2)
        cfg["algorithm"] = {"name": name, "max_new_tokens": 4,
                            "rewards": [{"name": "reward_model", "path": str(saved), "base": "tiny:llama"}]}
        hist = train(load_config(cfg)).result.history
        assert all(math.isfinite(h["loss"]) and math.isfinite(h["reward"]) and h["reward"] != 0 for h in hist)
    with pytest.raises(ValueError, match="set reward_model.base"):
        R.build(R.RewardModel(path=str(saved)))


def test_char_accuracy_counts_positions_over_the_longer_length():
    from tuneforge.algorithms.rewards import char_accuracy, similarity

    got = char_accuracy(None, ["pi", "pqff", "sqpf</s>", "sqpfxx\nmore", ""], ["pdeawi", "sqpf", "sqpf", "sqpf", ""])
    assert got == [1 / 6, 2 / 4, 1.0, 4 / 6, 1.0]
    # difflib's ratio gives the short guess 2·2/(2+6) = 0.5, the same as a full-length attempt with two right
    assert similarity(None, ["pi"], ["pdeawi"]) == [0.5]


def test_dense_rewards_cut_a_multi_line_answer_as_exact_match_does():
    from tuneforge.algorithms.rewards import char_accuracy, exact_match, similarity

    answer = "LIMA\n1987"
    for fn in (exact_match, char_accuracy, similarity):
        assert fn(None, ["LIMA\n1987\nmore"], [answer]) == [1.0], fn
    assert char_accuracy(None, ["LIMA"], [answer]) == [4 / 9]
