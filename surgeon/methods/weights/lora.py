"""LoRA (Hu et al. 2021): h = W0 x + (alpha/r) B A dropout(x), A: r x d_in, B: d_out x r.

A is random (Gaussian, std 1/r, as PEFT's "gaussian"; or PEFT's default Kaiming-uniform), B is zero,
so the patched model's output equals the original's right after apply. On an embedding, as in PEFT,
A is zero and B Gaussian. Layouts match PEFT's (`lora_A` r x d_in, `lora_B` d_out x r) so weights
move between the two unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgeon.errors import ExportError
from surgeon.graph import unwrap
from surgeon.methods._rng import draw
from surgeon.methods.rows import add_on_rows, routed_rows
from surgeon.methods.base import (ApplyContext, Method, MethodParams, Patch, Target, WrapPatch, WrapsLayer, gate_of,
                                  locate, register)


class LoraParams(MethodParams):
    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float | None = Field(None, gt=0, description="scale numerator; default: r (scale 1)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    init: Literal["gaussian", "kaiming"] = Field("gaussian", description="initialisation of A")
    rslora: bool = Field(False, description="scale alpha/sqrt(r) instead of alpha/r")
    bias: Literal["none", "lora_only"] = Field("none", description="also train the target's bias")

    @property
    def scale(self) -> float:
        alpha = self.alpha if self.alpha is not None else float(self.r)
        return alpha / math.sqrt(self.r) if self.rslora else alpha / self.r


def init_lora_a(weight: torch.Tensor, params: LoraParams, generator: torch.Generator | None = None) -> None:
    if params.init == "kaiming":
        draw(weight, nn.init.kaiming_uniform_, generator, a=math.sqrt(5))
    else:
        draw(weight, nn.init.normal_, generator, std=1.0 / params.r)


def compute_dtype_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """LoRA weights live in the base's compute dtype (a quantized base says which) and device;
    under named adapters stacked on one layer, the layer's under them all."""
    base = unwrap(base)
    if hasattr(base, "compute_dtype"):
        return base.compute_dtype, base.device
    return base.weight.dtype, base.weight.device


def own_dtype(wrapper: nn.Module) -> torch.dtype:
    """The dtype an adapter computes in: that of its own first weight (lora_A), read on every
    forward, as PEFT casts the input to lora_A's dtype. The weights are made in the base's compute
    dtype; reading it back (not caching it at apply) keeps a model cast afterwards
    (`model.to(torch.bfloat16)`, `.half()`) computing in its new dtype."""
    for param in wrapper._parameters.values():
        return param.dtype
    raise TypeError(f"{type(wrapper).__name__} holds no weights of its own")


class _LoraBase(WrapsLayer, nn.Module):
    weighable = True  # its output is linear in `scale`: job.activate({name: weight}) scales it
    def __init__(self, base: nn.Module, params: LoraParams, label: str | None = None) -> None:
        super().__init__()
        self.base = base
        self.label = label  # the named adapter it belongs to: which rows of a mixed batch it serves
        self.scale = params.scale
        self.dropout = nn.Dropout(params.dropout) if params.dropout > 0 else nn.Identity()
        self.train(base.training)  # a wrapper made while the model is in eval mode stays in eval mode

    @property
    def dtype(self) -> torch.dtype:
        return own_dtype(self)

    def _new(self, *shape: int) -> nn.Parameter:
        dtype, device = compute_dtype_device(self.base)
        return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))


class LoraLinear(_LoraBase):
    """LoRA on nn.Linear or transformers' Conv1D (weight stored transposed), whole or on slices.

    With slices (GPT-2's fused c_attn), each named slice of the output columns gets its own A and
    B, and every other column (k, say) is exactly the base layer's output.
    """

    def __init__(self, base: nn.Module, target: Target, params: LoraParams, init: bool,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base, params, target.label)
        self.transposed = target.kind == "conv1d"
        self.slices = dict(target.slices)
        d_in, d_out = target.in_features, target.out_features
        assert d_in is not None and d_out is not None
        self.in_features, self.out_features = d_in, d_out
        if not self.slices:
            self.lora_A = self._new(params.r, d_in)
            self.lora_B = self._new(d_out, params.r)
        for name, (start, stop) in self.slices.items():
            self.register_parameter(f"lora_A_{name}", self._new(params.r, d_in))
            self.register_parameter(f"lora_B_{name}", self._new(stop - start, params.r))
        if init:
            for a_name in [n for n, _ in self.named_parameters() if n.startswith("lora_A")]:
                init_lora_a(self.get_parameter(a_name).data, params, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = routed_rows(self.label, x)
        if rows is not None:  # a mixed batch: only the rows that name this adapter
            x = x[rows]
        h = self.dropout(x).to(self.dtype)  # LoRA's own dtype, as PEFT (a quantized base may compute in another)
        gate = gate_of(self)
        if gate is not None:  # UniPELT: the gate replaces alpha/r, one column per slice
            return self._gated(out, rows, h, gate(x.to(self.dtype)))
        if not self.slices:
            # one fused multiply-add instead of a scale and an add (PEFT does two)
            return add_on_rows(out, rows, F.linear(F.linear(h, self.lora_A), self.lora_B).to(out.dtype), self.scale)
        for name, span in self.slices.items():
            a, b = getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}")
            add_on_rows(out, rows, F.linear(F.linear(h, a), b).to(out.dtype), self.scale, span)
        return out

    def _gated(self, out: torch.Tensor, rows: torch.Tensor | None, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """out + B A h * g, g (batch, slices) one gate value per row and slice."""
        per_row = (-1, *([1] * (h.dim() - 1)))
        if not self.slices:
            delta = F.linear(F.linear(h, self.lora_A), self.lora_B) * g[:, 0].view(per_row)
            return add_on_rows(out, rows, delta.to(out.dtype))
        for column, (name, span) in enumerate(self.slices.items()):
            a, b = getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}")
            add_on_rows(out, rows, (F.linear(F.linear(h, a), b) * g[:, column].view(per_row)).to(out.dtype), 1.0, span)
        return out

    def delta_weights(self) -> dict[str, torch.Tensor]:
        dtype, device = compute_dtype_device(self.base)
        delta = torch.zeros((self.out_features, self.in_features), dtype=dtype, device=device)
        if not self.slices:
            delta += (self.lora_B @ self.lora_A) * self.scale
        for name, (start, stop) in self.slices.items():
            a, b = getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}")
            delta[start:stop] += (b @ a) * self.scale
        return {"weight": delta.T if self.transposed else delta}  # in the layout of the original module


class LoraEmbedding(_LoraBase):
    def __init__(self, base: nn.Embedding, target: Target, params: LoraParams, init: bool,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base, params, target.label)
        table = unwrap(base)
        self.lora_A = self._new(params.r, table.num_embeddings)
        self.lora_B = self._new(table.embedding_dim, params.r)
        if init:
            draw(self.lora_B.data, nn.init.normal_, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base: nn.Embedding = unwrap(self.base)  # type: ignore[assignment]
        rows = routed_rows(self.label, x)
        after_a = F.embedding(x if rows is None else x[rows], self.lora_A.T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)
        return add_on_rows(self.base(x), rows, after_a @ self.lora_B.T, self.scale)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {"weight": (self.lora_B @ self.lora_A).T * self.scale}


class LoraConv2d(_LoraBase):
    def __init__(self, base: nn.Conv2d, target: Target, params: LoraParams, init: bool,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base, params, target.label)
        conv = unwrap(base)
        kh, kw = conv.kernel_size
        self.lora_A = self._new(params.r, conv.in_channels, kh, kw)
        self.lora_B = self._new(conv.out_channels, params.r, 1, 1)
        if init:
            init_lora_a(self.lora_A.data, params, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base: nn.Conv2d = unwrap(self.base)  # type: ignore[assignment]
        rows = routed_rows(self.label, x)
        h = self.dropout(x if rows is None else x[rows])
        after_a = F.conv2d(h, self.lora_A, None, base.stride, base.padding, base.dilation)
        return add_on_rows(self.base(x), rows, F.conv2d(after_a, self.lora_B), self.scale)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        delta = self.lora_B.flatten(1) @ self.lora_A.flatten(1)
        return {"weight": delta.view(unwrap(self.base).weight.shape) * self.scale}


class LoraPatch(WrapPatch):
    mergeable = True

    def __init__(self, parent: nn.Module, attr: str, original: nn.Module, wrapper: nn.Module,
                 params: LoraParams, path: str) -> None:
        super().__init__(parent, attr, original, wrapper)
        self.bias_name = f"{path}.bias" if params.bias == "lora_only" and getattr(original, "bias", None) is not None else None

    def trained_base_parameters(self) -> dict[str, nn.Parameter]:
        return {self.bias_name: self.original.bias} if self.bias_name else {}


_WRAPPERS: dict[str, type[_LoraBase]] = {
    "linear": LoraLinear, "conv1d": LoraLinear, "embedding": LoraEmbedding, "conv2d": LoraConv2d,
}


@register
class Lora(Method):
    verb = "inject"
    name = "lora"
    Params = LoraParams
    kinds = frozenset(_WRAPPERS)
    takes_slices = True
    stacks_on = frozenset({"quantize"})
    shares_modules = True
    routes_rows = True
    mergeable = True
    summary = "low-rank update B A beside a frozen layer (Hu et al. 2021)"

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        reason = super().check(target, params)
        if reason:
            return reason
        assert isinstance(params, LoraParams)
        widths = [stop - start for start, stop in target.slices.values()] or [target.out_features or 0]
        limit = min([target.in_features or 0, *widths])
        if params.r > limit:
            return f"r={params.r} is larger than {target.path} allows (at most {limit})"
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, LoraParams) and target.weight_shape is not None
        r, shape = params.r, target.weight_shape
        if target.kind == "embedding":
            return {"lora_A": (r, shape[0]), "lora_B": (shape[1], r)}
        if target.kind == "conv2d":
            return {"lora_A": (r, shape[1], shape[2], shape[3]), "lora_B": (shape[0], r, 1, 1)}
        d_in = target.in_features or 0
        if not target.slices:
            return {"lora_A": (r, d_in), "lora_B": (target.out_features or 0, r)}
        shapes: dict[str, tuple[int, ...]] = {}
        for name, (start, stop) in target.slices.items():
            shapes[f"lora_A_{name}"] = (r, d_in)
            shapes[f"lora_B_{name}"] = (stop - start, r)
        return shapes

    @classmethod
    def trained_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, LoraParams)
        if params.bias != "lora_only" or not target.has_bias:
            return {}
        if target.kind == "conv2d":
            return {"bias": (target.weight_shape or (0,))[:1]}
        return {"bias": (target.out_features or 0,)}  # linear, conv1d (embeddings have no bias)

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, LoraParams)
        parent, attr, original = locate(model, target.path)
        init = ctx.init and compute_dtype_device(original)[1].type != "meta"  # nothing to draw on meta; slow there
        wrapper = _WRAPPERS[target.kind](original, target, params, init, ctx.generator)
        patch = LoraPatch(parent, attr, original, wrapper, params, target.path)
        if patch.bias_name:
            original.bias.requires_grad_(True)
        return patch

    # PEFT interchange: LoraConfig, and PEFT's names for the same tensors in the same layouts

    peft_type = "LORA"

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, LoraParams)
        return {"r": params.r, "lora_alpha": params.alpha if params.alpha is not None else params.r,
                "lora_dropout": params.dropout, "use_rslora": params.rslora, "bias": params.bias,
                "use_dora": False, "init_lora_weights": True}

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if target.slices:
            raise ExportError(f"LoRA on the {'/'.join(target.slices)} slice of the fused {target.path} has no PEFT "
                              "equivalent: PEFT adapts whole modules; target the whole module "
                              f"('into {target.path.rsplit('.', 1)[-1]}') to export")
        names = _PEFT_NAMES[target.kind]
        return {names[local]: tensor for local, tensor in tensors.items()}

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        local_of = {peft: local for local, peft in _PEFT_NAMES[target.kind].items()}
        unknown = sorted(set(tensors) - set(local_of))
        if unknown:
            raise ExportError(f"PEFT tensors {unknown} of {target.path} are not LoRA's")
        return {local_of[name]: tensor for name, tensor in tensors.items()}

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        if config.get("use_dora"):
            raise ExportError("a DoRA adapter (use_dora=true) is not plain LoRA")
        for option, plain in (("lora_bias", False), ("layer_replication", None), ("use_qalora", False)):
            if config.get(option, plain) not in (plain, None, False, {}):
                raise ExportError(f"PEFT option {option}={config[option]!r} has no surgeon equivalent")
        if config.get("bias", "none") == "all":
            raise ExportError("PEFT bias='all' (train every bias of the model) has no surgeon equivalent yet")
        ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        groups: dict[tuple[int, float], list[str]] = {}
        for path in targets:
            r = _pattern_value(ranks, path, config.get("r", 8))
            alpha = _pattern_value(alphas, path, config.get("lora_alpha", 8))
            groups.setdefault((int(r), float(alpha)), []).append(path)
        lines = []
        for (r, alpha), paths in groups.items():
            words = [f"inject lora r={r} alpha={alpha:g}"]
            if config.get("lora_dropout"):
                words.append(f"dropout={config['lora_dropout']:g}")
            if config.get("use_rslora"):
                words.append("rslora=true")
            if config.get("bias", "none") == "lora_only":
                words.append("bias=lora_only")
            words.append(f"into <{','.join(paths)}>")
            lines.append(" ".join(words))
        return "\n".join(lines)


_PEFT_NAMES: dict[str, dict[str, str]] = {  # surgeon's local name -> PEFT's, relative to the module
    "linear": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
    "conv1d": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
    "conv2d": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
    "embedding": {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"},
}


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path by regex at its end."""
    import re

    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
