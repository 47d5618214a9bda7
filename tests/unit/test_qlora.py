"""QLoRA: LoRA on an NF4/int8 base. The quantised base is the dequantised weights exactly; only LoRA trains; the
adapter is PEFT's LoRA layout; merge gives a plain float model equal to the unmerged one."""

import json

import pytest
import torch
from conftest import base_config

from tuneforge.config import RunConfig
from tuneforge.methods import apply_methods, load_adapter, lora, merge_methods, qlora, save_adapter
from tuneforge.methods._inject import trainable_parameters
from tuneforge.models.tiny import build_tiny

IDS = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomise(model, scale=0.1):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_equals_lora_on_the_dequantised_base(bits):
    model, _ = build_tiny("llama")
    cfg = qlora.Config(rank=4, bits=bits)
    apply_methods(model, [cfg])
    _randomise(model)
    model.eval()
    ours = model(IDS).logits
    qlora.dequantize_base_(model)  # same adapters, now on float copies of exactly the dequantised weights
    assert not qlora.quantized_layers(model)
    assert torch.allclose(model(IDS).logits, ours, atol=1e-5)


def test_nf4_base_is_at_most_0_3x_of_16_bit_weights():
    model, _ = build_tiny("llama-bench")
    n16 = sum(m.weight.numel() * 2 for m in qlora.arch.linear_modules(model).values())
    before, after = qlora.quantize_base_(model, qlora.Config())
    assert before == n16 * 2  # fp32 bytes
    assert after / n16 <= 0.3, after / n16
    assert after / n16 == pytest.approx(4.127 / 16, abs=0.002)


def test_adapter_is_peft_lora_and_reloads_as_qlora(tmp_path):
    model, _ = build_tiny("llama")
    cfg = qlora.Config(rank=4)
    apply_methods(model, [cfg])
    _randomise(model)
    model.eval()
    ours = model(IDS).logits
    save_adapter(model, [cfg], tmp_path / "ad")
    d = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert d["peft_type"] == "LORA" and d["r"] == 4 and not any(k.startswith("tuneforge") for k in d)  # PEFT's keys only
    record = json.loads((tmp_path / "ad" / "tuneforge_adapter.json").read_text())
    assert record["tuneforge_method"][0]["name"] == "qlora"
    fresh, _ = build_tiny("llama")
    cfgs = load_adapter(fresh, tmp_path / "ad")
    assert cfgs[0].name == "qlora" and qlora.quantized_layers(fresh)
    assert torch.equal(fresh.eval()(IDS).logits, ours)
    peft = pytest.importorskip("peft")
    base, _ = build_tiny("llama")
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # no "Unexpected keyword arguments ... upgrade PEFT"
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()  # the 16-bit base, as PEFT users do
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
    plain, _ = build_tiny("llama")
    lcfg = lora.Config(**{k: v for k, v in cfgs[0].lora_config().model_dump().items() if k != "name"})
    apply_methods(plain, [lcfg])
    lora.load_state_dict(plain, lcfg, qlora.state_dict(fresh), "default")
    assert torch.allclose(pm(input_ids=IDS).logits, plain.eval()(IDS).logits, atol=1e-5)


def test_gpt2_merge_gives_a_plain_model_that_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = build_tiny("gpt2")
    cfg = qlora.Config(rank=4)
    apply_methods(model, [cfg])
    _randomise(model)
    model.eval()
    ours = model(IDS).logits
    merge_methods(model, [cfg])
    assert not qlora.quantized_layers(model) and not lora.lora_layers(model)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(again(IDS).logits, ours, atol=1e-5)


def test_training_moves_only_lora_and_never_the_codes(tmp_path, pc_file):
    from tuneforge import api

    d = base_config(tmp_path, pc_file, max_steps=3, learning_rate=1e-2)
    d["method"] = [{"name": "qlora", "rank": 4}]
    seen = {}

    def grab(loop):
        if not seen:
            seen["loop"] = loop
            seen["codes"] = {n: b.clone() for n, b in loop.model.named_buffers() if "qweight" in n}

    api.train(RunConfig.model_validate(d), hooks={"after_clip": grab})
    loop = seen["loop"]
    assert seen["codes"] and all(".lora_" in n for n in loop.params)
    assert all(torch.equal(b, seen["codes"][n]) for n, b in loop.model.named_buffers() if "qweight" in n)


def test_adapters_saved_with_tuneforge_method_inside_adapter_config_still_load(tmp_path):
    """The layout before tuneforge_adapter.json: the method record inside adapter_config.json."""
    model, _ = build_tiny("llama")
    cfg = qlora.Config(rank=4)
    apply_methods(model, [cfg])
    _randomise(model)
    ours = model.eval()(IDS).logits
    save_adapter(model, [cfg], tmp_path / "ad")
    side = tmp_path / "ad" / "tuneforge_adapter.json"
    d = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    d["tuneforge_method"] = json.loads(side.read_text())["tuneforge_method"]
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(d))
    side.unlink()
    fresh, _ = build_tiny("llama")
    assert load_adapter(fresh, tmp_path / "ad")[0].name == "qlora"
    assert torch.equal(fresh.eval()(IDS).logits, ours)
