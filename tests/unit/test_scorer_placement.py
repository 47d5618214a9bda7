"""Frozen scoring models (the ``reward_model`` reward, the RLAIF judge) load next to the policy, in its dtype: before,
both always loaded on the CPU in fp32, so a GPU PPO/GRPO run scored on the CPU. The placement is a pure function
(tested with a meta-device and a faked-CUDA policy); the loads are checked end to end on CPU."""

import math

import pytest
import torch
from conftest import base_config, write_jsonl

from tuneforge.algorithms import rewards as R
from tuneforge.algorithms import rlaif
from tuneforge.api import train
from tuneforge.config import load_config
from tuneforge.methods import METHODS, apply_methods
from tuneforge.models import load as load_mod
from tuneforge.models.tiny import build_tiny, char_tokenizer
from tuneforge.tasks import preference_pairs


@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory):
    """A reward run's adapter (LoRA + head) on tiny:llama, 2 steps."""
    tmp = tmp_path_factory.mktemp("rm")
    pairs = write_jsonl(tmp / "pairs.jsonl", preference_pairs("reverse", 16, seed=1))
    cfg = base_config(tmp, pairs, output_dir=str(tmp / "rm"), max_steps=2)
    cfg["algorithm"] = {"name": "reward"}
    return str(train(load_config(cfg)).saved)


def _policy(dtype=torch.float32, device=None, methods=()):
    model, _ = build_tiny("llama", dtype=dtype)
    apply_methods(model, [METHODS[n].Config(**kw) for n, kw in methods]) if methods else None
    return model.to(device) if device else model


# ------------------------------------------------------------------------------------------ the pure function
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_placement_is_the_policys_device_and_load_dtype(dtype):
    assert R.placement(_policy(dtype)) == (torch.device("cpu"), dtype)
    # adapters train in fp32 on a half base: the scorer still follows the base's dtype
    assert R.placement(_policy(dtype, methods=[("lora", {"rank": 4})])) == (torch.device("cpu"), dtype)
    assert R.placement(_policy(dtype, device="meta")) == (torch.device("meta"), dtype)


def test_placement_without_a_policy_is_the_run_device_in_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert R.placement() == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # dist.init set the local rank's GPU
    assert R.placement() == (torch.device("cuda", 1), torch.float32)


# ----------------------------------------------------------------------------- the loaders honour the placement
def _recording_loader(monkeypatch):
    """load_model that records (path, dtype name, device) and builds the model on the CPU (no GPU here)."""
    calls = []
    real = load_mod.load_model

    def fake(mcfg, device=None):
        calls.append((mcfg.path, mcfg.dtype, device))
        return real(mcfg)

    monkeypatch.setattr(load_mod, "load_model", fake)
    return calls


def test_ppo_and_grpo_reward_model_loads_on_the_run_gpu(monkeypatch, reward_adapter):
    """A GPU run (faked: CUDA available, current device 0) loads the reward model on cuda:0, not on the CPU."""
    calls = _recording_loader(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    R.reward_functions([R.RewardModel(path=reward_adapter, base="tiny:llama")])
    assert calls == [("tiny:llama", "float32", "cuda:0")]


def test_reward_model_and_judge_load_next_to_a_bf16_policy(monkeypatch, reward_adapter):
    calls = _recording_loader(monkeypatch)
    policy = _policy(torch.bfloat16, device="meta")
    R.reward_functions([R.RewardModel(path=reward_adapter, base="tiny:llama")], like=policy)
    state: dict = {}
    rlaif.prepare(_policy(torch.bfloat16, methods=[("lora", {"rank": 4})]),
                  rlaif.Config(judge=rlaif.Judge(model="tiny:llama")), state)
    assert calls == [("tiny:llama", "bfloat16", "meta"), ("tiny:llama", "bfloat16", "cpu")]


@pytest.mark.parametrize("algo", ["grpo", "ppo", "rejection_sampling", "online_dpo"])
def test_online_algorithms_load_their_reward_model_next_to_the_policy(monkeypatch, reward_adapter, algo):
    """Each online algorithm's ``prepare`` hands the policy to the reward builder: a bf16 policy on another device
    (meta here) gets a bf16 reward model on that device."""
    from tuneforge.algorithms import ALGORITHMS

    calls = _recording_loader(monkeypatch)
    mod = ALGORITHMS[algo]
    cfg = mod.Config(rewards=[{"name": "reward_model", "path": reward_adapter, "base": "tiny:llama"}])
    mod.prepare(_policy(torch.bfloat16, device="meta"), cfg, {"tokenizer": char_tokenizer()})
    assert calls and calls[0] == ("tiny:llama", "bfloat16", "meta")


# ------------------------------------------------------------------------------------------ end to end on CPU
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # the head's weights, on meta
def test_reward_model_on_a_meta_policy_is_all_on_meta(reward_adapter):
    scorer = R.ModelScorer(R.RewardModel(path=reward_adapter, base="tiny:llama"), like=_policy(torch.bfloat16, "meta"))
    assert {p.device.type for p in scorer.model.parameters()} == {"meta"}
    assert scorer.model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_bf16_scorer_scores_like_the_fp32_one(reward_adapter):
    """Same reward model, loaded next to an fp32 and a bf16 policy: bf16 base weights, scores within bf16 rounding."""
    cfg = R.RewardModel(path=reward_adapter, base="tiny:llama")
    fp32, bf16 = R.ModelScorer(cfg, like=_policy()), R.ModelScorer(cfg, like=_policy(torch.bfloat16))
    assert bf16.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    tok = char_tokenizer()
    ids = ([[1, 70, 71], [1, 40, 41, 42]], [[72, 73], [43]], (["p", "q"], ["c", "d"]))
    a, b = fp32(*ids, tok), bf16(*ids, tok)
    assert all(math.isfinite(x) for x in a + b)
    assert a != b and max(abs(x - y) for x, y in zip(a, b)) < 0.05 * max(1.0, *map(abs, a))


def test_bf16_judge_labels_like_the_fp32_one():
    judge = rlaif.Judge(model="tiny:llama")
    p32 = rlaif.build_judge(judge, like=_policy())(["ab"], ["ba"], ["ab"])
    j16 = rlaif.build_judge(judge, like=_policy(torch.bfloat16))
    assert j16.model.get_input_embeddings().weight.dtype == torch.bfloat16
    p16 = j16(["ab"], ["ba"], ["ab"])
    assert 0 <= float(p16) <= 1 and abs(float(p16) - float(p32)) < 0.02


def test_a_reward_model_with_its_own_tokenizer_scores_the_joint_encoding(monkeypatch):
    """When the reward model's vocabulary is not the policy's, the texts are re-tokenized. Prompt and completion
    encoded separately differ at the seam from the joint encoding the reward head was trained on (a SentencePiece
    tokenizer puts "▁" before the completion's first word on its own); the scorer must score the training-time
    encoding, as the data pipeline builds it."""
    from _tokenizers import llama2_like

    from tuneforge.algorithms import reward as reward_mod
    from tuneforge.data.tokenize import Encoder

    tok = llama2_like()
    seen = []
    monkeypatch.setattr(reward_mod, "scores", lambda model, batch: (seen.append(batch), torch.zeros(len(batch["input_ids"])))[1])
    scorer = object.__new__(R.ModelScorer)
    scorer.model, scorer.tok, scorer.batch_size, scorer.path, scorer._enc = torch.nn.Linear(1, 1), tok, 8, "rm", None
    prompt, completion = "Answer: ", "four"  # the space ends the prompt: "▁four" only when encoded jointly
    from tuneforge.train.rollout import encode_prompt

    policy_tok = char_tokenizer()
    scorer([encode_prompt(policy_tok, prompt)], [[3]], ([prompt], [completion]), policy_tok)
    head, (tail,) = Encoder(tok, "preference", "rm").encode_responses(prompt, [completion])
    got = [t for t in seen[0]["input_ids"][0].tolist()]
    assert got[:len(head) + len(tail)] == head + tail
    alone = tok(prompt)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]
    assert alone != head + tail[:-1]  # the seam this tokenizer has: separate encoding would have been wrong


def test_a_chat_prompt_is_rescored_with_its_markup_and_ends_as_chat_training_rows_end(monkeypatch):
    """A chat-trained reward model read ``<|im_start|>``-style markers and a response ending at its end-of-turn
    marker; re-tokenizing the policy's prompt must keep those markers (the special-token-free text other rewards
    get has lost them), and the scored sequence must equal the conversational training row."""
    from _tokenizers import smollm2_like

    from tuneforge.algorithms import reward as reward_mod
    from tuneforge.data.tokenize import Encoder
    from tuneforge.train.rollout import encode_prompt

    rm_tok, policy_tok = smollm2_like(), smollm2_like()
    policy_tok.add_tokens(["<extra>"])  # another vocabulary: the scorer re-tokenizes
    seen = []
    monkeypatch.setattr(reward_mod, "scores", lambda model, batch: (seen.append(batch), torch.zeros(len(batch["input_ids"])))[1])
    scorer = object.__new__(R.ModelScorer)
    scorer.model, scorer.tok, scorer.batch_size, scorer.path, scorer._enc = torch.nn.Linear(1, 1), rm_tok, 8, "rm", None
    prompt = [{"role": "user", "content": "Capital of France?"}]
    ids = encode_prompt(policy_tok, prompt)
    scorer([ids], [policy_tok("Paris.")["input_ids"] + [policy_tok.eos_token_id]],
           ([policy_tok.decode(ids, skip_special_tokens=True)], ["Paris."]), policy_tok)
    head, (tail,) = Encoder(rm_tok, "preference", "rm").encode_responses(prompt, [[{"role": "assistant", "content": "Paris."}]])
    got = seen[0]["input_ids"][0].tolist()
    assert got[:len(head) + len(tail)] == head + tail and tail[-1] == rm_tok.eos_token_id
