"""The reference policy of DPO/PPO/GRPO for compositions of adapters: which tensors are an adapter's is asked of the
methods, so ``[lora, ia3]`` (LoRA nested under the IA3 wrapper's ``base_layer``) runs its reference with the adapters
off instead of holding a frozen copy of the whole model, and its reference log-probs are the base model's."""

import pytest
import torch

from tuneforge.algorithms import dpo, grpo, ppo
from tuneforge.algorithms._reference import reference_sequence_logps, reference_token_logps
from tuneforge.algorithms._logps import sequence_logps_from_model, token_logps_from_model
from tuneforge.methods import METHODS, adapter_tensors, apply_methods
from tuneforge.methods._inject import trainable_parameters
from tuneforge.methods._scope import adapter_layers
from tuneforge.models.tiny import build_tiny

COMPOSITIONS = {
    "lora+ia3": [("lora", {"rank": 4}), ("ia3", {})],
    "ia3+lora": [("ia3", {}), ("lora", {"rank": 4})],
    "dora+ia3+lokr": [("lora", {"rank": 4, "dora": True}), ("ia3", {}), ("lokr", {"rank": 2})],
    "lora+sparse": [("lora", {"rank": 4}), ("sparse", {"density": 0.05, "selection": "magnitude"})],
}
ALGORITHMS = {"dpo": (dpo, dpo.Config), "grpo": (grpo, grpo.Config), "ppo": (ppo, ppo.Config)}


def composed(key):
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS[n].Config(**kw) for n, kw in COMPOSITIONS[key]])
    return model


def _perturb_adapters(model, scale=0.2):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _batch():
    ids = torch.randint(5, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _tensor_count(state: dict) -> int:
    return sum(p.numel() for p in state["reference_model"].parameters()) if "reference_model" in state else 0


@pytest.mark.parametrize("algo", list(ALGORITHMS))
@pytest.mark.parametrize("key", list(COMPOSITIONS))
def test_composition_reference_is_adapters_off_without_a_copy(key, algo):
    """Before the fix the nested LoRA tensors were taken for base weights (named ``base_layer.*`` from the outer
    wrapper): ``auto`` chose a frozen copy (+100% model parameters) and explicit ``adapters_off`` was refused."""
    mod, cfg = ALGORITHMS[algo]
    for mode in ("auto", "adapters_off"):
        model = composed(key)
        state: dict = {}
        mod.prepare(model, cfg(reference=mode), state)
        assert state["reference_mode"] == "adapters_off"
        assert _tensor_count(state) == 0  # no second copy of the weights


def test_composition_reference_logps_equal_the_base_model():
    base, _ = build_tiny("llama")
    model = composed("lora+ia3")
    _perturb_adapters(model)  # the policy now differs from the base, its reference must not
    state: dict = {}
    dpo.prepare(model, dpo.Config(), state)
    batch = _batch()
    with torch.no_grad():
        want = sequence_logps_from_model(base.eval(), batch)[0]
        policy = sequence_logps_from_model(model, batch)[0]
    assert (policy - want).abs().max() > 1e-3
    torch.testing.assert_close(reference_sequence_logps(model, batch, state), want, rtol=0, atol=1e-5)
    with torch.no_grad():
        want_tok = token_logps_from_model(base, batch)[0]
    torch.testing.assert_close(reference_token_logps(model, batch, state), want_tok, rtol=0, atol=1e-5)


def test_adapters_off_is_refused_naming_a_trained_base_tensor():
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS["freeze"].Config(top_k=1), METHODS["lora"].Config(rank=4)])
    with pytest.raises(ValueError, match=r"trains the model's own model\.layers\.1\..*reference: copy"):
        dpo.prepare(model, dpo.Config(reference="adapters_off"), {})
    state: dict = {}
    dpo.prepare(model, dpo.Config(), state)
    assert state["reference_mode"] == "copy"


@pytest.mark.parametrize("key", list(COMPOSITIONS))
def test_declared_adapter_tensors_are_exactly_what_each_layer_adds(key):
    """A layer type's ``ADAPTER_TENSORS`` (what the reference and weight decay rely on) lists every tensor the layer
    adds on top of its base and nothing of its base, also when the base is another method's layer; together the
    layers claim every trainable tensor once."""
    model = composed(key)
    claimed: list[int] = []
    for layer in adapter_layers(model):
        base = {id(p) for p in layer.base_parameters()}
        structural = {id(p) for p in layer.parameters() if id(p) not in base}
        declared = {id(p) for p, _ in layer.adapter_tensors().values()}
        assert type(layer).ADAPTER_TENSORS and declared == structural, type(layer).__name__
        claimed += sorted(declared)
    assert len(claimed) == len(set(claimed))
    assert {id(p) for p in trainable_parameters(model).values()} == set(adapter_tensors(model))
