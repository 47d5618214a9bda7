"""Policy optimisation is the update its equations describe: π, π_old and π_ref are scored at the sampling
temperature, dropout is off where two forwards must agree (DPO log 2, PPO ratio 1, GRPO KL 0 at the start), and
PPO's whitening statistics and minibatches are functions of the global batch (the 2-process case is in
tests/e2e/test_distributed.py)."""

import json
import math
from collections import Counter

import pytest
import torch
from conftest import base_config, write_jsonl
from torch import nn

from tuneforge import api
from tuneforge.algorithms import ALGORITHMS, grpo, ppo
from tuneforge.algorithms import _online as O
from tuneforge.algorithms import rewards as R
from tuneforge.algorithms._dropout import config_dropout_restored, disable_dropout, dropout_disabled
from tuneforge.algorithms._logps import token_logps_and_hidden, token_logps_from_model
from tuneforge.config import load_config
from tuneforge.data import build_dataset, collate
from tuneforge.methods import METHODS, apply_methods
from tuneforge.models.tiny import build_tiny, save_tiny
from tuneforge.tasks import make_examples, preference_pairs
from tuneforge.train.loop import StepContext

REWARDS = [R.Length(target=3), R.Similarity()]
T = 0.5


def _policy(attention_dropout: float = 0.0, lora_dropout: float = 0.0):
    model, tok = build_tiny("llama")
    apply_methods(model, [METHODS["lora"].Config(rank=4, dropout=lora_dropout)])
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = attention_dropout
    return model, tok


def _rows(tmp_path, tok, n=3):
    return list(build_dataset(write_jsonl(tmp_path / "pc.jsonl", make_examples("copy", n, seed=3)), tok,
                              max_len=64).rows)


def _ctx(tok, state=None):
    return StepContext(normaliser=0.0, step=0, algo_state={"tokenizer": tok, **(state or {})}, seed=0,
                       micro_batch=8)


def _grpo_experience(tmp_path, model, tok, **cfg):
    cfg = grpo.Config(temperature=T, num_generations=2, beta=0.1, max_new_tokens=6, rewards=REWARDS, **cfg)
    ctx = _ctx(tok)
    grpo.prepare(model, cfg, ctx.algo_state)
    rows = _rows(tmp_path, tok)
    model.eval()  # as the loop rolls out
    exp = grpo.make_experience(model, rows, cfg, ctx)
    ctx.normaliser = exp.weights[0]
    return cfg, ctx, rows, exp


def _ppo_experience(tmp_path, model, tok):
    cfg = ppo.Config(temperature=T, ppo_epochs=1, num_minibatches=1, max_new_tokens=6, rewards=REWARDS)
    ctx = _ctx(tok)
    ppo.prepare(model, cfg, ctx.algo_state)
    rows = _rows(tmp_path, tok)
    model.eval()
    exp = ppo.make_experience(model, rows, cfg, ctx)
    ctx.normaliser = exp.weights[0]
    return cfg, ctx, rows, exp


# ------------------------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("biased_head", [False, True], ids=["fused_head", "model_head"])
def test_token_logps_at_a_temperature_are_log_softmax_of_the_tempered_logits(tmp_path, biased_head):
    model, tok = _policy()
    if biased_head:  # z / T ≠ W (h / T) + b: this head must take the model's own forward
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    batch = collate(_rows(tmp_path, tok), 0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    want = torch.log_softmax(logits / T, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0] * keep
    with torch.no_grad():
        got, mask = token_logps_from_model(model, batch, T)
        got_h, _, hidden = token_logps_and_hidden(model, batch, T)
        plain, _ = token_logps_from_model(model, batch)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_h, want, atol=1e-5)
    assert hidden.shape[:2] == keep.shape and torch.equal(mask.bool(), keep)
    assert not torch.allclose(plain, want, atol=1e-2)  # at T = 1 these are other numbers


def test_grpo_scores_pi_old_pi_and_reference_at_the_sampling_temperature(tmp_path):
    model, tok = _policy()
    cfg, ctx, rows, exp = _grpo_experience(tmp_path, model, tok, num_iterations=2)
    roll, _ = O.roll_out(model, rows, cfg.num_generations, cfg, ctx)  # the same per-request seeds: same samples
    batch = exp.updates[0][0]
    resp = batch["labels"][:, 1:] != -100
    sampled = roll.logprobs[roll.mask.bool()]  # log softmax(z / T) of each sampled token, from the rollout
    assert torch.allclose(batch["old_logps"][resp], sampled, atol=1e-5)
    assert torch.allclose(batch["ref_logps"][resp], sampled, atol=1e-5)  # LoRA B = 0: π_ref = π at step 0
    model.train()
    _, m = grpo.step(model, batch, cfg, ctx)
    assert m["kl"] == pytest.approx(0.0, abs=1e-7) and m["clip_fraction"] == 0.0
    with torch.no_grad():
        assert torch.allclose(token_logps_from_model(model, batch, T)[0][resp], sampled, atol=1e-5)


def test_ppo_scores_pi_old_pi_and_reference_at_the_sampling_temperature(tmp_path):
    model, tok = _policy()
    cfg, ctx, rows, exp = _ppo_experience(tmp_path, model, tok)
    roll, _ = O.roll_out(model, rows, 1, cfg, ctx)
    batch = exp.updates[0][0]
    resp = batch["response_mask"].bool()
    assert torch.allclose(batch["old_logps"][resp], roll.logprobs[roll.mask.bool()], atol=1e-5)
    assert exp.metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # π_old vs π_ref, both tempered
    model.train()
    with torch.no_grad():
        logp = ppo.policy_and_values(model, batch, cfg.temperature)[0]
    assert torch.allclose(torch.exp(logp - batch["old_logps"])[resp], torch.ones(int(resp.sum())), atol=1e-6)


# ---------------------------------------------------------------------------------------------- dropout
def test_algorithm_dropout_defaults():
    got = {name: dropout_disabled(None, mod) for name, mod in ALGORITHMS.items()}
    assert got == {"sft": False, "reward": False, "dpo": True, "orpo": True, "grpo": True, "ppo": True,
                   "rejection_sampling": False, "online_dpo": True, "rlaif": True, "classification": False}
    assert dropout_disabled(False, ALGORITHMS["dpo"]) is False and dropout_disabled(True, ALGORITHMS["sft"]) is True


@pytest.mark.parametrize("method", [{"name": "lora", "rank": 4, "dropout": 0.5},
                                    {"name": "lokr", "rank": 4, "rank_dropout": 0.5, "module_dropout": 0.5}],
                         ids=["lora", "lokr"])
def test_disable_dropout_makes_train_mode_forwards_equal_the_eval_forward(method):
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS[method["name"]].Config(**{k: v for k, v in method.items() if k != "name"})])
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.3
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:  # adapters away from their identity init, so their dropout changes the output
                p.normal_(0, 0.2)
    x = torch.randint(3, 60, (2, 12))
    with torch.no_grad():
        model.eval()
        ref = model(input_ids=x).logits
        model.train()
        torch.manual_seed(0)
        noisy = model(input_ids=x).logits
        assert not torch.allclose(noisy, ref, atol=1e-4)  # dropout is on in train mode
        assert disable_dropout(model) > 0
        for seed in (0, 1):
            torch.manual_seed(seed)
            assert torch.allclose(model(input_ids=x).logits, ref, atol=1e-6)
    assert model.training and disable_dropout(model) == 0


def test_disable_dropout_reaches_rates_read_from_the_config_and_saving_keeps_them(tmp_path):
    """Falcon reads hidden_dropout / attention_dropout from its config at every forward (no module holds them):
    switching modules off alone (TRL's way) leaves train-mode forwards noisy. The saved model keeps its rates."""
    from transformers import AutoModelForCausalLM, FalconConfig

    cfg = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       hidden_dropout=0.3, attention_dropout=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    x = torch.randint(3, 60, (2, 12))
    with torch.no_grad():
        ref = model.eval()(input_ids=x).logits
        model.train()
        assert not torch.allclose(model(input_ids=x).logits, ref, atol=1e-4)
        assert disable_dropout(model) > 0
        for seed in (0, 1):
            torch.manual_seed(seed)
            assert torch.allclose(model(input_ids=x).logits, ref, atol=1e-6)
    with config_dropout_restored(model):
        model.save_pretrained(tmp_path / "m", safe_serialization=True)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["hidden_dropout"] == 0.3 and saved["attention_dropout"] == 0.3
    assert model.config.hidden_dropout == 0.0  # still off for the rest of the run


def test_disable_dropout_reaches_pdrop_rates():
    """DBRX keeps ``resid_pdrop`` on its blocks (GPT-2's naming) and passes it to F.dropout at each forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("dbrx", d_model=32, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=64,
                               resid_pdrop=0.5, emb_pdrop=0.0,
                               attn_config={"kv_n_heads": 2, "attn_pdrop": 0.0, "rope_theta": 10000.0, "clip_qkv": 8.0},
                               ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 2, "moe_top_k": 1})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).train()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)
        assert disable_dropout(model) > 0
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_grpo_kl_is_zero_and_ppo_ratio_one_at_step_0_with_dropout_off(tmp_path):
    for off in (True, False):
        model, tok = _policy(attention_dropout=0.3, lora_dropout=0.3)
        if off:
            disable_dropout(model)
        cfg, ctx, _, exp = _grpo_experience(tmp_path, model, tok)
        model.train()
        torch.manual_seed(0)
        kl = grpo.step(model, exp.updates[0][0], cfg, ctx)[1]["kl"]
        assert kl == pytest.approx(0.0, abs=1e-7) if off else kl > 1e-4
        model, tok = _policy(attention_dropout=0.3, lora_dropout=0.3)
        if off:
            disable_dropout(model)
        cfg, ctx, _, exp = _ppo_experience(tmp_path, model, tok)
        batch = exp.updates[0][0]
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            ratio = torch.exp(ppo.policy_and_values(model, batch, cfg.temperature)[0] - batch["old_logps"])
        dev = float((ratio - 1).abs().max())
        assert dev < 1e-6 if off else dev > 1e-3


@pytest.fixture
def dropout_model(tmp_path):
    """A tiny Llama directory whose config has attention dropout 0.3."""
    path = tmp_path / "tiny-dropout"
    save_tiny("llama", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["attention_dropout"] = 0.3
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("disable", [None, False], ids=["default", "dropout_kept"])
def test_dpo_starts_at_log_2_and_accuracy_one_half_with_dropout_off_by_default(tmp_path, dropout_model, disable):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs("reverse", 16, seed=1))
    d = base_config(tmp_path, pairs, max_steps=1, disable_dropout=disable)
    d["model"] = {"path": dropout_model}
    d["method"] = [{"name": "lora", "rank": 4, "dropout": 0.3}]
    d["algorithm"] = {"name": "dpo", "beta": 0.5}
    first = api.train(load_config(d)).result.history[0]
    if disable is None:  # policy = reference exactly: L = log 2, margin 0, every pair a tie (accuracy ½)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["reward_margin"] == pytest.approx(0.0, abs=1e-7) and first["preference_accuracy"] == 0.5
    else:  # the model's attention dropout is still on in the policy's forward
        assert abs(first["loss"] - math.log(2)) > 1e-4


# ---------------------------------------------------------------------------------------- PPO under DDP
def _as_processes(fn, parts):
    """``fn(part, reduce)`` run for every part in its own thread, ``reduce`` summing over the threads (a stand-in for
    an all-reduce across processes)."""
    import threading

    barrier, slots, out = threading.Barrier(len(parts)), [None] * len(parts), [None] * len(parts)

    def run(k):
        def reduce(t):
            slots[k] = t.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0])
            barrier.wait()  # every thread has read the slots before any overwrites its own
            return total
        out[k] = fn(parts[k], reduce)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_global_mean_std_is_the_whole_batch_statistics_however_it_is_split():
    x = torch.randn(37, generator=torch.Generator().manual_seed(0))
    mean, std = ppo.global_mean_std(x)
    assert torch.allclose(mean, x.mean(), atol=1e-7) and torch.allclose(std, x.std(), atol=1e-6)
    for parts in ([x[:20], x[20:]], [x[:5], x[5:5], x[5:]]):  # uneven shares, and a process with none
        for m, s in _as_processes(ppo.global_mean_std, parts):
            assert torch.allclose(m, x.mean(), atol=1e-7) and torch.allclose(s, x.std(), atol=1e-6)
    assert ppo.global_mean_std(torch.ones(1))[1] == 0.0 and ppo.global_mean_std(torch.zeros(0))[1] == 0.0


def test_minibatches_are_a_balanced_function_of_the_global_batch_only():
    ids = list(range(100, 111))
    part = ppo.minibatch_of(ids, 3, seed=7)
    assert sorted(part) == ids and sorted(Counter(part.values()).values()) == [3, 4, 4]
    assert ppo.minibatch_of(ids[::-1], 3, seed=7) == part  # however the ids are laid out over processes
    assert ppo.minibatch_of(ids, 3, seed=8) != part  # reshuffled every (step, epoch)
    assert ppo.minibatch_of([], 2, seed=7) == {}


def test_completion_records_split_and_rejoin_into_the_same_batch(tmp_path):
    model, tok = _policy()
    cfg, ctx, rows, exp = _ppo_experience(tmp_path, model, tok)
    batch = exp.updates[0][0]
    train_rows = [{"input_ids": i[:n].tolist(), "labels": lab[:n].tolist()} for i, lab, n in
                  zip(batch["input_ids"], batch["labels"], batch["attention_mask"].sum(1))]
    again = ppo.join_samples(ppo.split_samples(batch, train_rows), tok, torch.device("cpu"))
    assert set(again) == set(batch) and all(torch.equal(again[k], batch[k]) for k in batch)
    one = ppo.join_samples(ppo.split_samples(batch, train_rows)[1:2], tok, torch.device("cpu"))
    n = int(batch["attention_mask"][1].sum())
    assert one["input_ids"].shape == (1, n) and torch.equal(one["advantages"][0], batch["advantages"][1, :n - 1])
