"""Intrinsic-dimension fine-tuning: the Fastfood projection against its explicit matrix, P's unit-norm columns, the
projection regenerated from the seed (the adapter is d numbers), SAID's per-layer scales, and the refusals."""

import math

import pytest
import torch

from tuneforge.methods import METHODS, apply_methods, count_parameters, load_adapter, save_adapter
from tuneforge.methods.intrinsic import fastfood, fwht, intrinsic_layers
from tuneforge.models.tiny import build_tiny


def _hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_fwht_is_the_sylvester_hadamard_matrix():
    x = torch.randn(3, 16)
    assert torch.allclose(fwht(x), x @ _hadamard(16).T, atol=1e-5)


def test_fastfood_block_equals_its_explicit_matrix_with_unit_columns():
    """V = H G Π H B / (√L ||G||), written out as matrices (Le et al. 2013; Li et al. 2018 sec. 2)."""
    torch.manual_seed(0)
    L, d = 16, 11
    signs = (torch.randint(0, 2, (1, L)) * 2 - 1).float()
    perm = torch.randperm(L).view(1, L)
    gauss = torch.randn(1, L)
    theta = torch.randn(d)
    H = _hadamard(L)
    Pi = torch.zeros(L, L)
    Pi[torch.arange(L), perm[0]] = 1.0  # (Π x)_i = x_perm[i]
    V = H @ torch.diag(gauss[0]) @ Pi @ H @ torch.diag(signs[0]) / (math.sqrt(L) * gauss.norm())
    want = V @ torch.nn.functional.pad(theta, (0, L - d))
    assert torch.allclose(fastfood(theta, signs, perm, gauss)[0], want, atol=1e-5)
    # every column has norm 1 exactly (H's entries are ±1, so each column sums G² once): P's columns, once the
    # stacked blocks are scaled by 1/sqrt(blocks), are unit vectors as Li et al. ask
    assert torch.allclose((V.T @ V).diagonal(), torch.ones(L), atol=1e-5)


def _offsets(model, adapter="default"):
    return torch.cat([layer.delta(adapter).flatten() for layer in intrinsic_layers(model).values()])


@pytest.mark.parametrize("projection", ["fastfood", "dense"])
def test_projection_columns_have_unit_norm_and_the_map_is_linear(projection):
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS["intrinsic"].Config(dimension=64, projection=projection)])
    sub = model.tuneforge_intrinsic["default"]
    cols = []
    with torch.no_grad():
        for i in (0, 17, 63):
            sub.theta.zero_()
            sub.theta[i] = 1.0
            cols.append(_offsets(model))
        norms = [c.norm().item() for c in cols]
        assert all(abs(n - 1) < (1e-5 if projection == "fastfood" else 0.02) for n in norms), norms
        sub.theta.zero_()
        sub.theta[0], sub.theta[17] = 2.0, -3.0
        assert torch.allclose(_offsets(model), 2 * cols[0] - 3 * cols[1], atol=1e-5)


def test_the_projection_comes_from_the_seed_and_the_file_holds_d_numbers(tmp_path):
    from tuneforge.safeio import load_safetensors

    def offsets(seed):
        model, _ = build_tiny("llama")
        apply_methods(model, [METHODS["intrinsic"].Config(dimension=32, seed=seed)])
        with torch.no_grad():
            model.tuneforge_intrinsic["default"].theta.fill_(1.0)
            return _offsets(model), model

    a, model = offsets(0)
    assert torch.equal(a, offsets(0)[0]) and not torch.allclose(a, offsets(1)[0])
    save_adapter(model, [METHODS["intrinsic"].Config(dimension=32, seed=0)], tmp_path / "ad")
    tensors = load_safetensors(tmp_path / "ad" / "adapter_model.safetensors")
    assert {k: v.numel() for k, v in tensors.items()} == {"intrinsic.theta": 32}
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(_offsets(fresh), a)


def test_said_scales_each_layer_by_its_own_lambda():
    model, _ = build_tiny("llama")
    cfg = METHODS["intrinsic"].Config(dimension=40, said=True)
    apply_methods(model, [cfg])
    layers = sorted(intrinsic_layers(model).values(), key=lambda layer: layer.index["default"])
    sub = model.tuneforge_intrinsic["default"]
    assert sub.theta.numel() + sub.lam.numel() == 40 == count_parameters(model)[0]
    assert sub.lam.numel() == len(layers) and torch.equal(sub.lam, torch.ones(len(layers)))
    with torch.no_grad():
        sub.theta.normal_()
        before = [layer.delta("default").clone() for layer in layers]
        sub.lam[2] = 0.5
    after = [layer.delta("default") for layer in layers]
    assert torch.allclose(after[2], 0.5 * before[2]) and all(torch.equal(a, b) for i, (a, b) in
                                                            enumerate(zip(after, before)) if i != 2)


def test_refusals_say_what_to_change():
    with pytest.raises(ValueError, match="use projection: fastfood"):
        apply_methods(build_tiny("llama")[0], [METHODS["intrinsic"].Config(dimension=5000, projection="dense")])
    with pytest.raises(ValueError, match="exceeds the .* weights"):
        apply_methods(build_tiny("llama")[0], [METHODS["intrinsic"].Config(dimension=10 ** 7)])
    with pytest.raises(ValueError, match="needs dimension >"):
        apply_methods(build_tiny("llama")[0], [METHODS["intrinsic"].Config(dimension=3, said=True)])


def test_bf16_base_keeps_an_fp32_subspace_and_trains():
    model, _ = build_tiny("llama", dtype=torch.bfloat16)
    apply_methods(model, [METHODS["intrinsic"].Config(dimension=16)])
    sub = model.tuneforge_intrinsic["default"]
    assert sub.theta.dtype == torch.float32
    ids = torch.randint(5, 60, (2, 7))
    model(ids).logits.float().sum().backward()
    assert sub.theta.grad is not None and sub.theta.grad.abs().sum() > 0
