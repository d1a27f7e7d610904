"""Quantize frozen linear layers (QLoRA's base, Dettmers et al. 2023): NF4, FP4 or int8, blockwise.

    quantize base nf4 double                  # every linear layer but the output head
    quantize *.mlp.* int8 blocksize=128       # a pattern instead of `base`
    inject lora r=8 into *.attn.<q,v>         # LoRA stacks on a quantized layer, in the compute dtype

The layer becomes a `QuantizedLinear` that dequantizes block-wise to the compute dtype on every
forward and backward (the dequantized weight is never kept, as in bitsandbytes), so gradients
reach its input and every layer below. The replaced original weight is handed to the run's
originals store first (the checkpoint it came from, or a spill file) and dropped from memory;
revert reads it back, checks its sha256 and puts it into the very same Parameter object.

A cast of the model after apply (`model.to(torch.bfloat16)`, `.half()`) moves the codes and scales
but never rounds them, and the layer keeps its compute dtype, as bitsandbytes' Linear4bit does.
Under autocast the matmul runs in autocast's dtype, forward and backward. Under torch.compile the
dequantize is plain torch ops (`surgeon.quant.dequantize_plain`), so dynamo captures it whole.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from surgeon.errors import PlanError, RevertError
from surgeon.manifest import TensorRecord, sha256_tensor
from surgeon.methods.base import (ApplyContext, Method, MethodParams, Patch, Target, WordArgs, WordError,
                                  locate, register)
from surgeon.originals import Originals
from surgeon.quant import QTYPES, QuantizedTensor, build_tables, dequantize_plain, quantize
from surgeon.spec import Word

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_KEYWORDS = (*QTYPES, "double", "base")


class QuantizeParams(MethodParams):
    type: Literal["nf4", "fp4", "int8"] = Field("nf4", description="code type")
    double: bool = Field(False, description="quantize the absmax constants again (8-bit, blocks of 256)")
    blocksize: int = Field(64, description="elements per absmax block: a power of two, 16 to 4096")
    compute: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="dtype of the matmul and of LoRA")

    @field_validator("blocksize")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 16 or value > 4096 or value & (value - 1):
            raise ValueError("blocksize must be a power of two from 16 to 4096")
        return value


class _ScratchWeights(threading.local):
    """One dequantize buffer per (shape, dtype) and thread, reused by every quantized layer.

    On the CPU a fresh buffer of tens of MB comes from a fresh mmap each time, and faulting its
    pages in costs more than the dequantize itself; the matmul never keeps the weight, so the next
    layer of the same shape can write over it. (CUDA's caching allocator already reuses memory.)"""

    def __init__(self) -> None:
        self.buffers: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get((shape, dtype))
        if buffer is None:
            buffer = self.buffers[(shape, dtype)] = torch.empty(shape, dtype=dtype)
        return buffer


_SCRATCH = _ScratchWeights()


def _matmul_weight(layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    if layer.device.type != "cpu" or torch.compiler.is_compiling():  # compiled: plain ops, fused; no scratch
        return layer.dequantized(dtype)
    return layer.quantized().dequantize(dtype, out=_SCRATCH.get(tuple(layer.shape), dtype))


def _matmul_dtype(layer: QuantizedLinear, x: torch.Tensor) -> torch.dtype:
    """The layer's compute dtype, or autocast's where autocast is on for x's device: autocast would
    recast the matmul anyway (as it does bitsandbytes' matmul_4bit), so dequantize straight to it."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return layer.compute_dtype


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W^T with W dequantized in forward and again in backward, never stored for backward.
    Both matmuls run in `dtype`: backward may run outside the forward's autocast, where a grad in
    autocast's dtype would meet a weight in the compute dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear,  # type: ignore[override]
                dtype: torch.dtype) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, dtype
        return F.linear(x, _matmul_weight(layer, dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return grad.to(ctx.dtype) @ _matmul_weight(ctx.layer, ctx.dtype), None, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer stored quantized; computes in `compute_dtype`, returns the input's dtype."""

    _KEPT_DTYPES = ("absmax", "absmax_scale", "absmax_offset")  # fp32 by the format, whatever the model's

    def __init__(self, qt: QuantizedTensor, bias: nn.Parameter | None, compute_dtype: torch.dtype,
                 original_kind: str) -> None:
        super().__init__()
        self.qtype, self.blocksize, self.double = qt.qtype, qt.blocksize, qt.double
        self.shape, self.original_dtype = qt.shape, qt.dtype
        self.out_features, self.in_features = qt.shape
        self.compute_dtype = compute_dtype
        self.original_kind = original_kind  # "conv1d": the original stored its weight transposed
        for name in ("codes", "absmax", "absmax_scale", "absmax_offset"):
            self.register_buffer(name, getattr(qt, name), persistent=False)
        self.bias = bias
        build_tables(self.qtype, self.device, self.double)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedLinear:
        """Move the quantized state with the module but never cast it: `model.to(torch.bfloat16)`
        casts every floating buffer, and rounding the fp32 absmax constants would change the
        weights. As with bitsandbytes' Linear4bit, only the bias follows a cast; the compute dtype
        stays (LoRA above computes in its own weights' dtype)."""
        held = {name: t for name in self._KEPT_DTYPES if (t := self._buffers.get(name)) is not None}
        for name, tensor in held.items():  # as int32 bits: moved (or emptied) like any buffer, never cast
            self._buffers[name] = tensor.view(torch.int32)
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in held.items():
                bits = self._buffers[name]
                # `Module.type()` converts integer tensors too: then move the kept tensor itself
                kept = bits.view(tensor.dtype) if bits.dtype == torch.int32 else tensor.to(self.codes.device)
                self._buffers[name] = kept
        build_tables(self.qtype, self.device, self.double)
        return self

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor that tells code which reads `layer.weight.dtype` the compute dtype."""
        return torch.empty(0, dtype=self.compute_dtype, device=self.device)

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(qtype=self.qtype, shape=self.shape, dtype=self.original_dtype,
                               blocksize=self.blocksize, codes=self.codes, absmax=self.absmax,
                               double=self.double, absmax_scale=self.absmax_scale,
                               absmax_offset=self.absmax_offset)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # dynamo cannot call through dequantize's no_grad wrapper
            return dequantize_plain(self.quantized(), dtype or self.compute_dtype)
        return self.quantized().dequantize(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _matmul_dtype(self, x)
        out = _DequantizedMatmul.apply(x.to(dtype), self, dtype)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)

    def merged_with(self, deltas: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A plain module of the original kind holding the dequantized weight (+ a delta, added in
        the compute dtype), stored in the original weight's dtype so the merged model runs and
        loads in one dtype. Deltas come in the original module's layout."""
        weight = self.dequantized()
        delta = (deltas or {}).get("weight")
        if self.original_kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            plain: nn.Module = Conv1D(self.out_features, self.in_features)
            weight = weight.T.contiguous()
        else:
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        if delta is not None:
            weight = weight + delta.to(weight.dtype)
        plain.weight = nn.Parameter(weight.to(self.original_dtype), requires_grad=False)
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return plain.to(self.device).train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}"
                f"{' double' if self.double else ''}, blocksize={self.blocksize}, compute={self.compute_dtype}")


class QuantizePatch(Patch):
    mergeable = True
    adapts = False

    def __init__(self, parent: nn.Module, attr: str, original: nn.Module, layer: QuantizedLinear,
                 weight_name: str, originals: Originals) -> None:
        self.parent, self.attr, self.original, self.layer = parent, attr, original, layer
        self.weight_name, self.originals = weight_name, originals
        self.weight = original.weight  # the Parameter object revert fills again
        self.restored: torch.Tensor | None = None
        self.merged_into: nn.Module | None = None

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def check_revertible(self, fingerprint: dict[str, TensorRecord]) -> None:
        tensor = self.originals.read(self.weight_name)
        record = fingerprint.get(self.weight_name)
        if record is not None:
            if (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)) != (record.dtype, record.shape):
                raise RevertError(f"the original of {self.weight_name} in {self.originals.location} is "
                                  f"{tensor.dtype} {tuple(tensor.shape)}, expected {record.dtype} {record.shape}")
            if record.sha256 is not None and sha256_tensor(tensor) != record.sha256:
                raise RevertError(f"the original of {self.weight_name} in {self.originals.location} has "
                                  "changed since apply (sha256 mismatch)")
        self.restored = tensor

    def revert(self) -> None:
        tensor = self.restored if self.restored is not None else self.originals.read(self.weight_name)
        device = self.layer.device
        torch.utils.swap_tensors(self.weight, nn.Parameter(tensor.to(device), requires_grad=self.weight.requires_grad))
        self.restored = None
        setattr(self.parent, self.attr, self.original)

    def merge(self) -> None:
        """Dequantize in place of the quantized layer, unless a LoRA merge already did (with its delta)."""
        if getattr(self.parent, self.attr) is self.layer:
            self.merged_into = self.layer.merged_with()
            setattr(self.parent, self.attr, self.merged_into)

    def requantize(self) -> None:
        """Quantize the merged weights (base + deltas) again, with this layer's type, block size,
        double quantization and compute dtype."""
        merged = getattr(self.parent, self.attr)
        if merged is self.merged_into:  # no delta reached this layer: its codes stand as they were
            setattr(self.parent, self.attr, self.layer)
            return
        weight = merged.weight.detach()
        as_linear = weight.T if self.layer.original_kind == "conv1d" else weight
        qt = quantize(as_linear.contiguous(), self.layer.qtype, blocksize=self.layer.blocksize, double=self.layer.double)
        requantized = QuantizedLinear(qt, merged.bias, self.layer.compute_dtype, self.layer.original_kind)
        setattr(self.parent, self.attr, requantized.train(merged.training))


def quantized_bytes(numel: int, params: QuantizeParams) -> int:
    """Bytes stored for a quantized tensor (codes, scales, double-quant state), from sizes alone."""
    blocks = math.ceil(numel / params.blocksize)
    codes = numel if params.type == "int8" else math.ceil(numel / 2)
    if not params.double:
        return codes + 4 * blocks
    return codes + blocks + 4 * math.ceil(blocks / 256) + 4 + 4 * 256


@register
class Quantize(Method):
    verb = "quantize"
    name = "quantize"
    Params = QuantizeParams
    kinds = frozenset({"linear", "conv1d"})
    streams = True
    mergeable = True
    summary = "store frozen linear weights in 4 or 8 bits, blockwise (QLoRA's NF4 base)"

    @classmethod
    def read_words(cls, words: tuple[Word, ...]) -> WordArgs:
        args = WordArgs()
        for word in words:
            text = word.text
            if text in QTYPES:
                if "type" in args.params:
                    raise WordError(f"two types: '{args.params['type']}' and '{text}'", word)
                args.params["type"] = text
            elif text == "double":
                args.params["double"] = True
            elif text == "base":  # every linear layer but the output head (embeddings are not linear)
                args.patterns.append(("**", word))
                args.excepts.append("head")
                args.lenient = True
            elif _close_to_keyword(text):
                raise WordError(f"unknown word '{text}' for quantize", word,
                                f"did you mean '{_close_to_keyword(text)}'? (types: {', '.join(QTYPES)})")
            else:
                args.patterns.append((text, word))
        return args

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        reason = super().check(target, params)
        if reason:
            return reason
        assert isinstance(params, QuantizeParams) and target.weight_shape is not None
        if target.merged:
            return (f"{target.path} holds a merged LoRA delta; quantizing it would make the merge "
                    "permanent: revert that job first")
        numel = math.prod(target.weight_shape)
        if numel % params.blocksize:
            return f"blocksize={params.blocksize} does not divide {target.path}'s {numel} weights"
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        return {}

    @classmethod
    def memory(cls, target: Target, params: MethodParams) -> tuple[int, int]:
        assert isinstance(params, QuantizeParams) and target.weight_shape is not None
        numel = math.prod(target.weight_shape)
        size = torch.empty((), dtype=getattr(torch, target.dtype or "float32"), device="meta").element_size()
        return numel * size, quantized_bytes(numel, params)

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, QuantizeParams)
        if ctx.originals is None:
            raise PlanError("quantize needs a place to keep the original weights (none was given)")
        parent, attr, original = locate(model, target.path)
        weight = original.weight
        if weight.device.type == "meta":
            raise PlanError(f"{target.path} has no weights yet (meta device): quantize needs real weights")
        name = f"{target.path}.weight"
        ctx.originals.keep(name, weight)
        as_linear = weight.detach().T if target.kind == "conv1d" else weight.detach()
        qt = quantize(as_linear.contiguous(), params.type, blocksize=params.blocksize, double=params.double)
        layer = QuantizedLinear(qt, original.bias, COMPUTE_DTYPES[params.compute], target.kind)
        layer.train(original.training)
        patch = QuantizePatch(parent, attr, original, layer, name, ctx.originals)
        # drop the full-precision tensor but keep its Parameter object for revert to fill again
        torch.utils.swap_tensors(weight, nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device),
                                                      requires_grad=weight.requires_grad))
        setattr(parent, attr, layer)
        return patch


def _close_to_keyword(text: str) -> str | None:
    import difflib

    close = difflib.get_close_matches(text, _KEYWORDS, n=1, cutoff=0.6)
    return close[0] if close else None
