"""Blockwise 4-bit (NF4, FP4) and 8-bit quantization, bit-identical to bitsandbytes.

- `codec.py`: the codebooks, `QuantizedTensor`, `quantize` and the dequantize kernels (the API
  below; the layout is documented there);
- `threads.py`: the CPU thread pool, scratch buffers and huge-page outputs the kernels run on;
- `cuda.py`: the fused Triton dequantize used on CUDA when Triton is there;
- `bnb.py`: bitsandbytes' serialized 4-bit format (`surgeon merge --requantize`).

The layer that computes with a quantized weight is the `quantize` method's
(surgeon/methods/weights/quantize.py).
"""

from surgeon.quant.codec import (QTYPES, QuantizedTensor, build_tables, code_4bit, dequantize_plain, dynamic_map,
                                 quantize)

__all__ = ["QTYPES", "QuantizedTensor", "build_tables", "code_4bit", "dequantize_plain", "dynamic_map", "quantize"]
