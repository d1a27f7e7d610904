"""Blockwise 4-bit (NF4, FP4) and 8-bit quantization in plain PyTorch, bit-identical to bitsandbytes.

API (used by surgeon/methods/weights/quantize.py; keep these names and signatures):

    qt = quantize(weight, "nf4", blocksize=64, double=True)   # QuantizedTensor
    w = qt.dequantize(torch.bfloat16)                          # tensor of qt.shape in that dtype
    qt.dequantize(torch.float32, out=buffer)                   # into a preallocated buffer
    qt.nbytes                                                  # bytes of everything stored
    qt.tensors() / QuantizedTensor.from_tensors(...)           # for safetensors / buffers
    dequantize_plain(qt, torch.bfloat16)                       # the same values in plain torch ops:
                                                               # what `dequantize` runs under torch.compile

Layout (as bitsandbytes): the tensor is flattened row-major and cut into blocks of `blocksize`;
each block is scaled by its absmax (fp32); NF4/FP4 codes are 4 bits, two per byte, element 2i in
the high nibble. `double` quantizes the fp32 absmaxes again: their mean is subtracted (offset) and
the rest is quantized with bitsandbytes' signed 8-bit dynamic map in blocks of 256, one fp32 scale
per block.

Stored tensors (all 1-D and contiguous unless said otherwise):

    codes          uint8  nf4/fp4: ceil(numel / 2) bytes, element 2i in the high nibble of byte i
                          (for an odd numel the low nibble of the last byte is padding: the code of
                          0.0). `codes.view(-1, 1)` is bitsandbytes' packed `quantize_4bit` output.
                          int8: numel bytes, each the two's-complement bit pattern of a signed code
                          in [-127, 127] (`codes.view(torch.int8)` gives the signed codes).
    absmax         float32, one per block (ceil(numel / blocksize) blocks; the last one may be
                          partial), or uint8 when `double` (bitsandbytes' `QuantState.absmax`).
    absmax_scale   float32, one per 256 absmaxes (double only; `QuantState.state2.absmax`)
    absmax_offset  float32, 0-dim (double only; `QuantState.offset`)

Numerics, NF4/FP4 (bitsandbytes 0.50.2 on CPU, `quantize_4bit` -> its default torch kernel):
a full block's absmax is max|x| in fp32 and its values are scaled as x * (1 / max(absmax, 1e-38));
the last, partial block stores max(max|x|, 1e-38) and scales by true division x / absmax. The code
is the number of codebook midpoints strictly below the scaled value (ties go to the lower code;
NaN gets the last position), for FP4 mapped through bitsandbytes' code order. fp16/bf16 inputs are
widened to fp32 first (exact). A block holding NaN gets a canonical NaN absmax, as bitsandbytes'
abs().max() of a canonical-NaN input. Dequantize is code[q] * absmax in fp32 (one rounding), then one
rounding to the requested dtype: bit for bit what bitsandbytes' CPU `dequantize_4bit` returns in
fp32, bf16 and fp16 (tested). One sign-of-zero detail: FP4 code 8 is -0.0 in bitsandbytes' C kernel
(which it uses when the last dim is even) but +0.0 in its codebook and torch fallback (odd last dim);
we follow the same rule, so even that bit agrees.

Double quant (bitsandbytes' C `quantize_cpu`, 0.50.2): offset = absmax.mean(); per block of 256
values y = absmax - offset: s = max(max|y| ignoring NaNs, 0) is stored; a block with s == 0 gets
code 0 everywhere; otherwise v = clamp(y * (1 / s), -1, 1), i = trunc(fma((v + 1) * 0.5, 65535, 0.5))
and the code is a 65536-entry table built from the map's midpoints (so not always the nearest map
value: bitsandbytes' approximation, reproduced). The absmax used to dequantize is
(map[code] * s) + offset, two fp32 roundings, as bitsandbytes does. The 4-bit codes are chosen with
the exact absmax, so double quant never changes them.

int8 (surgeon's own, not a bitsandbytes format): per block absmax as above (unclamped, fp32);
code = round_half_even(fp32(x * fp32(127 / max(absmax, 1e-38)))), in [-127, 127], stored as its
int8 bit pattern in uint8; dequantize = fp32(code * fp32(absmax / 127)), rounded once to the
requested dtype. `double` works for int8 too (same second quantization of the absmaxes).

Speed: quantize never runs a binary search. The code of a scaled fp32 value is a lookup in a
65536-entry table on its top 16 bits (sign, exponent, 7 mantissa bits) plus one comparison with the
single codebook midpoint that can fall inside such a bucket (another 65536-entry table, +inf where
none does). Dequantize gathers from a 256-entry table of byte -> (two fp32 codebook values, as one
int64, already in element order) and multiplies per block. Both work in cache-sized chunks on
`torch.get_num_threads()` Python threads that take chunks as they go (a core busy with another
process slows only its share). Each worker runs torch single-threaded while it works: with OpenMP
`torch.set_num_threads` is per thread, but torch also records the value process-wide for threads
that have not yet run a parallel op; the worker puts the previous value back when it is done.
Scratch buffers are kept per thread and reused. A large fresh output buffer is advised to use
transparent huge pages (`empty`; SURGEON_QUANT_HUGEPAGES=0 turns that off): on a small VM the
4 KiB page faults of a fresh 90 MB tensor cost more than the dequantize. SURGEON_QUANT_CHUNK and
SURGEON_DEQUANT_CHUNK override the chunk sizes (elements / bytes), for tuning. Tensors of up to
16 chunks (4M parameters) run in the calling thread: on 2 vCPUs a second thread did not pay there.
The packing and key tricks view fp32/uint8 buffers as 16-bit words: little-endian CPUs only.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from dataclasses import dataclass, replace
from typing import Callable

import torch

from surgeon.quant.cuda import dequantize_4bit_fused
from surgeon.quant.threads import empty, run_chunks, scratch, single_threaded

QTYPES = ("nf4", "fp4", "int8")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DOUBLE_BLOCK = 256  # absmaxes per block of the second quantization (bitsandbytes' fixed 256)
_MIN_ABSMAX = 1e-38  # bitsandbytes' clamp before taking the reciprocal

# Elements per chunk a thread quantizes at once, bytes per chunk it dequantizes: large enough that
# torch's per-op overhead (~5 us) is noise, small enough that the scratch stays in L2.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("surgeon.quant assumes a little-endian CPU")

_QUANT_CHUNK = int(os.environ.get("SURGEON_QUANT_CHUNK", 1 << 18))
_DEQUANT_CHUNK = int(os.environ.get("SURGEON_DEQUANT_CHUNK", 1 << 17))
_INT8_CHUNK = 1 << 17


# ----------------------------------------------------------------------------------------------
# codebooks


_NF4_VALUES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), listed in code order, divided by 12.
_FP4_VALUES = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def code_4bit(qtype: str) -> torch.Tensor:
    """The 16 fp32 code values of `qtype`, as bitsandbytes' `get_4bit_type` computes them."""
    values = {"nf4": _NF4_VALUES, "fp4": _FP4_VALUES}[qtype]
    data = torch.tensor(values, dtype=torch.float32)
    return data.div_(data.abs().max())


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), 256 sorted fp32 values."""
    signed, max_exponent_bits, total_bits = True, 7, 8
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:  # pragma: no cover - not reached for the signed 8-bit map
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


class _Tables:
    """Lookup tables, built once per (qtype, device) on first use."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a device's tables are built from the CPU ones, under the lock
        self._cache: dict[tuple, object] = {}

    def get(self, key: tuple, build: Callable[[], object]) -> object:
        value = self._cache.get(key)
        if value is None:
            with self._lock, torch.inference_mode(False), torch.no_grad():
                value = self._cache.get(key)
                if value is None:
                    value = build()
                    self._cache[key] = value
        return value


_TABLES = _Tables()


def _float_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """fp32 values of unsigned 32-bit patterns given as int64."""
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _build_4bit(qtype: str) -> dict[str, torch.Tensor]:
    code = code_4bit(qtype)
    order = torch.argsort(code, stable=True)  # FP4: +0 (code 0) sorts before -0 (code 8), as in bnb
    bounds = (code[order[:-1]] + code[order[1:]]) / 2  # bitsandbytes' midpoints, fp32

    # Quantize tables over the top 16 bits of a scaled fp32 value: every float with those bits lies in
    # [lo, hi]; its sorted position is pos(lo) + (value > threshold) where the threshold is the one
    # midpoint inside [lo, hi] (no bucket holds two) or +inf.
    keys = torch.arange(65536, dtype=torch.int64)
    first = _float_from_bits(keys << 16)
    last = _float_from_bits((keys << 16) | 0xFFFF)
    lo, hi = torch.minimum(first, last), torch.maximum(first, last)
    pos_lo = torch.bucketize(lo, bounds)
    pos_hi = torch.bucketize(hi, bounds)
    if int((pos_hi - pos_lo).max()) > 1:  # pragma: no cover - a property of the codebook
        raise AssertionError(f"two {qtype} midpoints in one 16-bit bucket")
    threshold = torch.where(pos_hi > pos_lo, bounds[pos_lo.clamp(max=len(bounds) - 1)],
                            torch.tensor(float("inf")))
    special = (keys & 0x7F80) == 0x7F80  # NaN and inf: bucketize puts NaN last; s is never +-inf
    pos_lo = torch.where(special, len(bounds), pos_lo)
    threshold = torch.where(special, torch.tensor(float("inf")), threshold)
    quant_pos = pos_lo.to(torch.uint8)
    quant_threshold = threshold.to(torch.float32)

    # Dequantize table: byte -> (code[high nibble], code[low nibble]) as one int64 (little endian).
    byte = torch.arange(256)
    pair = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()
    dequant = pair.view(torch.int64).view(-1)
    # bitsandbytes' C kernel (used for an even last dim) has -0.0 for FP4 code 8, its torch fallback
    # (odd last dim) the codebook's +0.0; the values are equal, the sign bit is not.
    signed_zero = code.clone()
    if qtype == "fp4":
        signed_zero[8] = -0.0
    pair = torch.stack([signed_zero[byte >> 4], signed_zero[byte & 15]], dim=1).contiguous()
    dequant_kernel = pair.view(torch.int64).view(-1)

    # FP4: sorted position pair -> code pair, applied to each packed byte at the end of quantize.
    remap = None
    if qtype != "nf4":
        remap = ((order[byte >> 4] << 4) | order[byte & 15]).to(torch.uint8)
    return {"code": code, "code_kernel": signed_zero, "order": order, "bounds": bounds, "quant_pos": quant_pos,
            "quant_threshold": quant_threshold, "dequant": dequant,
            "dequant_kernel": dequant_kernel, "remap": remap}


def _tables_4bit(qtype: str, device: torch.device) -> dict[str, torch.Tensor]:
    def build() -> dict[str, torch.Tensor]:
        cpu = _TABLES.get((qtype, "cpu"), lambda: _build_4bit(qtype))
        return {k: (v.to(device) if v is not None else None) for k, v in cpu.items()}  # type: ignore[union-attr]

    return _TABLES.get((qtype, str(device)), build)  # type: ignore[return-value]


def _build_dynamic() -> dict[str, torch.Tensor]:
    code = dynamic_map()
    midpoints = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(65536, dtype=torch.float32)
    value = (i + i) / 65535.0 - 1.0  # bitsandbytes' build_quantize_lut, fp32 step by step
    lut = torch.bucketize(value, midpoints).to(torch.uint8)  # midpoints strictly below the value
    return {"code": code, "lut": lut}


def _tables_dynamic(device: torch.device) -> dict[str, torch.Tensor]:
    def build() -> dict[str, torch.Tensor]:
        cpu = _TABLES.get(("dynamic", "cpu"), _build_dynamic)
        return {k: v.to(device) for k, v in cpu.items()}  # type: ignore[union-attr]

    return _TABLES.get(("dynamic", str(device)), build)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# the stored form


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

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: codes, absmax, and for double the 256-absmax scales, the
        offset and the 256-entry fp32 dynamic map (a constant, counted as bitsandbytes stores it)."""
        total = self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()
        if self.double:
            assert self.absmax_scale is not None and self.absmax_offset is not None
            total += self.absmax_scale.numel() * self.absmax_scale.element_size()
            total += self.absmax_offset.numel() * self.absmax_offset.element_size()
            total += 256 * 4
        return total

    @property
    def bits_per_parameter(self) -> float:
        return self.nbytes * 8 / self.numel if self.numel else 0.0

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (dequantized from the 8-bit codes when double)."""
        if not self.double:
            return self.absmax
        assert self.absmax_scale is not None and self.absmax_offset is not None
        return _dequantize_dynamic(self.absmax, self.absmax_scale, self.absmax_offset)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor of `shape` in `dtype` (fp32, bf16 or fp16), computed in fp32 and rounded once.

        With `out` (contiguous, `shape`, `dtype`, on the codes' device) the result is written there
        and `out` is returned; nothing of the size of the output is allocated."""
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dequantize to float32, bfloat16 or float16, not {dtype}")
        if torch.compiler.is_compiling():  # dynamo cannot trace the thread pool, scratch and thread counts
            plain = dequantize_plain(self, dtype)
            return plain if out is None else out.copy_(plain)
        if out is None:
            out = empty(self.shape, dtype, self.device)
        else:
            if out.dtype != dtype or tuple(out.shape) != tuple(self.shape) or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(self.shape)}, "
                                 f"got {out.dtype} {tuple(out.shape)}")
            if out.device != self.device:
                raise ValueError(f"out is on {out.device}, the codes on {self.device}")
        n = self.numel
        if n == 0:
            return out
        with single_threaded(self.device):  # a small job: waking an idle OpenMP team costs more
            absmax = self.block_absmax()
        flat = out.view(-1)
        if self.qtype == "int8":
            _dequantize_int8(self.codes, absmax, self.blocksize, n, flat)
        else:
            kernel = len(self.shape) > 0 and self.shape[-1] % 2 == 0  # which bitsandbytes path
            _dequantize_4bit(self.codes, absmax, self.blocksize, n, flat, self.qtype, kernel)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name, for safetensors: codes and absmax, plus absmax_scale,
        absmax_offset and absmax_code (the dynamic map) when double. See `from_tensors`."""
        out = {"codes": self.codes, "absmax": self.absmax}
        if self.double:
            assert self.absmax_scale is not None and self.absmax_offset is not None
            out["absmax_scale"] = self.absmax_scale
            out["absmax_offset"] = self.absmax_offset
            out["absmax_code"] = _tables_dynamic(self.device)["code"]
        return out

    def metadata(self) -> dict[str, str]:
        """What `from_tensors` needs besides the tensors, as strings (a safetensors header's metadata)."""
        return {"qtype": self.qtype, "shape": ",".join(map(str, self.shape)),
                "dtype": str(self.dtype).removeprefix("torch."), "blocksize": str(self.blocksize),
                "double": str(int(self.double))}

    @classmethod
    def from_tensors(cls, qtype: str, shape: tuple[int, ...] | list[int] | torch.Size, dtype: torch.dtype | str,
                     blocksize: int, double: bool, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Rebuild from `tensors()` output (names as there; absmax_code is optional and checked)."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."))
        _check_args(qtype, blocksize)
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        blocks = -(-n // blocksize)
        codes, absmax = tensors["codes"], tensors["absmax"]
        want = n if qtype == "int8" else (n + 1) // 2
        if codes.dtype != torch.uint8 or codes.numel() != want:
            raise ValueError(f"codes: expected {want} uint8, got {codes.numel()} {codes.dtype}")
        if absmax.numel() != blocks or absmax.dtype != (torch.uint8 if double else torch.float32):
            raise ValueError(f"absmax: expected {blocks} {'uint8' if double else 'float32'}, "
                             f"got {absmax.numel()} {absmax.dtype}")
        scale = offset = None
        if double:
            scale, offset = tensors["absmax_scale"], tensors["absmax_offset"]
            if scale.dtype != torch.float32 or scale.numel() != -(-blocks // _DOUBLE_BLOCK):
                raise ValueError(f"absmax_scale: expected {-(-blocks // _DOUBLE_BLOCK)} float32, "
                                 f"got {scale.numel()} {scale.dtype}")
            if offset.dtype != torch.float32 or offset.numel() != 1:
                raise ValueError("absmax_offset: expected one float32")
            offset = offset.reshape(())
            code = tensors.get("absmax_code")
            if code is not None and not torch.equal(code.cpu(), _tables_dynamic(torch.device("cpu"))["code"]):
                raise ValueError("absmax_code is not bitsandbytes' 8-bit dynamic map")
        return cls(qtype=qtype, shape=shape, dtype=dtype, blocksize=blocksize, codes=codes.reshape(-1),
                   absmax=absmax.reshape(-1), double=double, absmax_scale=scale, absmax_offset=offset)

    @classmethod
    def from_safetensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> QuantizedTensor:
        """`from_tensors` with the arguments taken from `metadata()` strings."""
        shape = tuple(int(s) for s in metadata["shape"].split(",") if s)
        return cls.from_tensors(metadata["qtype"], shape, metadata["dtype"], int(metadata["blocksize"]),
                                metadata["double"] not in ("0", "false", "False"), tensors)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy with every stored tensor on `device` (the same object's tensors when already there)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, codes=move(self.codes), absmax=move(self.absmax),
                       absmax_scale=move(self.absmax_scale), absmax_offset=move(self.absmax_offset))


# ----------------------------------------------------------------------------------------------
# quantize


def _check_args(qtype: str, blocksize: int) -> None:
    if qtype not in QTYPES:
        raise ValueError(f"unknown quantization type {qtype!r}: expected one of {', '.join(QTYPES)}")
    if (not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 16 or blocksize > 4096
            or blocksize & (blocksize - 1)):
        raise ValueError(f"blocksize must be a power of two from 16 to 4096, got {blocksize!r}")


@torch.no_grad()
def quantize(tensor: torch.Tensor, qtype: str, blocksize: int = 64, double: bool = False) -> QuantizedTensor:
    """Quantize `tensor` (fp32, fp16 or bf16, any shape) blockwise; see the module docstring.

    For "nf4"/"fp4" the codes, absmax and (double) absmax codes, scales and offset are bit-identical
    to bitsandbytes' `quantize_4bit(tensor, blocksize=blocksize, quant_type=qtype,
    compress_statistics=double)` on CPU."""
    _check_args(qtype, blocksize)
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize takes a float32, float16 or bfloat16 tensor, got "
                         f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
    shape = tuple(tensor.shape)
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():  # pragma: no cover - reshape(-1) is contiguous
        flat = flat.contiguous()
    n = flat.numel()
    blocks = -(-n // blocksize)
    device = flat.device
    absmax = torch.empty(blocks, dtype=torch.float32, device=device)
    if qtype == "int8":
        codes = torch.empty(n, dtype=torch.uint8, device=device)
        _quantize_int8(flat, blocksize, codes, absmax)
    else:
        codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
        _quantize_4bit(flat, blocksize, qtype, codes, absmax)
    if not double:
        return QuantizedTensor(qtype, shape, tensor.dtype, blocksize, codes, absmax)
    qabsmax, scale, offset = _quantize_dynamic(absmax)
    return QuantizedTensor(qtype, shape, tensor.dtype, blocksize, codes, qabsmax, True, scale, offset)


def _blocks_fp32(flat: torch.Tensor, start: int, stop: int, blocksize: int, device: torch.device) -> torch.Tensor:
    """flat[start:stop] as (blocks, blocksize) fp32: a view when it is fp32, else a per-thread copy."""
    src = flat[start:stop]
    if src.dtype == torch.float32:
        return src.view(-1, blocksize)
    return scratch("x", stop - start, torch.float32, device).copy_(src).view(-1, blocksize)


def _block_absmax(xv: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> None:
    """out = max|x| per row of xv (nb, bs), exactly abs().amax(1) (NaN propagates) without a temporary."""
    nan_free = scratch("nan_free", out.numel(), torch.bool, out.device)
    torch.amax(xv, 1, out=out)
    torch.amin(xv, 1, out=tmp)
    tmp.neg_()
    torch.maximum(out, tmp, out=out)
    out.abs_()  # +0 for a block of signed zeros
    torch.eq(out, out, out=nan_free)
    if not bool(nan_free.all()):  # a NaN block: bnb's abs().max() gives the input's (canonical) NaN
        torch.where(nan_free, out, torch.tensor(float("nan"), device=out.device), out=out)


def _quantize_4bit(flat: torch.Tensor, blocksize: int, qtype: str, codes: torch.Tensor,
                   absmax: torch.Tensor) -> None:
    n = flat.numel()
    device = flat.device
    tables = _tables_4bit(qtype, device)
    pos_table, threshold_table = tables["quant_pos"], tables["quant_threshold"]
    remap = tables["remap"]
    full = n - n % blocksize  # a multiple of blocksize, so even
    chunk = max(_QUANT_CHUNK // blocksize, 1) * blocksize if device.type == "cpu" else max(full, blocksize)

    def work(start: int, stop: int) -> None:
        length, nb = stop - start, (stop - start) // blocksize
        xv = _blocks_fp32(flat, start, stop, blocksize, device)
        am = absmax[start // blocksize: stop // blocksize]
        tmp = scratch("tmp", nb, torch.float32, device)
        _block_absmax(xv, am, tmp)
        torch.clamp(am, min=_MIN_ABSMAX, out=tmp).reciprocal_()  # bnb: x * (1.0 / absmax.clamp(1e-38))
        scaled = scratch("s", length, torch.float32, device)
        torch.mul(xv, tmp[:, None], out=scaled.view(nb, blocksize))
        key = scratch("key", length, torch.int32, device)
        key.copy_(scaled.view(torch.uint16)[1::2])  # top 16 bits (little endian)
        threshold = scratch("thr", length, torch.float32, device)
        torch.index_select(threshold_table, 0, key, out=threshold)
        pos = scratch("pos", length, torch.uint8, device)
        torch.index_select(pos_table, 0, key, out=pos)
        above = scratch("above", length, torch.bool, device)
        torch.gt(scaled, threshold, out=above)
        pos.add_(above.view(torch.uint8))
        # pack: as int16 (little endian) a pair is pos[2i] + 256 * pos[2i+1]; 16 * v + (v >> 8) has the
        # byte (pos[2i] << 4) | pos[2i+1] at the bottom (int16 arithmetic wraps, the narrowing keeps it)
        pair = pos.view(torch.int16)
        low = scratch("pack", length // 2, torch.int16, device)
        torch.bitwise_right_shift(pair, 8, out=low)
        low.add_(pair, alpha=16)
        packed = codes[start // 2: stop // 2]
        packed.copy_(low)
        if remap is not None:
            idx = scratch("idx", length // 2, torch.int32, device).copy_(packed)
            torch.index_select(remap, 0, idx, out=packed)

    run_chunks(work, full, chunk, device)

    if full < n:  # the last, partial block: as bitsandbytes, clamped absmax and a true division
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=_MIN_ABSMAX)
        absmax[-1] = am
        scaled = torch.clamp(tail / am, -1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        pos = torch.bucketize(scaled, tables["bounds"])
        q = tables["order"][pos] if qtype != "nf4" else pos
        q = q.to(torch.uint8)
        codes[full // 2:] = (q[0::2] << 4) | q[1::2]


def _quantize_int8(flat: torch.Tensor, blocksize: int, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    n = flat.numel()
    device = flat.device
    signed = codes.view(torch.int8)
    full = n - n % blocksize
    chunk = max(_INT8_CHUNK // blocksize, 1) * blocksize if device.type == "cpu" else max(full, blocksize)

    def encode(xv: torch.Tensor, am: torch.Tensor, tmp: torch.Tensor, out: torch.Tensor, scaled: torch.Tensor) -> None:
        _block_absmax(xv, am, tmp)
        torch.clamp(am, min=_MIN_ABSMAX, out=tmp)
        torch.div(torch.full_like(tmp, 127.0), tmp, out=tmp)
        torch.mul(xv, tmp[:, None], out=scaled)
        scaled.round_()
        out.copy_(scaled.view(-1))

    def work(start: int, stop: int) -> None:
        length, nb = stop - start, (stop - start) // blocksize
        xv = _blocks_fp32(flat, start, stop, blocksize, device)
        scaled = scratch("s", length, torch.float32, device).view(nb, blocksize)
        encode(xv, absmax[start // blocksize: stop // blocksize], scratch("tmp", nb, torch.float32, device),
               signed[start:stop], scaled)

    run_chunks(work, full, chunk, device)
    if full < n:
        tail = flat[full:].float().view(1, -1)
        encode(tail, absmax[-1:], torch.empty(1, device=device), signed[full:], torch.empty_like(tail))


def _quantize_dynamic(absmax: torch.Tensor, offset: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' double quant of fp32 absmaxes: (uint8 codes, fp32 scale per 256, fp32 offset).

    `offset` defaults to absmax.mean(), as bitsandbytes computes it (same torch op, same bits)."""
    device = absmax.device
    if offset is None:
        offset = absmax.mean() if absmax.numel() else torch.zeros((), device=device)
    y = absmax - offset
    n = y.numel()
    nb = -(-n // _DOUBLE_BLOCK)
    padded = torch.nn.functional.pad(y, (0, nb * _DOUBLE_BLOCK - n)).view(nb, _DOUBLE_BLOCK)
    magnitude = padded.abs()
    magnitude = torch.where(torch.isnan(magnitude), torch.zeros((), device=device), magnitude)
    scale = magnitude.amax(1).clamp(min=0.0)
    v = (padded * scale.reciprocal()[:, None]).clamp(-1.0, 1.0)
    t = (v + 1.0) * 0.5
    index = (t.double() * 65535.0 + 0.5).float()  # exact in fp64, one rounding to fp32 == C's fmaf
    index = torch.where(torch.isnan(index), torch.zeros((), device=device), index).to(torch.int64)
    q = _tables_dynamic(device)["lut"][index & 0xFFFF]
    q = torch.where((scale == 0)[:, None], torch.zeros((), dtype=torch.uint8, device=device), q)
    return q.reshape(-1)[:n].contiguous(), scale, offset.reshape(()).to(torch.float32)


def _dequantize_dynamic(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """fp32 absmax = map[code] * scale (per 256), then + offset: bitsandbytes' two roundings."""
    n = codes.numel()
    nb = scale.numel()
    values = _tables_dynamic(codes.device)["code"].index_select(0, codes.reshape(-1).to(torch.int32))
    padded = torch.nn.functional.pad(values, (0, nb * _DOUBLE_BLOCK - n)).view(nb, _DOUBLE_BLOCK)
    padded.mul_(scale[:, None])
    return padded.view(-1)[:n].add_(offset)


# ----------------------------------------------------------------------------------------------
# dequantize


def build_tables(qtype: str, device: torch.device, double: bool) -> None:
    """Build the lookup tables dequantize reads for `qtype` on `device` now. A quantized layer calls
    this when it is made or moved, so a compiled forward only reads them: building them there
    (under a lock) would break the graph."""
    if qtype != "int8":
        _tables_4bit(qtype, device)
    if double:
        _tables_dynamic(device)


def dequantize_plain(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` in plain torch ops, for torch.compile (which fuses them into one kernel): the
    same fp32 products code * absmax (int8: code * (absmax / 127)), rounded once to `dtype`, so the
    same values as the threaded kernels."""
    n, blocks = qt.numel, qt.nblocks
    absmax = qt.block_absmax().float()
    if qt.qtype == "int8":
        values = qt.codes.view(torch.int8).float()
        scale = torch.div(absmax, torch.full_like(absmax, 127.0))  # a true division, as the kernel
    else:
        kernel = len(qt.shape) > 0 and qt.shape[-1] % 2 == 0  # which bitsandbytes path (see _build_4bit)
        table = _tables_4bit(qt.qtype, qt.device)["code_kernel" if kernel else "code"]
        nibbles = torch.stack([qt.codes >> 4, qt.codes & 15], dim=1).view(-1)  # element 2i: the high nibble
        values = table[nibbles.to(torch.int64)][:n]
        scale = absmax
    padded = torch.nn.functional.pad(values, (0, blocks * qt.blocksize - n)).view(blocks, qt.blocksize)
    return (padded * scale[:, None]).view(-1)[:n].to(dtype).view(qt.shape)


def _dequantize_4bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int, out: torch.Tensor,
                     qtype: str, kernel: bool = False) -> None:
    device = codes.device
    tables = _tables_4bit(qtype, device)
    pair_table = tables["dequant_kernel" if kernel else "dequant"]
    absmax = absmax.float()
    full = n - n % blocksize
    half = blocksize // 2  # bytes per block
    chunk = max(_DEQUANT_CHUNK // half, 1) * half if device.type == "cpu" else max(full // 2, half)
    direct = out.dtype == torch.float32
    fused = device.type == "cuda" and full > 0 and dequantize_4bit_fused(
        codes, absmax.contiguous(), tables["code_kernel" if kernel else "code"], blocksize, full // 2, out)

    def work(start: int, stop: int) -> None:  # in bytes
        nbytes, nb = stop - start, (stop - start) // half
        idx = scratch("didx", nbytes, torch.int32, device).copy_(codes[start:stop])
        pairs = scratch("dpairs", nbytes, torch.int64, device)
        torch.index_select(pair_table, 0, idx, out=pairs)
        values = pairs.view(torch.float32).view(nb, blocksize)
        scale = absmax[start // half: stop // half, None]
        target = out[2 * start: 2 * stop].view(nb, blocksize)
        if direct:
            torch.mul(values, scale, out=target)
        else:
            values.mul_(scale)
            target.copy_(values)

    if not fused:
        run_chunks(work, full // 2, chunk, device)
    if full < n:
        rest = codes[full // 2:].to(torch.int64)
        values = pair_table.index_select(0, rest).view(torch.float32)[: n - full]
        out[full:] = values * absmax[-1]


def _dequantize_int8(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int, out: torch.Tensor) -> None:
    device = codes.device
    signed = codes.view(torch.int8)
    factor = absmax.float()
    factor = torch.div(factor, torch.full_like(factor, 127.0))  # a true division, not * (1 / 127)
    full = n - n % blocksize
    chunk = max(_INT8_CHUNK // blocksize, 1) * blocksize if device.type == "cpu" else max(full, blocksize)
    direct = out.dtype == torch.float32

    def work(start: int, stop: int) -> None:
        length, nb = stop - start, (stop - start) // blocksize
        values = scratch("dvals", length, torch.float32, device).copy_(signed[start:stop]).view(nb, blocksize)
        scale = factor[start // blocksize: stop // blocksize, None]
        target = out[start:stop].view(nb, blocksize)
        if direct:
            torch.mul(values, scale, out=target)
        else:
            values.mul_(scale)
            target.copy_(values)

    run_chunks(work, full, chunk, device)
    if full < n:
        out[full:] = signed[full:].float() * factor[-1]
