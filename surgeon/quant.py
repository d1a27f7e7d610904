"""Blockwise 4-bit (NF4, FP4) and 8-bit quantization in plain PyTorch, bit-identical to bitsandbytes.

API (used by surgeon/methods/quantize.py; keep these names and signatures):

    qt = quantize(weight, "nf4", blocksize=64, double=True)   # QuantizedTensor
    w = qt.dequantize(torch.bfloat16)                          # tensor of qt.shape in that dtype
    qt.dequantize(torch.float32, out=buffer)                   # into a preallocated buffer
    qt.nbytes                                                  # bytes of everything stored
    qt.tensors() / QuantizedTensor.from_tensors(...)           # for safetensors / buffers

Layout (as bitsandbytes): the tensor is flattened row-major and cut into blocks of `blocksize`;
each block is scaled by its absmax (fp32); NF4/FP4 codes are 4 bits, two per byte, element 2i in
the high nibble. `double` quantizes the fp32 absmaxes again: their mean is subtracted (offset) and
the rest is quantized with bitsandbytes' signed 8-bit dynamic map in blocks of 256, one fp32 scale
per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QTYPES = ("nf4", "fp4", "int8")


@dataclass
class QuantizedTensor:
    qtype: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the original tensor
    blocksize: int
    codes: torch.Tensor  # uint8
    absmax: torch.Tensor  # float32 per block, or uint8 codes when double
    double: bool = False
    absmax_scale: torch.Tensor | None = None  # float32, one per 256 absmaxes (double only)
    absmax_offset: torch.Tensor | None = None  # float32 scalar (double only)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


def quantize(tensor: torch.Tensor, qtype: str, blocksize: int = 64, double: bool = False) -> QuantizedTensor:
    raise NotImplementedError
