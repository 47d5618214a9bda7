"""AdamW with 8-bit blockwise-quantised moments, in pure PyTorch.

Reference: Dettmers, Lewis, Shleifer & Zettlemoyer 2022, "8-bit Optimizers via Block-wise Quantization",
https://arxiv.org/abs/2110.02861.

Why: Adam keeps two fp32 moments per parameter, 8 bytes - twice the bf16 weights themselves. Storing them in 8 bits
cuts that to 2 bytes (+ 4 bytes per block of constants) while, per the paper, matching 32-bit Adam's results:

* **Block-wise quantisation** (Sec. 2.1, eq. 1-2): each moment tensor is split into blocks of ``block_size``
  (2048, the paper's choice) normalised by their own absmax, so one outlier only coarsens its own block.
* **Dynamic (tree) quantisation** (Sec. 2.2): the 8-bit code book is :func:`tuneforge.quant.int8.dynamic_map`,
  a sign bit, a base-10 exponent and a linear fraction, so magnitudes from ~1e-7 to 1 (relative to the block absmax)
  keep relative precision. ``exp_avg`` (m) uses the signed map; ``exp_avg_sq`` (v), being non-negative, the unsigned
  map, which spends the sign bit on one more fraction bit - as in the paper and bitsandbytes.
* **Update** (Sec. 2, "8-bit optimizers"): each step dequantises the moments to fp32, performs the ordinary AdamW
  update (Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101, Algorithm 2, in PyTorch's arithmetic) with the
  fresh fp32 moments, then requantises them for storage. The parameter itself is updated in fp32 (and written back
  in its own dtype).
* **Small tensors** (fewer than ``min_8bit_size`` = 4096 elements: biases, norms, small adapters) keep fp32
  moments, as bitsandbytes does: they are a negligible share of the memory, and are the most sensitive to error.
  Those tensors get exactly ``torch.optim.AdamW``'s arithmetic (bit-identical to its single-tensor path, tested).

``offload=True`` keeps every moment in CPU memory: per parameter, the gradient and the parameter are copied to the
CPU, updated there, and the parameter copied back. It trades PCIe traffic for accelerator memory. On a CPU-only
machine it is the same code path with no-op copies.

``paged=True`` is refused. Paged optimizers (bitsandbytes ``PagedAdamW8bit``) put the state in CUDA unified memory,
which the driver evicts to CPU RAM page by page when the GPU runs short; there is no such memory on a CPU (the state
is already in RAM, so a clear error is raised), and this pure-torch optimizer does not implement it on CUDA either
(use ``offload=True``, or bitsandbytes' paged optimizer).

State per parameter: ``step`` (python int) and either ``exp_avg``/``exp_avg_sq`` (fp32) or
``exp_avg_code``/``exp_avg_sq_code`` (uint8, the parameter's shape) with ``exp_avg_absmax``/``exp_avg_sq_absmax``
(fp32, one per block). All tensors or plain python, so ``tuneforge.train.checkpoint.optimizer_to_tensors`` stores it
as safetensors + JSON; :meth:`AdamW8bit.load_state_dict` restores the uint8/fp32 tensors without the dtype cast
``torch.optim.Optimizer`` would apply (it casts every state tensor to the parameter's dtype).
"""

from __future__ import annotations

from typing import Iterable

import torch

from tuneforge.quant.int8 import dequantize_blockwise, quantize_blockwise

__all__ = ["AdamW8bit"]

_MOMENTS = (("exp_avg", "dynamic"), ("exp_avg_sq", "udynamic"))


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored 8-bit blockwise-quantised (see module docstring).

    Signature-compatible with ``torch.optim.AdamW`` for what tuneforge uses: param groups (each may override
    ``lr``, ``betas``, ``eps``, ``weight_decay``), and ``foreach`` (accepted and ignored).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, block_size: int = 2048, offload: bool = False,
                 paged: bool = False, min_8bit_size: int = 4096, foreach: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if block_size <= 0 or min_8bit_size < 0:
            raise ValueError(f"block_size must be > 0 and min_8bit_size >= 0, got {block_size}, {min_8bit_size}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.block_size = int(block_size)
        self.min_8bit_size = int(min_8bit_size)
        self.offload = bool(offload)
        if paged:
            self._refuse_paged()

    def _refuse_paged(self) -> None:
        devices = {p.device.type for g in self.param_groups for p in g["params"]}
        if devices <= {"cpu"}:
            raise ValueError("paged=True needs CUDA: paged optimizers keep their state in CUDA unified memory and let "
                             "the driver page it to CPU RAM under memory pressure; on CPU the state is already in "
                             "RAM. Drop `paged` (or use offload=True on a GPU machine).")
        raise NotImplementedError("paged=True is not implemented by tuneforge's pure-PyTorch AdamW8bit; use "
                                  "offload=True (moments in CPU RAM) or bitsandbytes' PagedAdamW8bit.")

    # ---- state layout ----

    def _state_device(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.offload else p.device

    def _quantised(self, p: torch.Tensor) -> bool:
        return p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        zeros = torch.zeros(p.shape, dtype=torch.float32, device=self._state_device(p))
        if self._quantised(p):
            self._store(state, zeros, zeros)
        else:
            state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()

    def _load(self, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32 moments: the live tensors (small params) or freshly dequantised copies."""
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        return tuple(dequantize_blockwise(state[f"{k}_code"], state[f"{k}_absmax"], code, self.block_size)
                     for k, code in _MOMENTS)

    def _store(self, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        """Requantise the moments (no-op for fp32 state, which was updated in place)."""
        if "exp_avg" in state:
            return
        for (key, code), t in zip(_MOMENTS, (m, v)):
            state[f"{key}_code"], state[f"{key}_absmax"] = quantize_blockwise(t, code, self.block_size)

    def state_bytes(self) -> int:
        """Bytes held by all optimizer state tensors."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    # ---- the update ----

    @staticmethod
    def _adamw(p32, g, m, v, step: int, lr: float, beta1: float, beta2: float, eps: float, wd: float) -> None:
        """One AdamW step in place, in the order and arithmetic of ``torch.optim.AdamW`` (single-tensor path)."""
        p32.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        p32.addcdiv_(m, denom, value=-step_size)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        state = self.state[p]
        if not state:
            self._init_state(p, state)
        dev = self._state_device(p)
        g = p.grad.detach().to(dev, torch.float32)
        p32 = p.detach().to(dev, torch.float32)  # p itself when already fp32 on ``dev``
        m, v = self._load(state)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        self._adamw(p32, g, m, v, state["step"], group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        self._store(state, m, v)
        if p32.data_ptr() != p.data_ptr():
            p.detach().copy_(p32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    # ---- checkpointing ----

    def load_state_dict(self, state_dict: dict) -> None:
        """Like ``Optimizer.load_state_dict`` but keeps the saved dtypes (uint8 codes, fp32 absmax and moments)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in state_dict["state"]:
                self.state[p] = self._restored(p, state_dict["state"][pid])

    def _restored(self, p: torch.Tensor, saved: dict) -> dict:
        dev = self._state_device(p)
        state = {k: v.detach().to(dev, copy=True) if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = int(state["step"].item())
        if "exp_avg_code" in state:
            blocks = -(-p.numel() // self.block_size)
            for key, _ in _MOMENTS:
                if state[f"{key}_code"].shape != p.shape or state[f"{key}_absmax"].numel() != blocks:
                    raise ValueError(f"saved 8-bit state of {key} does not fit a parameter of shape {tuple(p.shape)} "
                                     f"with block_size={self.block_size} (saved with another block size?)")
                state[f"{key}_code"] = state[f"{key}_code"].to(torch.uint8)
                state[f"{key}_absmax"] = state[f"{key}_absmax"].float()
        elif "exp_avg" in state:
            state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].float(), state["exp_avg_sq"].float()
        return state
