"""``QuantLinear``: a frozen linear layer whose weight is stored quantised (NF4 or int8) and dequantised on the fly.

This is the base layer of QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, Sec. 3 eq. 5-6):
``Y = X doubleDequant(c1, c2, W_nf4) + X L1 L2`` - the frozen weight is kept in 4 bits and only materialised in
the compute dtype for the matmul, while gradients flow through it to the input (and so to LoRA adapters and to
earlier layers) but never to the weight itself.

Memory: a custom autograd Function dequantises the weight in ``forward``, uses it, and drops it; ``backward``
dequantises it *again* for ``dY W``. Letting autograd save the dequantised weight instead would keep a full 16/32-bit
copy of every layer alive between forward and backward, giving back exactly what quantisation saved. Nothing is
saved for backward at all: the input is not needed because the weight gets no gradient.

Interface for wrappers (the QLoRA adapter layer builds on this; it does not need to know which kind is inside):

* ``is_quant_linear = True`` - a class marker, so model-walking code can recognise the layer without importing it.
* ``in_features``, ``out_features`` - ints, as on ``nn.Linear``.
* ``forward(x)`` - ``x @ W.T + b`` with ``W`` dequantised to the compute dtype.
* ``dequantize(dtype=None)`` - the float weight in ``(out, in)`` layout (for merging and export). A layer built
  from GPT-2's ``Conv1D`` has ``fan_in_fan_out = True``; transpose to get the checkpoint's ``(in, out)`` layout.
* ``weight_shape`` - ``torch.Size([out, in])``; ``nbytes()`` - bytes of the quantised weight (bias excluded).
* ``weight`` - a :class:`QuantizedWeight` stand-in with ``shape``/``dtype``/``device``/``ndim``/``requires_grad``
  (False) for code that only inspects a layer's weight; it is not a tensor, so code that would do arithmetic on
  ``module.weight`` fails loudly instead of silently running on something else. Call ``dequantize()`` instead.
* ``bias`` - the original ``nn.Parameter`` (the same object, its ``requires_grad`` untouched).

The quantised weight is held in buffers (``qweight_*``; uint8/int8 codes and fp32 constants), so it follows
``module.to(device)``, appears in ``state_dict()`` as plain safetensors-compatible tensors, and is never handed to an
optimizer. A dtype cast (``model.half()``, ``model.to(torch.bfloat16)``) changes the layer's float dtype (the
compute dtype, unless one was fixed) but never the fp32 quantisation constants.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.quant.int8 import Int8RowTensor, dequantize_int8_rowwise, quantize_int8_rowwise
from tuneforge.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = ["QuantLinear", "QuantizedWeight", "quantize_model_", "KINDS"]

KINDS = ("nf4", "int8")


class _DequantLinearFn(torch.autograd.Function):
    """``F.linear(x, dequant(), bias)`` with a gradient for ``x`` (and ``bias``) only; saves nothing."""

    @staticmethod
    def forward(ctx, x, bias, dequant: Callable[[torch.dtype], torch.Tensor]):
        ctx.dequant = dequant
        ctx.bias_shape = None if bias is None else bias.shape
        return F.linear(x, dequant(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(ctx.dequant(grad_out.dtype))
        if ctx.bias_shape is not None and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class QuantizedWeight:
    """Read-only description of a :class:`QuantLinear`'s weight, for code that inspects ``module.weight``."""

    requires_grad = False
    is_quantized = True

    def __init__(self, module: QuantLinear):
        self._module = module

    @property
    def shape(self) -> torch.Size:
        return self._module.weight_shape

    @property
    def dtype(self) -> torch.dtype:
        return self._module.compute_dtype or self._module.dtype

    @property
    def device(self) -> torch.device:
        return self._module.qweight_absmax.device

    @property
    def ndim(self) -> int:
        return 2

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._module.dequantize(dtype)

    def __repr__(self) -> str:
        m = self._module
        return f"QuantizedWeight({m.kind}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class QuantLinear(nn.Module):
    """A frozen ``y = x W^T + b`` whose ``W`` is an :class:`NF4Tensor` or :class:`Int8RowTensor` (see module doc)."""

    is_quant_linear = True  # duck-typing marker for code that must not import this module

    is_quant_linear = True  # read by models.arch: a linear layer that adapter methods may wrap

    def __init__(self, qweight: NF4Tensor | Int8RowTensor, bias: nn.Parameter | None = None,
                 compute_dtype: torch.dtype | None = None, fan_in_fan_out: bool = False, backend: str = "auto"):
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D (out, in) weight, got shape {tuple(qweight.shape)}")
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={self.out_features}")
        self.kind = "nf4" if isinstance(qweight, NF4Tensor) else "int8"
        self.dtype = qweight.dtype  # the layer's float dtype: original weight dtype, follows module casts
        self.compute_dtype = compute_dtype
        self.fan_in_fan_out = fan_in_fan_out
        self.backend = backend
        if self.kind == "nf4":
            self.blocksize, self.double_quant = qweight.blocksize, qweight.double_quant
            self._absmax_blocksize = qweight.absmax_blocksize
            for name, t in qweight.tensors().items():
                self.register_buffer(f"qweight_{name}", t)
        else:
            self.blocksize, self.double_quant = None, False
            self.register_buffer("qweight_data", qweight.data)
            self.register_buffer("qweight_absmax", qweight.absmax)
        self.bias = bias

    # ---- construction ----

    @classmethod
    def from_linear(cls, linear: nn.Module, kind: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, backend: str = "auto") -> QuantLinear:
        """Quantise an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose ``(in, out)`` weight is transposed first)."""
        conv1d = _is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        w = linear.weight.detach()
        w = w.t() if conv1d else w
        if kind == "nf4":
            q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant, backend=backend)
        elif kind == "int8":
            q = quantize_int8_rowwise(w)
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return cls(q, linear.bias, compute_dtype=compute_dtype, fan_in_fan_out=conv1d, backend=backend)

    # ---- the quantised weight ----

    def qweight(self) -> NF4Tensor | Int8RowTensor:
        """The quantised weight rebuilt from the current buffers (after ``.to()`` or ``load_state_dict``)."""
        shape = self.weight_shape
        if self.kind == "int8":
            return Int8RowTensor(self.qweight_data, self.qweight_absmax, shape, self.dtype)
        extra = {}
        if self.double_quant:
            extra = dict(absmax2=self.qweight_absmax2, absmax_offset=self.qweight_absmax_offset,
                         absmax_blocksize=self._absmax_blocksize)
        return NF4Tensor(self.qweight_packed, self.qweight_absmax, shape, self.dtype, self.blocksize, **extra)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight, ``(out, in)``, in ``dtype`` (default: the layer's dtype). A fresh tensor each call."""
        q = self.qweight()
        dtype = dtype or self.dtype
        if self.kind == "int8":
            return dequantize_int8_rowwise(q, dtype)
        return dequantize_nf4(q, dtype, backend=self.backend)

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self)

    def _quant_buffer_names(self) -> list[str]:
        return [n for n in self._buffers if n.startswith("qweight_")]

    def nbytes(self) -> int:
        """Bytes held by the quantised weight (codes and constants; the bias is not counted)."""
        return sum(self._buffers[n].numel() * self._buffers[n].element_size() for n in self._quant_buffer_names())

    # ---- forward ----

    def _matmul_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The fixed compute dtype; else autocast's dtype when active (dequantise straight to it); else x's."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        dev = x.device.type
        if x.is_floating_point() and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """With a fixed ``compute_dtype`` the output is cast back to ``x.dtype`` (as bitsandbytes' Linear4bit)."""
        dt = self._matmul_dtype(x)
        bias = None if self.bias is None else self.bias.to(dt)
        out = _DequantLinearFn.apply(x.to(dt), bias, self.dequantize)
        return out.to(x.dtype) if self.compute_dtype is not None else out

    # ---- dtype/device moves ----

    def _apply(self, fn, recurse: bool = True):
        """Move the quantised buffers with the module but never change their dtypes.

        ``module.half()`` would otherwise round the fp32 absmax constants to fp16 (and a later ``.float()`` could not
        undo it). Instead, what ``fn`` does to an empty tensor of the layer's float dtype becomes the new float dtype.
        """
        originals = {n: self._buffers[n] for n in self._quant_buffer_names()}
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.qweight_absmax.device))
        super()._apply(fn, recurse)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.dtype = probe.dtype
        for name, old in originals.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        extra = f", blocksize={self.blocksize}, double_quant={self.double_quant}" if self.kind == "nf4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kind={self.kind}{extra}, dtype={self.dtype}, compute_dtype={self.compute_dtype}")


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` equals a pattern, ends with ``.pattern``, or fully matches ``re:<regex>``."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of weights used by more than one module (tied embeddings/heads): quantising one would untie them."""
    users: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    return {pid for pid, n in users.items() if n > 1}


def quantize_model_(model: nn.Module, kind: str = "nf4", targets: Iterable[str] | None = None,
                    skip: Iterable[str] = ("lm_head",), blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, backend: str = "auto") -> tuple[int, int]:
    """Replace ``nn.Linear`` / ``Conv1D`` layers in place by :class:`QuantLinear`; returns ``(bytes_before, after)``.

    ``targets``: module names to quantise (exact, ``.suffix`` or ``re:<regex>``); None = every plain ``nn.Linear``
    and ``Conv1D``. ``skip`` wins over ``targets`` (the output head is skipped by default: it is often tied to the
    input embedding and is the layer most sensitive to quantisation error). Subclasses of ``nn.Linear`` are left
    alone (e.g. ``MultiheadAttention.out_proj`` is read through ``.weight`` rather than called), as are layers whose
    weight is shared with another module, with a warning. Bytes count only the replaced weights, not biases.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    targets = None if targets is None else list(targets)
    skip = list(skip or ())
    shared = _shared_weights(model)
    before = after = 0
    for name, module in list(model.named_modules()):
        if not (type(module) is nn.Linear or _is_conv1d(module)) or _matches(name, skip):
            continue
        if targets is not None and not _matches(name, targets):
            continue
        if id(module.weight) in shared:
            warnings.warn(f"not quantising {name!r}: its weight is shared with another module", stacklevel=2)
            continue
        q = QuantLinear.from_linear(module, kind, blocksize, double_quant, compute_dtype, backend)
        before += module.weight.numel() * module.weight.element_size()
        after += q.nbytes()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return before, after
