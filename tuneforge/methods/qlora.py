"""QLoRA: LoRA on a frozen base whose linear weights are stored as 4-bit NormalFloat (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314, eq. 5):

    Y = X · doubleDequant(c1, c2, W_NF4) + s · X A^T B^T

Every linear layer but the output head is quantised (the paper quantises all of them, and puts LoRA on all of
them to recover 16-bit quality): NF4 codes in blocks of 64 with their absmax constants, themselves quantised to 8 bits
in blocks of 256 (double quantisation), ≈4.127 bits per weight instead of 16. The weight is dequantised on the fly in
forward and again in backward (``tuneforge.quant.linear.QuantLinear``), so only one layer's float weight exists at
a time. ``bits: 8`` stores row-wise absmax int8 instead. bitsandbytes is used for (de)quantisation where it is
installed and supports the device (``backend``); the pure-PyTorch path runs everywhere, CPU included.

The adapter is an ordinary LoRA adapter: it is saved in PEFT's LoRA layout (so PEFT and vLLM load it on the
16-bit base, as they do QLoRA adapters), with the quantisation settings recorded for tuneforge in
``tuneforge_adapter.json`` beside it, so that tuneforge reloads it on a re-quantised base, exactly as it was trained.

Why ``merge`` writes a 16/32-bit model: folding B A into 4-bit codes would re-quantise W + ΔW, and ΔW is usually far
smaller than one NF4 step (absmax/8 or so), so most of the adapter would round away. ``merge`` therefore dequantises
every layer, adds ΔW in float and leaves plain ``nn.Linear`` (or GPT-2 ``Conv1D``) layers; quantise the merged model
again for serving if memory demands it, knowing that costs some of what the adapter learnt.
"""

from __future__ import annotations

import re

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from tuneforge.methods import lora
from tuneforge.methods._inject import replace_module
from tuneforge.models import arch

PEFT_TYPE = "LORA"  # the adapter itself is LoRA; read_adapter_config tells the two apart by tuneforge_adapter.json


class Config(lora.Config):
    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    bits: Literal[4, 8] = Field(4, description="4 = NF4 (the paper), 8 = row-wise absmax int8")
    blocksize: int = Field(64, gt=0, description="NF4 block size (weights per absmax constant)")
    double_quant: bool = Field(True, description="quantise the absmax constants to 8 bits (blocks of 256)")
    backend: Literal["auto", "torch", "bnb"] = Field("auto", description="auto = bitsandbytes where it runs")

    def lora_config(self) -> lora.Config:
        return lora.Config(**{k: v for k, v in self.model_dump().items() if k in lora.Config.model_fields
                              and k != "name"})


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    from tuneforge.quant.linear import QuantLinear

    return {p: m for p, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantize_base_(model: nn.Module, cfg: Config) -> tuple[int, int]:
    """Quantise every plain linear layer except the output head; (bytes before, bytes after)."""
    from tuneforge.quant.linear import quantize_model_

    if any(p.device.type == "meta" for p in model.parameters()):
        return 0, 0  # a weightless model (config checks): only the adapter's shapes matter
    heads = arch.output_head_names(model)  # (and everything inside a classifier head: it trains in full)
    skip = [*heads, *(f"re:{re.escape(h)}\\..*" for h in arch.task_head_names(model))] or ["lm_head"]
    # what the model keeps in fp32 (T5's FFN output ``wo``, whose forward reads its weight's dtype) stays as it is,
    # as transformers' own 4-bit loading leaves it; LoRA still adapts it
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return quantize_model_(model, kind="nf4" if cfg.bits == 4 else "int8", skip=skip,
                           blocksize=cfg.blocksize, double_quant=cfg.double_quant, backend=cfg.backend)


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    """Quantise the base (once: a second adapter reuses it), then add LoRA adapter ``adapter`` on top."""
    if not quantized_layers(model):
        quantize_base_(model, cfg)
    lora.apply(model, cfg.lora_config(), adapter)


def dequantize_base_(model: nn.Module) -> None:
    """Replace every quantised layer by a float ``nn.Linear``/``Conv1D`` holding its dequantised weight."""
    for path, q in sorted(quantized_layers(model).items(), key=lambda kv: -kv[0].count(".")):
        w = q.dequantize()  # (out, in)
        if q.fan_in_fan_out:
            plain = Conv1D(q.out_features, q.in_features)
            plain.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        else:
            plain = nn.Linear(q.in_features, q.out_features, bias=False, device=w.device, dtype=w.dtype)
            plain.weight = nn.Parameter(w, requires_grad=False)
        plain.bias = q.bias
        replace_module(model, path, plain)


def merge(model: nn.Module, adapter: str = "default") -> None:
    """Dequantise, then fold the LoRA update in float (see the module docstring for why not into 4 bits)."""
    dequantize_base_(model)
    lora.merge(model, adapter)


def unload(model: nn.Module) -> None:
    dequantize_base_(model)
    lora.unload(model)


def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    return lora.state_dict(model, cfg, adapter)


def load_state_dict(model: nn.Module, cfg: Config | None, tensors: dict[str, torch.Tensor],
                    adapter: str = "default") -> None:
    lora.load_state_dict(model, cfg, tensors, adapter)


def peft_config(model: nn.Module, cfg: Config, base_path: str | None, adapter: str = "default") -> dict:
    """PEFT's LoRA config: PEFT loads the adapter on a 16-bit base; the quantisation settings live in tuneforge's
    own file beside it (``methods.METHODS_FILE``)."""
    return lora.peft_config(model, cfg.lora_config(), base_path, adapter)


def from_peft_config(d: dict) -> Config:
    return Config(**lora.from_peft_config(d).model_dump(exclude={"name"}))
