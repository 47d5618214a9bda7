"""NF4: the code book, blockwise quantisation, nibble packing, double quantisation and storage cost."""

import pytest
import torch

from tuneforge.quant.int8 import dynamic_map
from tuneforge.quant.nf4 import (NF4_CODE, ZERO_INDEX, bits_per_param, block_absmax, derive_nf4_code, dequantize_nf4,
                                 nf4_code, pack_nibbles, quantize_nf4, unpack_nibbles)

CODE = torch.tensor(NF4_CODE, dtype=torch.float32)


def reference_indices(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: per block absmax, then argmin over the 16 codes of |x / absmax - code| (float64 distances)."""
    flat = w.reshape(-1).float()
    idx, absmax = [], []
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        a = block.abs().max()
        scaled = block * (1 / a) if a > 0 else torch.zeros_like(block)
        idx.append((scaled.double()[:, None] - CODE.double()[None, :]).abs().argmin(dim=1))
        absmax.append(a)
    return torch.cat(idx), torch.stack(absmax)


# ---- the code book ----


def test_published_table_is_reproduced_bit_for_bit_from_normal_quantiles():
    assert torch.equal(derive_nf4_code(published_arithmetic=True), CODE)


def test_exact_float64_derivation_agrees_with_published_table_to_2e7():
    # The published constants carry an fp32 probability grid and a 7-digit offset (see derive_nf4_code).
    diff = (derive_nf4_code() - CODE.double()).abs().max().item()
    assert diff < 2.5e-7


def test_code_book_structure():
    assert CODE.numel() == 16 and torch.all(CODE[1:] > CODE[:-1])
    assert CODE[0] == -1.0 and CODE[-1] == 1.0 and CODE[ZERO_INDEX] == 0.0
    assert (CODE < 0).sum() == 7 and (CODE > 0).sum() == 8  # asymmetric: an exact zero and 8 positive values


# ---- packing ----


def test_nibble_order_is_high_nibble_first():
    idx = torch.tensor([3, 12, 15, 0, 5])
    packed = pack_nibbles(idx)
    assert packed.tolist() == [(3 << 4) | 12, (15 << 4) | 0, (5 << 4) | ZERO_INDEX]
    assert unpack_nibbles(packed, 5).tolist() == idx.tolist()


def test_quantised_codes_land_in_the_documented_nibbles():
    w = torch.cat([CODE[[3, 12]] * 2.0, torch.tensor([2.0])])  # absmax 2 (exactly the code 1.0 at index 15)
    q = quantize_nf4(w, double_quant=False)
    assert q.packed.tolist() == [(3 << 4) | 12, (15 << 4) | ZERO_INDEX]


# ---- golden cases ----


@pytest.mark.parametrize("absmax", [4.0, 3.0, 0.0123])
def test_block_of_code_values_times_absmax_round_trips_exactly(absmax):
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0)) % 16
    w = CODE[perm] * absmax  # every code value appears, so the block's absmax is exactly `absmax`
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.absmax, torch.tensor([absmax]))
    assert torch.equal(unpack_nibbles(q.packed, 64), perm)
    assert torch.equal(dequantize_nf4(q), w)


def test_single_block_with_double_quant_is_still_exact():
    # one constant: absmax - mean(absmax) = 0, so the offset alone restores it exactly
    w = CODE.repeat(4) * 3.0
    q = quantize_nf4(w, double_quant=True)
    assert q.double_quant and torch.equal(dequantize_nf4(q), w)


def test_ties_go_to_the_lower_code_and_just_above_goes_up():
    _, mids = nf4_code()
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    w = torch.cat([torch.tensor([1.0]), mids, above])  # absmax 1: scaled values are the inputs themselves
    idx = unpack_nibbles(quantize_nf4(w, double_quant=False).packed, w.numel())
    assert idx[1:16].tolist() == list(range(15))
    assert idx[16:].tolist() == list(range(1, 16))


def test_zero_blocks_have_zero_absmax_and_decode_to_zero():
    w = torch.cat([torch.zeros(64), torch.randn(64), torch.zeros(64)])
    q = quantize_nf4(w, double_quant=False)
    assert q.absmax[0] == 0 and q.absmax[2] == 0
    assert torch.all(q.packed[:32] == (ZERO_INDEX << 4 | ZERO_INDEX))
    out = dequantize_nf4(q)
    assert torch.all(out[:64] == 0) and torch.all(out[128:] == 0)
    assert torch.all(dequantize_nf4(quantize_nf4(torch.zeros(7, 9))) == 0)


@pytest.mark.parametrize("shape", [(3, 37), (5,), (2, 3, 65)])
def test_shapes_not_divisible_by_the_block_are_padded(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    q = quantize_nf4(w, double_quant=False)
    n = w.numel()
    assert q.packed.numel() == (n + 1) // 2 and q.absmax.numel() == -(-n // 64)
    assert q.absmax[-1] == w.reshape(-1)[(n - 1) // 64 * 64:].abs().max()  # the partial block has its own constant
    out = dequantize_nf4(q)
    assert out.shape == w.shape
    idx, absmax = reference_indices(w)
    assert torch.equal(out.reshape(-1), (CODE[idx] * absmax.repeat_interleave(64)[:n]))


def test_quantisation_error_equals_the_reference_code_book_error_exactly():
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(2)) * 0.02
    q = quantize_nf4(w, double_quant=False)
    idx, absmax = reference_indices(w)
    assert torch.equal(unpack_nibbles(q.packed, w.numel()), idx)
    assert torch.equal(q.absmax, absmax)
    ref = (CODE[idx] * absmax.repeat_interleave(64)).reshape(w.shape)
    assert torch.equal((w - dequantize_nf4(q)).abs(), (w - ref).abs())


def test_nf4_beats_int4_on_normal_weights():
    """Why NormalFloat (QLoRA Sec. 3): lower error than the absmax Int4 baseline (levels k/7) on normal weights."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    nf4_err = (w - dequantize_nf4(quantize_nf4(w, double_quant=False))).pow(2).mean()
    blocks = w.reshape(-1, 64)
    a = blocks.abs().amax(1, keepdim=True)
    int4 = torch.round(blocks / a * 7) / 7 * a
    assert nf4_err < 0.9 * (blocks - int4).pow(2).mean()


# ---- double quantisation ----


def test_double_quant_constants_are_within_half_a_dynamic_code_step():
    w = torch.randn(512, 300, generator=torch.Generator().manual_seed(4))
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w, double_quant=True)
    assert torch.equal(plain.packed, dq.packed)  # the 4-bit codes use the exact fp32 absmax
    assert dq.absmax.dtype == torch.uint8 and dq.absmax2.numel() == -(-plain.absmax.numel() // 256)
    assert dq.absmax_offset.item() == pytest.approx(plain.absmax.mean().item(), rel=1e-6)
    code = dynamic_map(True)
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    scale = dq.absmax2.repeat_interleave(256)[: plain.absmax.numel()]
    err = (block_absmax(dq) - plain.absmax).abs()
    assert torch.all(err <= half_gap * scale + 1e-6)
    assert (err / plain.absmax).max() < 0.01  # < 1% on every block constant for normal weights


def test_bits_per_param():
    n = 64 * 256 * 4
    w = torch.randn(n // 128, 128)
    assert bits_per_param(quantize_nf4(w, double_quant=False)) == 4.5  # 4 + 32/64
    with_dq = bits_per_param(quantize_nf4(w, double_quant=True))
    assert with_dq == 4 + 8 / 64 + 32 / (64 * 256) + 32 / n  # the last term: the one fp32 mean offset
    assert with_dq == pytest.approx(4.127, abs=1e-3)


# ---- dtypes, devices, validation ----


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_round_trip_to_the_original_dtype(dtype):
    w = torch.randn(64, 64).to(dtype)
    q = quantize_nf4(w)
    out = dequantize_nf4(q)
    assert out.dtype == dtype and q.absmax2.dtype == torch.float32
    assert dequantize_nf4(q, torch.float32).dtype == torch.float32
    assert (out.float() - w.float()).abs().max() <= w.float().abs().max() * 0.2


def test_nf4tensor_to_and_tensors():
    q = quantize_nf4(torch.randn(10, 64))
    assert set(q.tensors()) == {"packed", "absmax", "absmax2", "absmax_offset"}
    moved = q.to("cpu")
    assert torch.equal(dequantize_nf4(moved), dequantize_nf4(q)) and moved.nbytes() == q.nbytes()


def test_invalid_inputs_are_refused():
    with pytest.raises(TypeError):
        quantize_nf4(torch.arange(64))
    with pytest.raises(ValueError, match="NaN"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(64), blocksize=63)
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0))
    with pytest.raises(ValueError, match="backend"):
        quantize_nf4(torch.randn(64), backend="cuda")


def test_other_block_sizes():
    w = torch.randn(1000)
    q = quantize_nf4(w, blocksize=128, double_quant=False)
    idx, absmax = reference_indices(w, 128)
    assert torch.equal(q.absmax, absmax) and torch.equal(unpack_nibbles(q.packed, 1000), idx)
