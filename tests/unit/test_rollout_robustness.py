"""The rollout engine's two cheap guarantees: a failure while packing oneDNN weights leaves no patched forward
behind (the layers would otherwise run stale packed weights during training), and stop strings are found by
decoding a bounded tail of the completion (linear, not quadratic, in its length) with the same answers as decoding
all of it."""

import random

import pytest
import torch

import tuneforge.train.rollout as R
from tuneforge.methods import apply_methods
from tuneforge.methods.lora import Config as LoraConfig
from tuneforge.models.tiny import build_tiny


def _patched(model):
    return [n for n, m in model.named_modules() if "forward" in vars(m) or "base_forward" in vars(m)]


def test_onednn_linears_restores_layers_when_packing_fails_part_way(monkeypatch):
    model, _ = build_tiny("llama", seed=0)
    apply_methods(model, [LoraConfig(name="lora", rank=4)])
    real, calls = R._folded_weight, {"n": 0}

    def fail_on_third(m):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("packing failed")
        return real(m)

    monkeypatch.setattr(R, "_folded_weight", fail_on_third)
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("no oneDNN on this build")
    with pytest.raises(RuntimeError, match="packing failed"):
        with R.onednn_linears(model, 4):
            pass
    assert calls["n"] == 3 and _patched(model) == []


class _CountingTok:
    """Wraps a tokenizer and records how many ids each decode call received."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kw):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kw)


def _first_stop_full_decode(tok, ids, stop):
    for t in range(1, len(ids) + 1):
        if any(s in tok.decode(ids[:t], skip_special_tokens=True) for s in stop):
            return t
    return None


def _first_stop_stopper(stopper, ids):
    for t in range(1, len(ids) + 1):
        if stopper.done(ids[t - 1], ids[:t]):
            return t
    return None


def test_stop_strings_tail_decoding_equals_full_decoding_and_is_bounded():
    _, tok = build_tiny("llama", seed=0)
    rng = random.Random(0)
    alphabet = tok("abc xyz:;\n", add_special_tokens=False)["input_ids"]
    for trial in range(60):
        ids = [rng.choice(alphabet) for _ in range(rng.randint(1, 120))]
        stop = [rng.choice(["c x", ";\n", "zz", "a:b", "xyz:;"])]
        counting = _CountingTok(tok)
        got = _first_stop_stopper(R._Stopper(counting, set(), stop), ids)
        assert got == _first_stop_full_decode(tok, ids, stop), (trial, stop)
        assert max(counting.lengths) <= max(len(x.encode()) for x in stop) + R._Stopper.TAIL_SLACK  # bounded work per token
