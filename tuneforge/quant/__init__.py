"""Weight quantisation for memory-efficient fine-tuning, in pure PyTorch (bitsandbytes optional).

* :mod:`tuneforge.quant.nf4` - QLoRA's 4-bit NormalFloat with blockwise absmax and double quantisation.
* :mod:`tuneforge.quant.int8` - row-wise absmax int8 weights (LLM.int8()-style) and blockwise 8-bit code books
  (dynamic tree / linear) used by double quantisation and by :class:`tuneforge.train.adam8bit.AdamW8bit`.
* :mod:`tuneforge.quant.linear` - :class:`QuantLinear`, a frozen quantised linear layer that dequantises on the fly,
  and :func:`quantize_model_`, which swaps a model's linear layers for it.
"""

from tuneforge.quant.int8 import (Int8RowTensor, dequantize_blockwise, dequantize_int8_rowwise, dynamic_map,
                                  linear_map, quantize_blockwise, quantize_int8_rowwise)
from tuneforge.quant.linear import QuantizedWeight, QuantLinear, quantize_model_
from tuneforge.quant.nf4 import NF4_CODE, NF4Tensor, bits_per_param, derive_nf4_code, dequantize_nf4, quantize_nf4

__all__ = [
    "NF4_CODE", "NF4Tensor", "bits_per_param", "derive_nf4_code", "dequantize_nf4", "quantize_nf4",
    "Int8RowTensor", "quantize_int8_rowwise", "dequantize_int8_rowwise", "dynamic_map", "linear_map",
    "quantize_blockwise", "dequantize_blockwise", "QuantLinear", "QuantizedWeight", "quantize_model_",
]
