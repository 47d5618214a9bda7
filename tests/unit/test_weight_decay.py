"""Weight decay is each method's decision, never the tensor's shape: IA3's scaling vectors ((out, 1) / (1, in),
identity 1) and DoRA's magnitude (identity ||W0||) do not decay; LoRA's A/B, LoKr's factors and sparse ΔW values do;
the model's own tensors decay except biases and norm parameters."""

import pytest
import torch

from tuneforge.algorithms.ppo import attach_value_head
from tuneforge.config import TrainConfig
from tuneforge.methods import METHODS, apply_methods, weight_decays
from tuneforge.methods._inject import trainable_parameters
from tuneforge.models.tiny import build_tiny
from tuneforge.train.optim import make_optimizer

LR, WD, STEPS = 0.01, 0.1, 100


def _model(*cfgs, preset="llama"):
    model, _ = build_tiny(preset)
    apply_methods(model, [METHODS[n].Config(**kw) for n, kw in cfgs])
    return model


def _decays(model) -> dict[str, bool]:
    return weight_decays(model, trainable_parameters(model))


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_zero_gradient_golden_ia3_stays_at_one_lora_decays(optimizer):
    """AdamW with no gradient only applies decoupled decay: p <- p (1 - lr wd) per step. Before the fix IA3's vectors
    (2-D) decayed: 1.0 -> 0.999^100 = 0.904792 after 100 steps; now they stay at 1.0. LoRA's A decays by the same
    factor, its B (0 at init) stays 0."""
    model = _model(("lora", {"rank": 4}), ("ia3", {}))
    params = trainable_parameters(model)
    start = {n: p.detach().clone() for n, p in params.items()}
    tcfg = TrainConfig(learning_rate=LR, weight_decay=WD, optimizer=optimizer)
    opt = make_optimizer(params, tcfg, model)
    for _ in range(STEPS):
        for p in params.values():
            p.grad = torch.zeros_like(p)
        opt.step()
    ia3 = [n for n in params if ".ia3_l." in n]
    lora_a = [n for n in params if ".lora_A." in n]
    assert ia3 and lora_a
    for n in ia3:
        assert torch.equal(params[n], torch.ones_like(params[n])), n
    factor = (1 - LR * WD) ** STEPS
    assert factor == pytest.approx(0.904792, abs=1e-6)
    for n in lora_a:
        torch.testing.assert_close(params[n], start[n] * factor, rtol=1e-5, atol=1e-7)
    for n in (n for n in params if ".lora_B." in n):
        assert torch.equal(params[n], start[n])


def _by_kind(decays: dict[str, bool], *kinds) -> dict[str, set[bool]]:
    out: dict[str, set[bool]] = {}
    for n, d in decays.items():
        kind = next((k for k in kinds if k in n), "other")
        out.setdefault(kind, set()).add(d)
    return out


@pytest.mark.parametrize("cfgs,expected", [
    ([("lora", {"rank": 4})], {".lora_A.": {True}, ".lora_B.": {True}}),
    ([("qlora", {"rank": 4})], {".lora_A.": {True}, ".lora_B.": {True}}),
    ([("lora", {"rank": 4, "dora": True})], {".lora_A.": {True}, ".lora_B.": {True},
                                            ".lora_magnitude_vector.": {False}}),
    ([("ia3", {})], {".ia3_l.": {False}}),
    ([("lokr", {"rank": 2})], {".lokr_w": {True}}),
    ([("sparse", {"density": 0.05, "selection": "magnitude"})], {".sp_values.": {True}}),
    ([("bitfit", {"add_bias": True})], {".bias": {False}}),
    ([("lora", {"rank": 4}), ("ia3", {}), ("lokr", {"rank": 2})],
     {".lora_A.": {True}, ".lora_B.": {True}, ".ia3_l.": {False}, ".lokr_w": {True}}),
])
def test_each_method_declares_what_decays(cfgs, expected):
    decays = _decays(_model(*cfgs))
    assert _by_kind(decays, *expected) == expected


def test_diff_pruning_tensors_never_decay():
    """Its regulariser is the L0 penalty: decay would pull log α toward 0 (gates half open) and shrink the diff."""
    decays = _decays(_model(("diff_pruning", {"density": 0.01})))
    assert _by_kind(decays, ".dp_w.", ".dp_log_alpha.") == {".dp_w.": {False}, ".dp_log_alpha.": {False}}


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_the_models_own_tensors_decay_except_biases_and_norms(preset):
    """full / freeze / heads: what the old ``ndim >= 2`` rule meant (HF Trainer practice), decided by the module that
    holds each tensor: GPT-2's Conv1D weights and embeddings decay, its biases and LayerNorms do not."""
    model = _model(("full", {}), preset=preset)
    attach_value_head(model)
    decays = _decays(model)
    norms = {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    for n, d in decays.items():
        owner, leaf = n.rpartition(".")[0], n.rpartition(".")[2]
        want = not (leaf == "bias" or owner in norms)
        assert d is want, n
        if preset == "gpt2" and n.endswith(("c_attn.weight", "wte.weight")):
            assert d
    assert decays["value_head.weight"] and not decays["value_head.bias"]
    assert any(decays.values()) and not all(decays.values())


def test_freeze_decays_block_matrices_not_its_norms():
    decays = _decays(_model(("freeze", {"top_k": 1})))
    assert decays["model.layers.1.mlp.up_proj.weight"] and decays["model.layers.1.self_attn.q_proj.weight"]
    assert not decays["model.layers.1.input_layernorm.weight"]
