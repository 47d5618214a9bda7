"""8-bit quantisers in pure PyTorch: row-wise absmax int8 weights and blockwise 8-bit codes.

Two schemes live here because two different consumers need them:

* **Row-wise absmax int8** for frozen weights, after LLM.int8() (Dettmers et al. 2022,
  https://arxiv.org/abs/2208.07339, Sec. 3.1 eq. 1 and the "vector-wise" scaling of Sec. 3.2): each output row
  ``W[i]`` is scaled by ``127 / max|W[i]|`` and rounded, so ``W[i] ~= q[i] * max|W[i]| / 127``. One constant per
  output channel means an outlier only costs precision in its own row. The mixed-precision outlier decomposition
  of the paper (fp16 matmul for outlier feature columns of the *activations*) is deliberately left out: it is a
  speed/accuracy trick of the int8 matmul kernel, while tuneforge dequantises and runs the matmul in float.

* **Blockwise 8-bit codes** for tensors that are *state* rather than weights (the absmax constants of NF4 double
  quantisation and the Adam moments of :mod:`tuneforge.train.adam8bit`), after "8-bit Optimizers via Block-wise
  Quantization" (Dettmers et al. 2022, https://arxiv.org/abs/2110.02861, Sec. 2.1, eq. 1-2): the flat tensor is cut
  into blocks of ``blocksize``; each block is divided by its own absmax, giving values in [-1, 1], and each value is
  stored as the index (uint8) of the nearest entry of a 256-entry code book. Blocks confine an outlier's damage to
  one block and make every block's largest value exactly representable.

Code books (all sorted ascending, 256 entries, all containing 0 so zero-initialised state stays exactly zero):

* :func:`dynamic_map` - the *dynamic tree* data type (Dettmers 2015, https://arxiv.org/abs/1511.04561; Sec. 2.2 of
  the 8-bit optimizer paper): after the sign bit, the number of leading zero bits is a base-10 exponent, the first
  1 bit is an indicator, and the remaining bits are a linear fraction in [0.1, 1]. Magnitudes from ~1e-7 to 1 are
  covered with relative, not absolute, precision - what Adam's second moment (spanning many orders of magnitude)
  needs. ``signed=False`` reuses the sign bit as one more fraction bit (used for the non-negative ``v``).
* :func:`linear_map` - evenly spaced values (step 1/127 signed, 1/255 unsigned), offered for comparison and tests;
  it is the plain "linear quantisation" of eq. 1, with absolute rather than relative precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "Int8RowTensor", "quantize_int8_rowwise", "dequantize_int8_rowwise",
    "dynamic_map", "linear_map", "get_code", "quantize_blockwise", "dequantize_blockwise",
]


# ---- Row-wise absmax int8 (weights) ----


@dataclass
class Int8RowTensor:
    """A 2-D weight stored as int8 rows and one fp32 absmax per row (``W ~= data * absmax[:, None] / 127``)."""

    data: torch.Tensor  # int8, (out, in)
    absmax: torch.Tensor  # fp32, (out,)
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original weight (what dequantisation returns by default)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.absmax.numel() * self.absmax.element_size()

    def bits_per_param(self) -> float:
        """8 + 32 / in_features: the int8 code plus the row's fp32 constant spread over the row."""
        return 8.0 * self.nbytes() / max(1, self.data.numel())


def quantize_int8_rowwise(w: torch.Tensor) -> Int8RowTensor:
    """LLM.int8() eq. 1 applied per output row: ``q = round(127 * W / max|W_row|)``.

    ``torch.round`` rounds halves to even; |q| <= 127 so the code is symmetric and -128 is never used (a symmetric
    code keeps ``-W`` exactly representable whenever ``W`` is). All-zero rows get absmax 0 and decode to 0.
    """
    if w.ndim != 2:
        raise ValueError(f"row-wise int8 quantisation expects a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {w.dtype}")
    w32 = w.detach().float()
    if not torch.isfinite(w32).all():
        raise ValueError("cannot quantise a weight containing NaN or Inf")
    absmax = w32.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    q = torch.round(w32 * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8RowTensor(q, absmax, w.shape, w.dtype)


def dequantize_int8_rowwise(q: Int8RowTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W = q * absmax / 127`` computed in fp32, then cast to ``dtype`` (default: the original dtype)."""
    w = q.data.float() * (q.absmax / 127.0)[:, None]
    return w.to(dtype or q.dtype)


# ---- Code books ----


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry dynamic tree code book, sorted, in fp32 (see module docstring).

    With 7 bits after the sign, exponent ``e`` (0..6 leading zeros) leaves ``6 - e`` fraction bits, i.e. ``2**(6-e)``
    fraction values (twice that when unsigned, the sign bit becoming a fraction bit). The fraction values are the
    midpoints of an even split of [0.1, 1] into that many bins, scaled by ``10**-e``. The two remaining codes are
    0 and 1 (so a block's absmax element is exact). Signed: 2 * 127 + 2 = 256 entries; unsigned: 254 + 2.
    The fp32 arithmetic order (linspace, midpoint, scale) matches bitsandbytes' ``create_dynamic_map`` so the two
    code books are bit-identical (asserted by the parity test when bitsandbytes is installed).
    """
    values: list[float] = []
    for frac_bits in range(7):  # frac_bits = 6 - e: magnitudes 10**-6 ... 10**0
        count = 2 ** frac_bits * (1 if signed else 2)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (frac_bits - 6)) * mids
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    if len(values) != 256:  # pragma: no cover - a construction bug, not a user error
        raise AssertionError(f"dynamic map has {len(values)} entries")
    return torch.tensor(sorted(values), dtype=torch.float32)


def linear_map(signed: bool = True) -> torch.Tensor:
    """Evenly spaced code book: ``k / 127`` for k in -128..127 (signed) or ``k / 255`` for k in 0..255 (unsigned).

    The signed table keeps 0 and +-1 exact; its first entry, -128/127, lies below -1 and is never chosen after
    absmax scaling (it only fills the 256th slot - a duplicate 0 instead would make indices ambiguous).
    """
    if signed:
        return torch.arange(-128, 128, dtype=torch.float32) / 127.0
    return torch.arange(256, dtype=torch.float32) / 255.0


@lru_cache(maxsize=None)
def _code_cpu(name: str) -> torch.Tensor:
    makers = {"dynamic": lambda: dynamic_map(True), "udynamic": lambda: dynamic_map(False),
              "linear": lambda: linear_map(True), "ulinear": lambda: linear_map(False)}
    if name not in makers:
        raise ValueError(f"unknown 8-bit code {name!r}; expected one of {sorted(makers)}")
    return makers[name]()


_DEVICE_CODES: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def get_code(name: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(code, midpoints)`` on ``device``, cached. Midpoints are the decision boundaries of nearest rounding."""
    key = (name, torch.device(device))
    if key not in _DEVICE_CODES:
        code = _code_cpu(name).to(key[1])
        _DEVICE_CODES[key] = (code, (code[:-1] + code[1:]) / 2)
    return _DEVICE_CODES[key]


# ---- Blockwise quantisation with a code book ----


def _as_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Zero-pad a flat tensor to whole blocks and view it as (nblocks, blocksize).

    Padding with zeros never changes a block's absmax, so a final partial block simply gets its own constant
    (the layout bitsandbytes uses) and the padding is dropped again after quantisation.
    """
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def quantize_blockwise(x: torch.Tensor, code: str = "dynamic", blocksize: int = 2048
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantisation (8-bit optimizers paper eq. 1-2): ``(codes uint8 like x, absmax fp32)``.

    Each value ``x`` of block ``b`` is stored as ``argmin_j |code[j] - x / absmax_b|``, found with a binary search
    over the midpoints between neighbouring code values. A value exactly on a midpoint takes the lower code
    (``torch.bucketize`` with ``right=False``). ``x / absmax`` is computed as ``x * (1 / absmax)`` - the
    bitsandbytes kernels' arithmetic - and clamped to [-1, 1] against rounding; all-zero blocks get absmax 0.
    Unsigned codes (``"udynamic"``, ``"ulinear"``) require ``x >= 0``; negative values would clamp to 0.
    """
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    values, mids = get_code(code, x.device)
    blocks = _as_blocks(x.detach().reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    lo = float(values[0])
    scaled = (blocks * inv[:, None]).clamp_(lo, 1.0)
    idx = torch.bucketize(scaled, mids).to(torch.uint8)
    return idx.reshape(-1)[: x.numel()].reshape(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: str = "dynamic", blocksize: int = 2048,
                         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[idx] * absmax_b`` in fp32, cast to ``out_dtype``."""
    values, _ = get_code(code, codes.device)
    vals = _as_blocks(values[codes.reshape(-1).long()], blocksize)
    if vals.shape[0] != absmax.numel():
        raise ValueError(f"{codes.numel()} codes in blocks of {blocksize} need {vals.shape[0]} absmax values, "
                         f"got {absmax.numel()}")
    out = (vals * absmax.float()[:, None]).reshape(-1)[: codes.numel()]
    return out.reshape(codes.shape).to(out_dtype)
