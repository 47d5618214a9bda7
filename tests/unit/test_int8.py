"""Row-wise absmax int8 weights and blockwise 8-bit code-book quantisation."""

import pytest
import torch

from tuneforge.quant.int8 import (dequantize_blockwise, dequantize_int8_rowwise, dynamic_map, get_code, linear_map,
                                  quantize_blockwise, quantize_int8_rowwise)

# ---- row-wise int8 ----


def test_rowwise_golden_values():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [127.0, 63.5, -127.0]])
    q = quantize_int8_rowwise(w)
    # row 0: 127 * [1, -0.5, 0.25] = [127, -63.5, 31.75] -> halves round to even; row 2: scale 1
    assert q.data.tolist() == [[127, -64, 32], [0, 0, 0], [127, 64, -127]]
    assert q.data.dtype == torch.int8 and q.absmax.tolist() == [1.0, 0.0, 127.0]
    out = dequantize_int8_rowwise(q)
    assert out[1].tolist() == [0.0, 0.0, 0.0]
    assert out[2].tolist() == [127.0, 64.0, -127.0]
    assert torch.allclose(out[0], torch.tensor([1.0, -64 / 127, 32 / 127]))


def test_rowwise_error_is_at_most_half_a_step_per_row():
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64)[:, None]
    q = quantize_int8_rowwise(w)
    err = (dequantize_int8_rowwise(q) - w).abs()
    assert torch.all(err <= (q.absmax / 254)[:, None] * (1 + 1e-5))
    assert q.bits_per_param() == 8 + 32 / 300


def test_rowwise_keeps_dtype_and_refuses_bad_input():
    w = torch.randn(4, 8, dtype=torch.bfloat16)
    assert dequantize_int8_rowwise(quantize_int8_rowwise(w)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8_rowwise(torch.randn(8))
    with pytest.raises(TypeError):
        quantize_int8_rowwise(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8_rowwise(torch.tensor([[1.0, float("inf")]]))


# ---- code books ----


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_structure(signed):
    code = dynamic_map(signed)
    assert code.numel() == 256 and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # sorted, no duplicates
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    if signed:
        assert (code < 0).sum() == 127 and code[0] == pytest.approx(-(1 - 0.9 / 128))
    else:
        assert code[0] == 0 and code[1] == pytest.approx(0.325e-6)  # first fraction bin at 10**-6
    # the non-linear point: about as many codes per decade of magnitude as there are fraction bits
    pos = code[code > 0]
    assert ((pos >= 0.1) & (pos < 1)).sum() == (64 if signed else 128)
    assert ((pos >= 1e-7) & (pos < 1e-6)).sum() == (1 if signed else 2)


def test_linear_maps():
    s, u = linear_map(True), linear_map(False)
    assert s.numel() == u.numel() == 256 and s[1] == -1 and s[-1] == 1 and s[128] == 0 and u[0] == 0 and u[-1] == 1
    assert torch.allclose(s[1:] - s[:-1], torch.full((255,), 1 / 127))
    assert torch.allclose(u[1:] - u[:-1], torch.full((255,), 1 / 255))


# ---- blockwise quantisation ----


def brute_force(x, name, blocksize):
    code = get_code(name)[0].double()
    flat = x.reshape(-1).float()
    out, absmax = [], []
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        a = block.abs().max()
        scaled = (block * (1 / a) if a > 0 else torch.zeros_like(block)).double()
        out.append((scaled[:, None] - code[None]).abs().argmin(1))
        absmax.append(a)
    return torch.cat(out).reshape(x.shape), torch.stack(absmax)


@pytest.mark.parametrize("name", ["dynamic", "udynamic", "linear", "ulinear"])
def test_blockwise_is_exact_nearest_rounding(name):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 29, generator=gen) * torch.logspace(-6, 0, 29)  # many magnitudes, a partial last block
    if name.startswith("u"):
        x = x.abs()
    codes, absmax = quantize_blockwise(x, name, blocksize=256)
    ref, ref_absmax = brute_force(x, name, 256)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes.long(), ref)


def test_blockwise_round_trip_error_bound_and_zero_blocks():
    x = torch.cat([torch.zeros(100), torch.randn(5000, generator=torch.Generator().manual_seed(2))])
    codes, absmax = quantize_blockwise(x, "dynamic", blocksize=2048)
    assert absmax.numel() == 3
    out = dequantize_blockwise(codes, absmax, "dynamic", 2048)
    code = dynamic_map(True)
    bound = ((code[1:] - code[:-1]).max() / 2) * absmax.repeat_interleave(2048)[: x.numel()]
    assert torch.all((out - x).abs() <= bound + 1e-7)
    assert torch.all(out[:100] == 0)
    z = quantize_blockwise(torch.zeros(10), "udynamic", 4)
    assert torch.all(dequantize_blockwise(*z, "udynamic", 4) == 0)


def test_block_absmax_element_is_exact():
    """Code 1.0 exists, so each block's largest-magnitude positive element is stored exactly."""
    x = torch.rand(4096, generator=torch.Generator().manual_seed(3))
    codes, absmax = quantize_blockwise(x, "udynamic", 256)
    out = dequantize_blockwise(codes, absmax, "udynamic", 256)
    top = x.view(-1, 256).argmax(1) + torch.arange(16) * 256
    assert torch.equal(out[top], x[top])


def test_blockwise_errors():
    with pytest.raises(ValueError, match="unknown 8-bit code"):
        quantize_blockwise(torch.randn(4), "fp8")
    with pytest.raises(ValueError, match="blocksize"):
        quantize_blockwise(torch.randn(4), blocksize=0)
    codes, absmax = quantize_blockwise(torch.randn(300), blocksize=128)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_blockwise(codes, absmax[:2], blocksize=128)
