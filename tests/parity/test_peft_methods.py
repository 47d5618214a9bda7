"""DoRA, IA3 and LoKr parity with PEFT: the same weights give the same logits, files load both ways, merges agree."""

import pytest
import torch

peft = pytest.importorskip("peft")

from tuneforge.methods import apply_methods, load_adapter, merge_methods, save_adapter  # noqa: E402
from tuneforge.methods import ia3, lokr, lora  # noqa: E402
from tuneforge.methods._inject import trainable_parameters  # noqa: E402
from tuneforge.models.tiny import build_tiny  # noqa: E402

DORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt_neox": ["query_key_value", "dense_4h_to_h"]}
CASES = {  # name -> (our config, PEFT config, presets PEFT supports)
    "dora": (lambda: lora.Config(rank=4, alpha=8, dora=True),
             lambda p: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=DORA_TARGETS[p],
                                       init_lora_weights=False), ["llama", "gpt_neox"]),
    "ia3": (lambda: ia3.Config(), lambda p: peft.IA3Config(init_ia3_weights=False), ["llama", "gpt2", "gpt_neox"]),
    "lokr": (lambda: lokr.Config(rank=2, alpha=4), lambda p: peft.LoKrConfig(
        r=2, alpha=4, target_modules=["q_proj", "k_proj", "up_proj"], init_weights=False), ["llama"]),
    "lokr_both": (lambda: lokr.Config(rank=2, alpha=4, decompose_both=True, decompose_factor=4),
                  lambda p: peft.LoKrConfig(r=2, alpha=4, decompose_both=True, decompose_factor=4,
                                          target_modules=["o_proj", "gate_proj"], init_weights=False), ["llama"]),
}
PAIRS = [(name, preset) for name, (_, _, presets) in CASES.items() for preset in presets]


def _ids():
    return torch.randint(5, 60, (2, 10), generator=torch.Generator().manual_seed(0))


def _randomise(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("name,preset", PAIRS)
def test_tuneforge_adapter_loads_in_peft(tmp_path, name, preset):
    model, _ = build_tiny(preset)
    cfg = CASES[name][0]()
    apply_methods(model, [cfg])
    _randomise(model)
    model.eval()
    ours = model(_ids()).logits
    save_adapter(model, [cfg], tmp_path / "ad")
    base, _ = build_tiny(preset)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    assert torch.allclose(pm(input_ids=_ids()).logits, ours, atol=1e-5)


@pytest.mark.parametrize("name,preset", PAIRS)
def test_peft_adapter_loads_in_tuneforge(tmp_path, name, preset):
    base, _ = build_tiny(preset)
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, CASES[name][1](preset)).eval()
    theirs = pm(input_ids=_ids()).logits
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh, _ = build_tiny(preset)
    load_adapter(fresh, tmp_path / "peft")
    assert torch.allclose(fresh.eval()(_ids()).logits, theirs, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_merge_matches_peft_merge(tmp_path, name):
    model, _ = build_tiny("llama")
    cfg = CASES[name][0]()
    apply_methods(model, [cfg])
    _randomise(model)
    save_adapter(model, [cfg], tmp_path / "ad")
    merge_methods(model, [cfg])
    base, _ = build_tiny("llama")
    merged = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).merge_and_unload()
    ours, theirs = dict(model.named_parameters()), dict(merged.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)


def test_lokr_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as theirs

    for dim in [1, 2, 7, 12, 64, 96, 127, 128, 176, 256, 352, 4096, 11008]:
        for factor in [-1, 2, 4, 8, 16, 5]:
            assert lokr.factorization(dim, factor) == theirs(dim, factor), (dim, factor)


def test_lokr_on_conv1d_says_peft_cannot_load_it(tmp_path, caplog):
    """GPT-2's Conv1D: tuneforge trains and reloads LoKr there, PEFT's LoKr cannot; saving says so (once a PEFT
    user finds out by an exception, it is too late), and the adapter still round-trips in tuneforge."""
    model, _ = build_tiny("gpt2")
    apply_methods(model, [lokr.Config(rank=2, alpha=4)])
    _randomise(model)
    ids = _ids()
    ours = model.eval()(ids).logits
    save_adapter(model, [lokr.Config(rank=2, alpha=4)], tmp_path / "ad")
    assert any("PEFT's LoKr has no Conv1D support" in r.getMessage() for r in caplog.records)
    fresh, _ = build_tiny("gpt2")
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh.eval()(ids).logits, ours)
    caplog.clear()
    llama, _ = build_tiny("llama")
    apply_methods(llama, [lokr.Config(rank=2, alpha=4)])
    save_adapter(llama, [lokr.Config(rank=2, alpha=4)], tmp_path / "ad2")
    assert not any("Conv1D" in r.getMessage() for r in caplog.records)
