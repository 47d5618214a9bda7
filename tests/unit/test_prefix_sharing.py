"""Shared-prompt scoring (algorithms/_prefix.py): the packed layout by hand, and the same log-probs and gradients as
scoring every row on its own, on every tiny architecture and both attention implementations."""

import pytest
import torch

from tuneforge.algorithms import _prefix
from tuneforge.algorithms._logps import supervised_token_logps
from tuneforge.models.tiny import build_tiny

I = -100


def _batch(rows):
    """Right-padded batch from (prompt ids, response ids) rows; the prompt is unsupervised."""
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), I)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(p + r)
        labels[b, len(p):n] = torch.tensor(r)
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_packed_layout_by_hand():
    # prompt [11, 12, 13] answered by [21, 22] and by [31]; a row with another prompt stays alone
    batch = _batch([([11, 12, 13], [21, 22]), ([5, 6], [7]), ([11, 12, 13], [31])])
    groups, first, length = _prefix.prompt_groups(batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert groups == [[0, 2], [1]] and first == [3, 2, 3] and length == [5, 3, 4]
    packed, order = _prefix.pack(batch, groups, first, length, torch.bool)
    # prompt[:-1] | prompt[-1] + response 1 | prompt[-1] + response 2
    assert packed["input_ids"][0].tolist() == [11, 12, 13, 21, 22, 13, 31]
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert packed["labels"][0].tolist() == [I, I, I, 21, 22, I, 31]
    assert packed["input_ids"][1, :3].tolist() == [5, 6, 7] and packed["labels"][1, :3].tolist() == [I, I, 7]
    m = packed["attention_mask"][0, 0].int().tolist()
    assert m[5] == [1, 1, 0, 0, 0, 1, 0]  # the second segment's copy of 13 sees 11, 12 and itself only
    assert m[6] == [1, 1, 0, 0, 0, 1, 1]
    assert m[4] == [1, 1, 1, 1, 1, 0, 0]  # the first segment is ordinary causal attention over its own row
    # original supervised order: row 0's 21, 22, row 1's 7, row 2's 31; packed order: 21, 22, 31, 7
    assert order.tolist() == [0, 1, 3, 2]


@pytest.mark.parametrize("preset", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_same_logps_and_gradients_as_separate_rows(preset, attn):
    torch.manual_seed(0)
    model = build_tiny(preset, dtype=torch.float32, attn_implementation=attn)[0]
    V = model.config.vocab_size
    r = lambda n: torch.randint(5, V, (n,)).tolist()  # noqa: E731
    A, B = r(7), r(5)
    batch = _batch([(A, r(4)), (B, r(6)), (A, r(3)), (B, r(2)), (r(6), r(3)), (A, r(5))])

    def run(on):
        _prefix.enable(model, on)
        model.zero_grad()
        logps, keep = supervised_token_logps(model, batch)
        (logps * torch.linspace(0.5, 1.5, logps.numel())).sum().backward()  # a position-dependent weight
        return logps.detach(), keep, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    _prefix.enable(model, True)
    assert _prefix.share_prompts(model, batch) is not None
    (a, ka, ga), (b, kb, gb) = run(False), run(True)
    assert torch.equal(ka, kb)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=1e-4, msg=n)


def test_used_only_where_it_is_exact_and_worth_it():
    model = build_tiny("llama", dtype=torch.float32, attn_implementation="sdpa")[0]
    pair = _batch([([3, 4, 5, 6, 7, 8], [9, 10]), ([3, 4, 5, 6, 7, 8], [11])])
    _prefix.enable(model, False)
    assert _prefix.share_prompts(model, pair) is None  # train.share_prompts: false (and models never trained here)
    _prefix.enable(model, True)
    assert _prefix.share_prompts(model, pair) is not None
    assert _prefix.share_prompts(model, _batch([([3, 4], [9]), ([5, 6], [9])])) is None  # no shared prompt
    left = dict(pair, attention_mask=pair["attention_mask"].flip(1))
    assert _prefix.share_prompts(model, left) is None  # not right-padded
    assert _prefix.share_prompts(model, dict(pair, position_ids=torch.zeros_like(pair["input_ids"]))) is None
    model.config._attn_implementation = "flash_attention_2"  # cannot take a 4D mask
    assert _prefix.share_prompts(model, pair) is None


@pytest.mark.parametrize("algorithm", [{"name": "dpo", "beta": 0.1}, {"name": "orpo", "lam": 0.5},
                                       {"name": "grpo", "num_generations": 4, "max_new_tokens": 6, "beta": 0.04}])
def test_training_with_shared_prompts_follows_the_same_path(tmp_path, algorithm, monkeypatch):
    """A few steps of DPO, ORPO and GRPO (reference KL on) give the same losses with and without sharing."""
    from tuneforge.algorithms import _logps
    from tuneforge.api import train
    from tuneforge.config import load_config
    from tuneforge.tasks import make_examples, preference_pairs, write_jsonl

    if algorithm["name"] == "grpo":
        write_jsonl(make_examples("copy", 16, seed=1), tmp_path / "d.jsonl")
    else:
        write_jsonl(preference_pairs("reverse", 16, seed=1), tmp_path / "d.jsonl")

    def losses(on):
        cfg = load_config({"model": {"path": "tiny:llama"}, "data": {"train": str(tmp_path / "d.jsonl"),
                                                                     "max_len": 64},
                           "method": [{"name": "lora", "rank": 4, "alpha": 8}], "algorithm": algorithm,
                           "train": {"output_dir": str(tmp_path / f"run-{on}"), "max_steps": 3, "batch_size": 4,
                                     "learning_rate": 1e-2, "precision": "fp32", "progress": False,
                                     "tensorboard": False, "share_prompts": on}})
        return [h["loss"] for h in train(cfg).result.history]

    used = []
    real = _logps.share_prompts
    monkeypatch.setattr(_logps, "share_prompts", lambda m, b: used.append(real(m, b) is not None) or real(m, b))
    shared = losses(True)
    assert any(used)  # the batches were packed
    separate = losses(False)
    assert shared == pytest.approx(separate, abs=1e-5)


def _tiny_hf(kind, **kw):
    """A 2-layer model of another architecture, built from its config."""
    import transformers as T

    torch.manual_seed(0)
    cfg = getattr(T, f"{kind}Config")(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, **kw)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    _prefix.enable(model, True)
    return model


def _pairs(n_prompt=8, n_resp=6):
    p = list(range(10, 10 + n_prompt))
    return _batch([(p, list(range(30, 30 + n_resp))), (p, list(range(40, 40 + n_resp)))])


def test_refused_where_the_packed_mask_would_not_be_the_models_own():
    # a sliding window shorter than a row: the model's windowed mask is not plain causal attention
    mistral = _tiny_hf("Mistral", num_key_value_heads=2, sliding_window=8)
    assert _prefix.share_prompts(mistral, _pairs()) is None
    assert _prefix.share_prompts(_tiny_hf("Mistral", num_key_value_heads=2, sliding_window=64), _pairs()) is not None
    # ALiBi builds its biases from the 2D mask (Bloom), MPT takes no position_ids
    import transformers as T

    bloom = T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).eval()
    _prefix.enable(bloom, True)
    assert _prefix.share_prompts(bloom, _pairs()) is None
    llama = build_tiny("llama", dtype=torch.float32, attn_implementation="sdpa")[0].eval()
    _prefix.enable(llama, True)
    # a supervised label on padding cannot be placed in the packed row
    batch = _pairs()
    assert _prefix.share_prompts(llama, batch) is not None
    batch["attention_mask"][1, -1] = 0
    assert _prefix.share_prompts(llama, batch) is None
    # dropout active: a shared prompt would share one dropout mask
    llama.train()
    llama.model.add_module("drop", torch.nn.Dropout(0.1))
    assert _prefix.share_prompts(llama, _pairs()) is None
    llama.eval()
    assert _prefix.share_prompts(llama, _pairs()) is not None


def test_refused_where_packing_costs_more_than_it_saves():
    """A shared pair among many unrelated rows: each row is padded to the packed length. A short prompt before
    long responses: the packed row's attention grows with its length squared."""
    model = build_tiny("llama", dtype=torch.float32, attn_implementation="sdpa")[0]
    _prefix.enable(model, True)
    r = lambda a, n: list(range(a, a + n))  # noqa: E731
    few = [(r(10, 12), r(30, 4)), (r(10, 12), r(40, 4))] + [(r(5 + k, 12), r(50, 4)) for k in range(10)]
    assert _prefix.share_prompts(model, _batch(few)) is None
    assert _prefix.share_prompts(model, _batch(few[:2])) is not None
    long = [(r(10, 2), [50 + (k + j) % 40 for j in range(60)]) for k in range(8)]
    assert _prefix.share_prompts(model, _batch(long)) is None


def test_value_head_path_shares_like_the_log_probs():
    """PPO reads policy log-probs and values from ``token_logps_and_hidden`` and the reference from
    ``token_logps_from_model``: both pack the same rows, so their log-probs agree exactly at equal weights."""
    from tuneforge.algorithms._logps import token_logps_and_hidden, token_logps_from_model

    model = build_tiny("llama", dtype=torch.float32, attn_implementation="sdpa")[0].eval()
    batch = _pairs(12, 5)
    _prefix.enable(model, True)
    with torch.no_grad():
        a, mask, hidden = token_logps_and_hidden(model, batch)
        b, _ = token_logps_from_model(model, batch)
        _prefix.enable(model, False)
        c, _, hidden_plain = token_logps_and_hidden(model, batch)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    keep = mask.bool()
    torch.testing.assert_close(hidden[keep], hidden_plain[keep], atol=1e-5, rtol=1e-5)
    assert not hidden[~keep].any()
