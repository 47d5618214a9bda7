"""Parity of tuneforge's pure-torch NF4 with bitsandbytes (skipped when bitsandbytes is absent or cannot run here).

Bit-exact without double quantisation: packed nibbles, fp32 absmax and dequantised values.

With double quantisation the fp32 block constants are centred and 8-bit quantised. Both sides use the same dynamic
code book, offset and second-level absmax (asserted exactly), but bitsandbytes' native blockwise kernel does not
always pick the *nearest* code (its binary search can stop one code off), while tuneforge rounds exactly to nearest.
So the 8-bit constant codes agree for >= 98% of blocks, the rest are one code apart, and the stated tolerance on the
dequantised weights is one code step: for each element ``|ours - bnb| <= g * absmax2 * |nf4 value| (+1e-6)``, where
``g`` (~0.014) is the widest gap between neighbouring dynamic-code values and ``absmax2`` the block's second-level
constant. Ours is never further from the true fp32 constant than bitsandbytes'.
"""

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from tuneforge.quant.int8 import dynamic_map  # noqa: E402
from tuneforge.quant.nf4 import (NF4_CODE, block_absmax, dequantize_nf4, quantize_nf4,  # noqa: E402
                                 unpack_nibbles)

try:
    bnbf.quantize_4bit(torch.randn(64), blocksize=64, quant_type="nf4")
except Exception as exc:  # installed, but no working backend for this device
    pytest.skip(f"bitsandbytes cannot quantise on CPU here: {exc}", allow_module_level=True)

SHAPES = [(256, 64), (100, 37), (3,), (1000, 130)]


@pytest.fixture(autouse=True)
def eager_bnb():
    """bitsandbytes wraps its pure-torch CPU fallbacks in torch.compile; compiling costs seconds per shape and
    changes nothing about the values, so run them eagerly."""
    with torch.compiler.set_stance("force_eager"):
        yield


def bnb_quant(w, dq):
    return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")


def test_code_books_match():
    assert torch.equal(bnbf.get_4bit_type("nf4", device="cpu").float(), torch.tensor(NF4_CODE))
    assert torch.equal(dynamic_map(True), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(False), bnbf.create_dynamic_map(signed=False))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_absmax_and_dequantised_values_are_identical(shape, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    ours = quantize_nf4(w, double_quant=False, backend="torch")
    packed, state = bnb_quant(w, False)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours, backend="torch"), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quant_within_one_code_step(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = quantize_nf4(w, double_quant=True, backend="torch")
    packed, state = bnb_quant(w, True)
    assert torch.equal(ours.packed, packed.reshape(-1))  # 4-bit codes come from the exact fp32 constants
    assert torch.equal(ours.absmax_offset, state.offset.reshape(()))
    assert torch.equal(ours.absmax2, state.state2.absmax)
    nblocks = ours.absmax.numel()
    if nblocks > 1:  # (one block: both store 0 - bnb as code 0 x absmax2 0, ours as the code of 0.0)
        assert (ours.absmax == state.absmax).float().mean() >= 0.98
    true = quantize_nf4(w, double_quant=False).absmax
    bnb_const = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.all((block_absmax(ours) - true).abs() <= (bnb_const - true).abs() + 1e-6)

    code = dynamic_map(True)
    gap = (code[1:] - code[:-1]).max()
    n = w.numel()
    scale = ours.absmax2.repeat_interleave(256)[:nblocks].repeat_interleave(64)[:n]
    nf4 = torch.tensor(NF4_CODE)[unpack_nibbles(ours.packed, n)].abs()
    diff = (dequantize_nf4(ours, backend="torch") - bnbf.dequantize_4bit(packed, state)).reshape(-1).abs()
    assert torch.all(diff <= gap * scale * nf4 + 1e-6)


def test_bnb_backend_gives_the_same_layout():
    w = torch.randn(300, 70, generator=torch.Generator().manual_seed(2))
    via_bnb = quantize_nf4(w, double_quant=False, backend="bnb")
    ours = quantize_nf4(w, double_quant=False, backend="torch")
    assert torch.equal(via_bnb.packed, ours.packed) and torch.equal(via_bnb.absmax, ours.absmax)
    assert torch.equal(dequantize_nf4(via_bnb, backend="bnb"), dequantize_nf4(ours, backend="torch"))
    dq = quantize_nf4(w, double_quant=True, backend="bnb")
    assert dq.double_quant and dq.absmax.dtype == torch.uint8
    assert torch.allclose(dequantize_nf4(dq, backend="torch"), dequantize_nf4(dq, backend="bnb"))
