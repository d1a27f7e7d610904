"""A fused CUDA dequantize for 4-bit codes (Triton), used by `surgeon.quant` when the codes are on a
CUDA device and Triton is importable; everywhere else the torch path runs.

The torch path needs four kernels (widen the bytes, look up code pairs, scale, cast); this one reads
each packed byte and its block's absmax once and writes the two output values, so a dequantize
moves about the bytes a copy would. The arithmetic is the same: code (fp32) * absmax (fp32), one
IEEE product, rounded once to the output dtype, so the results are bit-identical to the torch path.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

_BYTES_PER_PROGRAM = 1024


@lru_cache(maxsize=1)
def _kernel() -> Any | None:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dequantize_4bit(codes_ptr, absmax_ptr, table_ptr, out_ptr, nbytes,
                        HALF: tl.constexpr, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < nbytes
        byte = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + offsets // HALF, mask=mask, other=0.0)
        high = tl.load(table_ptr + (byte >> 4)) * scale
        low = tl.load(table_ptr + (byte & 15)) * scale
        values = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
        out_offsets = 2 * start + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_offsets, values, mask=out_offsets < 2 * nbytes)

    return dequantize_4bit


def dequantize_4bit_fused(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int,
                          nbytes: int, out: torch.Tensor) -> bool:
    """Write the first 2 * nbytes values of `out` (whole blocks only); False when Triton is missing."""
    kernel = _kernel()
    if kernel is None or codes.device.type != "cuda":
        return False
    grid = ((nbytes + _BYTES_PER_PROGRAM - 1) // _BYTES_PER_PROGRAM,)
    kernel[grid](codes, absmax, table, out, nbytes, HALF=blocksize // 2, BLOCK=_BYTES_PER_PROGRAM)
    return True
