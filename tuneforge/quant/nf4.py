"""4-bit NormalFloat (NF4) blockwise quantisation with double quantisation, after QLoRA.

Reference: Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
https://arxiv.org/abs/2305.14314.

* **NormalFloat** (Sec. 3, eq. 4): pretrained weights are roughly zero-mean normal, so the 16 code values are
  quantiles of N(0, 1) rescaled to [-1, 1]; each code then receives about the same share of the (normalised)
  weights, the information-theoretically best use of 4 bits for that distribution. To have an exact 0 (padding
  and zero weights stay zero) the code is asymmetric: 7 negative quantiles, 0, 8 positive quantiles (the paper's
  "two ranges ... unify these sets and remove one of the two zeros"). The published table is in the paper's
  appendix and in bitsandbytes; :func:`derive_nf4_code` rebuilds it from ``ndtri`` (the normal quantile function).
* **Blockwise absmax** (Sec. 2, eq. 1-2): the flat weight is cut into blocks of 64; each block is divided by its own
  absmax so it lies in [-1, 1], then each value is replaced by the index of the nearest code value. Small blocks keep
  an outlier from flattening the resolution of the whole tensor.
* **Double quantisation** (Sec. 3, "Double Quantization"): the fp32 absmax constants cost 32/64 = 0.5 bit per
  parameter, so they are themselves quantised: their mean is subtracted (they are all positive, and centring lets
  a signed code use its full range), and the centred constants are quantised blockwise to 8 bits with block size
  256 (dynamic code, :mod:`tuneforge.quant.int8`), leaving one fp32 constant per 256 x 64 weights and the mean.
  Cost: 8/64 + 32/(64*256) = 0.127 bit per parameter instead of 0.5.

Packing: two 4-bit indices per byte, element ``2k`` in the high nibble and ``2k+1`` in the low nibble (the
bitsandbytes order, checked bit for bit by ``tests/parity/test_bnb_nf4.py``). Shapes that are not a multiple of the
block size are padded with zeros: the last, partial block gets its own absmax (exactly bitsandbytes' layout), and an
odd element count gets one zero nibble. Padding never changes the dequantised values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from tuneforge.quant.int8 import dequantize_blockwise, quantize_blockwise

__all__ = [
    "NF4_CODE", "NF4_OFFSET", "NF4Tensor", "derive_nf4_code", "nf4_code", "quantize_nf4", "dequantize_nf4",
    "bits_per_param", "pack_nibbles", "unpack_nibbles", "bnb_available",
]

# QLoRA appendix / bitsandbytes' NF4 table, as printed (these are exactly representable fp32 values).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# Outermost probability of the quantile grid: 1 - (1/(2*16) + 1/(2*15)) / 2, the mean of the half-bin widths of a
# 16-bin and a 15-bin split. Eq. 4 takes each code as a bin *midpoint*, so the end codes sit half a bin inside the
# tails instead of at the infinite quantiles Q(0), Q(1). The published table used this rounded to 7 digits.
NF4_OFFSET = 1.0 - 0.5 * (1.0 / 32.0 + 1.0 / 30.0)
_PUBLISHED_OFFSET = 0.9677083
ZERO_INDEX = 7  # NF4_CODE[7] == 0.0

DOUBLE_QUANT_BLOCKSIZE = 256
_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_BNB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def derive_nf4_code(offset: float | None = None, published_arithmetic: bool = False) -> torch.Tensor:
    """The 16 NF4 values from normal quantiles, sorted ascending, normalised so the extremes are -1 and 1.

    Positive half: quantiles ``ndtri(p)`` at 9 evenly spaced probabilities from ``offset`` down to 0.5, dropping
    the last (0.5 gives 0). Negative half: the same with 8 points, negated. Plus one 0 -> 7 + 1 + 8 = 16 values.
    Dividing by the largest quantile maps both ends to exactly +-1 (both halves start at ``offset``).

    ``published_arithmetic=True`` repeats the arithmetic that produced the published table - the 7-digit offset,
    the probability grid in fp32, normalisation in fp32 - and reproduces :data:`NF4_CODE` bit for bit.
    The default (exact offset, float64 throughout) differs from the table by at most ~2e-7, i.e. 1-3 fp32 ulps:
    the published values carry the rounding of an fp32 probability grid (an ulp of p near 0.97 is 6e-8, and the
    quantile's slope there is ~14) and of the 7-digit offset. Returned dtype: float64, or fp32 when published.
    """
    grid_dtype = torch.float32 if published_arithmetic else torch.float64
    if offset is None:
        offset = _PUBLISHED_OFFSET if published_arithmetic else NF4_OFFSET
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=grid_dtype)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=grid_dtype)[:-1].double())
    vals = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
    if published_arithmetic:
        vals = vals.float()
    vals = torch.sort(vals).values
    return vals / vals.max()


_CODES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def nf4_code(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(code, midpoints)`` in fp32 on ``device``; the 15 midpoints are the nearest-rounding decision boundaries."""
    dev = torch.device(device)
    if dev not in _CODES:
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=dev)
        _CODES[dev] = (code, (code[:-1] + code[1:]) / 2)
    return _CODES[dev]


@dataclass
class NF4Tensor:
    """A quantised tensor: packed 4-bit codes plus the block constants (possibly double-quantised).

    ``absmax`` is fp32 (one per block) without double quantisation; with it, ``absmax`` holds uint8 codes of
    ``absmax_fp32 - absmax_offset`` in blocks of ``absmax_blocksize``, with fp32 constants ``absmax2``.
    """

    packed: torch.Tensor  # uint8, (ceil(numel / 2),)
    absmax: torch.Tensor  # fp32 (nblocks,) or uint8 (nblocks,) when double-quantised
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original tensor (what dequantisation returns by default)
    blocksize: int = 64
    absmax2: torch.Tensor | None = None  # fp32 (ceil(nblocks / absmax_blocksize),)
    absmax_offset: torch.Tensor | None = None  # fp32, 0-dim: mean of the absmax constants
    absmax_blocksize: int = DOUBLE_QUANT_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what a state dict of this tensor holds)."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out.update(absmax2=self.absmax2, absmax_offset=self.absmax_offset)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> NF4Tensor:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return replace(self, **moved)


def bits_per_param(q: NF4Tensor) -> float:
    """Stored bits per original element, counting every constant.

    Without double quantisation: 4 + 32/64 = 4.5. With it: 4 + 8/64 + 32/(64*256) = 4.127 (plus 32/numel for the
    mean offset, which vanishes for real weights) - QLoRA Sec. 3's 0.5 -> 0.127 bit saving.
    """
    return 8.0 * q.nbytes() / q.numel


# ---- Packing ----


def pack_nibbles(idx: torch.Tensor, pad_value: int = ZERO_INDEX) -> torch.Tensor:
    """Pack flat 4-bit indices (values 0..15) two per byte: element 2k in the high nibble, 2k+1 in the low one.

    An odd count is padded with ``pad_value``, by default the index of the code 0.0 (what bitsandbytes writes,
    since it pads the scaled values with zeros before rounding).
    """
    flat = idx.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad_value)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``n`` indices as int64 (ready for indexing)."""
    pairs = torch.stack([packed >> 4, packed & 0x0F], dim=1)
    return pairs.reshape(-1)[:n].long()


# ---- Quantisation ----


def _check_input(w: torch.Tensor, blocksize: int) -> None:
    if not w.is_floating_point():
        raise TypeError(f"NF4 quantisation expects a floating-point tensor, got {w.dtype}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even int, got {blocksize!r}")
    if w.numel() == 0:
        raise ValueError("cannot quantise an empty tensor")
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantise a tensor containing NaN or Inf")


def _nf4_indices(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code indices of ``w / absmax`` per block, and the fp32 absmax per block.

    ``w * (1/absmax)`` (not ``w / absmax``) is the bitsandbytes kernels' arithmetic, kept so the two agree bit for
    bit; it is clamped to [-1, 1] against rounding. Ties (a value exactly on a midpoint) go to the lower code.
    A zero block has absmax 0; its values all map to the code 0.0 (index 7) and decode to exact zeros.
    """
    flat = w.detach().reshape(-1).float()
    pad = -flat.numel() % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize) if pad else flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (blocks * inv[:, None]).clamp_(-1.0, 1.0)
    _, mids = nf4_code(w.device)
    idx = torch.bucketize(scaled, mids)
    return idx.reshape(-1)[: flat.numel()], absmax


def double_quantize(absmax: torch.Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA "Double Quantization": ``(uint8 codes, fp32 second-level absmax, fp32 offset)`` of the constants."""
    offset = absmax.mean()
    codes, absmax2 = quantize_blockwise(absmax - offset, code="dynamic", blocksize=blocksize)
    return codes, absmax2, offset


def block_absmax(q: NF4Tensor) -> torch.Tensor:
    """The fp32 per-block constants, undoing double quantisation if it was applied."""
    if not q.double_quant:
        return q.absmax.float()
    centred = dequantize_blockwise(q.absmax, q.absmax2, code="dynamic", blocksize=q.absmax_blocksize)
    return centred + q.absmax_offset


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 backend: str = "auto") -> NF4Tensor:
    """Quantise ``w`` (any shape) to NF4 in blocks of ``blocksize`` consecutive elements of ``w.reshape(-1)``.

    ``backend``: ``"torch"`` (this module), ``"bnb"`` (bitsandbytes' kernels, producing the identical layout), or
    ``"auto"``: bitsandbytes on CUDA tensors when it is installed and works, pure torch otherwise (on CPU
    bitsandbytes' NF4 quantiser is itself plain torch, so nothing is gained there).
    """
    _check_input(w, blocksize)
    if _use_bnb(backend, w.device, blocksize, w.dtype):
        return _quantize_bnb(w, blocksize, double_quant)
    idx, absmax = _nf4_indices(w, blocksize)
    q = NF4Tensor(pack_nibbles(idx), absmax, w.shape, w.dtype, blocksize)
    if double_quant:
        q.absmax, q.absmax2, q.absmax_offset = double_quantize(absmax)
    return q


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """``code[idx] * absmax_block`` in fp32, cast to ``dtype`` (default: the original dtype), in ``q.shape``."""
    if _use_bnb(backend, q.device, q.blocksize, q.dtype):
        return _dequantize_bnb(q, dtype)
    code, _ = nf4_code(q.device)
    n = q.numel
    vals = code[unpack_nibbles(q.packed, n)]
    pad = -n % q.blocksize
    if pad:
        vals = torch.cat([vals, vals.new_zeros(pad)])
    out = (vals.view(-1, q.blocksize) * block_absmax(q)[:, None]).reshape(-1)[:n]
    return out.reshape(q.shape).to(dtype or q.dtype)


# ---- bitsandbytes backend ----


def bnb_available(device: torch.device | str = "cuda") -> bool:
    """True when bitsandbytes imports and can quantise a tensor on ``device``."""
    try:
        import bitsandbytes.functional as bnbf

        t = torch.ones(64, device=device)
        bnbf.quantize_4bit(t, blocksize=64, quant_type="nf4")
        return True
    except Exception:  # not installed, no kernel for this device, broken native library, ...
        return False


_BNB_OK: dict[str, bool] = {}


def _use_bnb(backend: str, device: torch.device, blocksize: int, dtype: torch.dtype) -> bool:
    if backend not in ("auto", "torch", "bnb"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'bnb', got {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return False
    key = str(device)
    if key not in _BNB_OK:
        _BNB_OK[key] = bnb_available(device)
    ok = _BNB_OK[key] and blocksize in _BNB_BLOCKSIZES and dtype in _BNB_DTYPES
    if backend == "bnb" and not ok:
        raise RuntimeError(f"backend='bnb' requested but bitsandbytes cannot quantise {dtype} on {device} with "
                           f"blocksize {blocksize} (install bitsandbytes, or use backend='torch')")
    return ok


def _quantize_bnb(w: torch.Tensor, blocksize: int, double_quant: bool) -> NF4Tensor:
    import bitsandbytes.functional as bnbf

    packed, st = bnbf.quantize_4bit(w.detach().contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                    quant_type="nf4")
    q = NF4Tensor(packed.reshape(-1), st.absmax, w.shape, w.dtype, blocksize)
    if double_quant:
        q.absmax2, q.absmax_offset = st.state2.absmax, st.offset.float().reshape(())
        q.absmax_blocksize = st.state2.blocksize
    return q


def _dequantize_bnb(q: NF4Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    # the fp32 constants, double quantisation undone with our dynamic code (bit-identical to bitsandbytes')
    state = bnbf.QuantState(absmax=block_absmax(q), shape=q.shape, dtype=q.dtype, blocksize=q.blocksize,
                            quant_type="nf4")
    out = bnbf.dequantize_4bit(q.packed.reshape(-1, 1), state)
    return out.reshape(q.shape).to(dtype or q.dtype)
