"""LoRA parity with PEFT (test-only dependency): files load both ways and give the same logits."""

import pytest
import torch

peft = pytest.importorskip("peft")

from tuneforge.methods import apply_methods, load_adapter, save_adapter  # noqa: E402
from tuneforge.methods import lora  # noqa: E402
from tuneforge.models.tiny import build_tiny  # noqa: E402

PRESETS = ["llama", "gpt2", "gpt_neox"]


def _ids():
    return torch.randint(5, 60, (2, 10), generator=torch.Generator().manual_seed(0))


def _randomise(model):
    g = torch.Generator().manual_seed(3)
    for layer in lora.lora_layers(model).values():
        for mod in (layer.lora_A["default"], layer.lora_B["default"]):
            mod.weight.data = torch.randn(mod.weight.shape, generator=g) * 0.2


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("rslora", [False, True])
def test_tuneforge_adapter_loads_in_peft(tmp_path, preset, rslora):
    model, _ = build_tiny(preset)
    cfg = lora.Config(rank=4, alpha=8, rslora=rslora)
    apply_methods(model, [cfg])
    _randomise(model)
    ids = _ids()
    ours = model(ids).logits
    save_adapter(model, [cfg], tmp_path / "ad")
    base, _ = build_tiny(preset)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    assert torch.allclose(pm(input_ids=ids).logits, ours, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_peft_adapter_loads_in_tuneforge(tmp_path, preset):
    base, _ = build_tiny(preset)
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"],
               "gpt_neox": ["query_key_value", "dense_4h_to_h"]}[preset]
    pc = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                         fan_in_fan_out=preset == "gpt2")
    pm = peft.get_peft_model(base, pc)
    ids = _ids()
    theirs = pm(input_ids=ids).logits
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh, _ = build_tiny(preset)
    cfgs = load_adapter(fresh, tmp_path / "peft")
    assert cfgs[0].rank == 4 and sorted(cfgs[0].target_modules) == sorted(targets)
    assert torch.allclose(fresh(ids).logits, theirs, atol=1e-5)


def test_merged_matches_peft_merge(tmp_path):
    model, _ = build_tiny("llama")
    cfg = lora.Config(rank=4, alpha=8)
    apply_methods(model, [cfg])
    _randomise(model)
    save_adapter(model, [cfg], tmp_path / "ad")
    lora.merge(model)
    lora.unload(model)
    base, _ = build_tiny("llama")
    merged = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).merge_and_unload()
    ours, theirs = dict(model.named_parameters()), dict(merged.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
