"""LoHa / FedPara (Hyeon-Woo et al. 2022): dW = (w1_a w1_b) ⊙ (w2_a w2_b) * alpha/r.

The Hadamard product of two rank-r products has rank up to r^2 for the parameters of a rank-2r
LoRA. Names, layouts, init, scale and both dropouts are PEFT's `LoHaConfig` on a Linear layer, so
weights move between the two unchanged:
    hada_w1_a d_out x r, hada_w1_b r x d_in, hada_w2_a d_out x r, hada_w2_b r x d_in;
    w1_a, w1_b, w2_a Kaiming-uniform (a=sqrt(5)), w2_b zero: the delta is zero at step 0;
    rank_dropout drops output rows of the delta (rescaled by the kept fraction), module_dropout
    skips the whole delta for a forward, both only in training and drawn from torch's global
    generator in PEFT's order, so a seeded run drops what PEFT drops.
Beyond PEFT: transformers' Conv1D (GPT-2) and q/k/v slices of a fused projection; PEFT's LoHa has
neither, so export refuses them. Conv2d (PEFT's use_effective_conv2d) is not offered.

`FactoredDelta` below, a frozen linear layer plus a delta made of small factors per block of output
rows, also carries LoKr (lokr.py).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgeon.errors import ExportError
from surgeon.methods._rng import draw
from surgeon.methods.base import (ApplyContext, Method, MethodParams, Patch, Target, WrapPatch, WrapsLayer, locate,
                                  register)
from surgeon.methods.weights.lora import compute_dtype_device, own_dtype
from surgeon.methods.rows import add_on_rows, routed_rows


class LohaParams(MethodParams):
    r: int = Field(8, ge=1, description="rank of each of the two factor products (the delta's rank is up to r^2)")
    alpha: float | None = Field(None, gt=0, description="scale numerator: the delta is scaled by alpha/r; default r")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="in training, drop each output row of the delta "
                                "with this probability (PEFT's rank_dropout)")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="in training, skip the whole delta with this "
                                  "probability (PEFT's module_dropout)")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else float(self.r)) / self.r


def part_spans(target: Target) -> dict[str, tuple[int, int]]:
    """Parameter-name suffix -> (first, end) output row of each block that gets its own factors:
    the whole layer (suffix ""), or each named slice of a fused projection (suffix "_q")."""
    if not target.slices:
        return {"": (0, target.out_features or 0)}
    return {f"_{name}": span for name, span in target.slices.items()}


class FactoredDelta(WrapsLayer, nn.Module):
    """A frozen nn.Linear / Conv1D (or a quantized one) plus a delta weight built from small factors.

    Each part (the whole layer, or each slice of a fused projection) has its own factors; rows
    outside every slice stay exactly the base layer's output. Subclasses name the factors
    (`part_shapes`), draw them (`init_part`) and say how they make the delta (`part_delta`) and,
    where cheaper than x @ delta^T, the output (`part_output`)."""

    rescale_rank_dropout: bool = True
    weighable = True  # its output is linear in `scale`: job.activate({name: weight}) scales it

    def __init__(self, base: nn.Module, target: Target, params: Any, scale: float, init: bool,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        self.label = target.label  # the named adapter it belongs to: which rows of a mixed batch it serves
        self.transposed = target.kind == "conv1d"  # Conv1D stores its weight as (d_in, d_out)
        assert target.in_features is not None and target.out_features is not None
        self.in_features, self.out_features = target.in_features, target.out_features
        self.parts = part_spans(target)
        self.sliced = bool(target.slices)
        self.scale = scale
        self.rank_dropout, self.module_dropout = params.rank_dropout, params.module_dropout
        dtype, device = compute_dtype_device(base)  # a quantized base computes in its own dtype, and so do we
        for suffix, (start, stop) in self.parts.items():
            for name, shape in self.part_shapes(stop - start, self.in_features, params).items():
                zeros = torch.zeros(shape, dtype=dtype, device=device)
                self.register_parameter(name + suffix, nn.Parameter(zeros))
            if init:
                self.init_part(suffix, generator)
        self.train(base.training)  # a wrapper made while the model is in eval mode stays in eval mode

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype, read on every forward so a model cast after apply computes in it."""
        return own_dtype(self)

    @staticmethod
    def part_shapes(rows: int, d_in: int, params: Any) -> dict[str, tuple[int, ...]]:
        """Factor name -> shape for a part of `rows` output rows."""
        raise NotImplementedError

    def init_part(self, suffix: str, generator: torch.Generator | None = None) -> None:
        """Draw a part's initial factors (the delta must start at zero), from `generator` (None:
        the global RNG)."""
        raise NotImplementedError

    def part_delta(self, suffix: str) -> torch.Tensor:
        """The part's scaled delta, (rows, d_in)."""
        raise NotImplementedError

    def part_output(self, h: torch.Tensor, suffix: str) -> torch.Tensor:
        """h @ delta^T for one part, (..., rows)."""
        return F.linear(h, self.part_delta(suffix))

    def factor(self, name: str, suffix: str) -> nn.Parameter:
        return getattr(self, name + suffix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # PEFT draws this number on every training forward, even at module_dropout=0: drawing it
        # too keeps a seeded run's random stream, and so every later dropout mask, equal to PEFT's
        if self.training and not bool(torch.rand(1) > self.module_dropout):
            return out
        rows = routed_rows(self.label, x)
        h = (x if rows is None else x[rows]).to(self.dtype)
        for suffix, (start, stop) in self.parts.items():
            y = self._rank_dropped(self.part_output(h, suffix), stop - start).to(out.dtype)
            out = add_on_rows(out, rows, y, span=(start, stop) if self.sliced else None)
        return out

    def _rank_dropped(self, y: torch.Tensor, rows: int) -> torch.Tensor:
        """PEFT's rank dropout: one keep/drop draw per output row of the delta (scaling row i of the
        delta is scaling output i), divided by the kept fraction where the method says so."""
        if not (self.training and self.rank_dropout):
            return y
        keep = (torch.rand(rows) > self.rank_dropout).to(y.dtype)
        if self.rescale_rank_dropout:  # (the floor only matters when every row is dropped: 0, not PEFT's NaN)
            keep = keep / keep.mean().clamp_min(1 / rows)
        return y * keep.to(y.device)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """The whole delta in the original module's layout (what WrapPatch.merge adds)."""
        if not self.sliced:
            delta = self.part_delta("")
        else:
            device = compute_dtype_device(self.base)[1]
            delta = torch.zeros((self.out_features, self.in_features), dtype=self.dtype, device=device)
            for suffix, (start, stop) in self.parts.items():
                delta[start:stop] = self.part_delta(suffix)
        return {"weight": delta.T if self.transposed else delta}


class _HadamardWeight(torch.autograd.Function):
    """((w1a w1b) ⊙ (w2a w2b)) * scale, keeping only the factors for backward and rebuilding the two
    d_out x d_in products there (as PEFT does): autograd would keep both products alive."""

    @staticmethod
    def forward(ctx, w1a: torch.Tensor, w1b: torch.Tensor,  # type: ignore[override]
                w2a: torch.Tensor, w2b: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        # in the factors' dtype: a grad from an autocast forward (bf16) times fp16 factors promotes to fp32
        through_1 = (grad * (w2a @ w2b)).to(w1a.dtype)  # d(loss)/d(w1a w1b)
        through_2 = (grad * (w1a @ w1b)).to(w2a.dtype)
        return through_1 @ w1b.T, w1a.T @ through_1, through_2 @ w2b.T, w2a.T @ through_2, None


class LohaLinear(FactoredDelta):
    """LoHa on nn.Linear or transformers' Conv1D (or a quantized one), whole or on slices."""

    @staticmethod
    def part_shapes(rows: int, d_in: int, params: Any) -> dict[str, tuple[int, ...]]:
        r = params.r
        return {"hada_w1_a": (rows, r), "hada_w1_b": (r, d_in), "hada_w2_a": (rows, r), "hada_w2_b": (r, d_in)}

    def init_part(self, suffix: str, generator: torch.Generator | None = None) -> None:
        # PEFT's order and law (FedPara's He init); hada_w2_b stays zero, so the delta starts at zero
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
            draw(self.factor(name, suffix), nn.init.kaiming_uniform_, generator, a=math.sqrt(5))

    def part_delta(self, suffix: str) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (self.factor(n, suffix) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        return _HadamardWeight.apply(w1a, w1b, w2a, w2b, self.scale)


# PEFT interchange helpers, shared with LoKr (same module types, same tensor naming scheme)

def whole_linear_or_refuse(method: str, target: Target) -> None:
    """PEFT's LyCORIS methods adapt whole nn.Linear (and conv) layers: refuse what they cannot hold."""
    if target.slices:
        raise ExportError(f"{method} on the {'/'.join(target.slices)} slice of the fused {target.path} has no PEFT "
                          "equivalent: PEFT adapts whole modules; target the whole module "
                          f"('into {target.path.rsplit('.', 1)[-1]}') to export")
    if target.kind == "conv1d":
        raise ExportError(f"{target.path} is a transformers Conv1D (GPT-2 style), for which PEFT's {method} has no "
                          "layer (it adapts nn.Linear, nn.Conv1d and nn.Conv2d): this run cannot be exported to PEFT")


def peft_names_only(method: str, target: Target, tensors: dict[str, torch.Tensor],
                    known: set[str]) -> dict[str, torch.Tensor]:
    """PEFT's tensor names are surgeon's local names: check that they are the method's, and pass them on."""
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise ExportError(f"PEFT tensors {unknown} of {target.path} are not {method}'s (expected {sorted(known)})")
    return dict(tensors)


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key
    that matches the end of the module path, as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def grouped_statements(head: str, config: dict[str, Any], targets: list[str], options: list[str]) -> str:
    """One `inject METHOD r=.. alpha=.. OPTIONS into <paths>` line per (r, alpha) that PEFT's
    rank_pattern / alpha_pattern give the targets."""
    if not targets:
        raise ExportError(f"a PEFT {config.get('peft_type')} adapter with no target modules")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    groups: dict[tuple[int, float], list[str]] = {}
    for path in targets:
        r = pattern_value(ranks, path, config.get("r", 8))
        alpha = pattern_value(alphas, path, config.get("alpha", 8))
        groups.setdefault((int(r), float(alpha)), []).append(path)
    return "\n".join(" ".join([f"{head} r={r} alpha={alpha:g}", *options, f"into <{','.join(paths)}>"])
                     for (r, alpha), paths in groups.items())


def dropout_words(config: dict[str, Any]) -> list[str]:
    return [f"{key}={config[key]:g}" for key in ("rank_dropout", "module_dropout") if config.get(key)]


_LOHA_NAMES = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}


@register
class Loha(Method):
    verb = "inject"
    name = "loha"
    Params = LohaParams
    kinds = frozenset({"linear", "conv1d"})
    takes_slices = True
    stacks_on = frozenset({"quantize"})
    shares_modules = True
    routes_rows = True
    mergeable = True
    summary = "Hadamard product of two low-rank updates, rank up to r^2 (LoHa / FedPara, Hyeon-Woo et al. 2022)"
    peft_type = "LOHA"

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, LohaParams) and target.in_features is not None
        return {name + suffix: shape for suffix, (start, stop) in part_spans(target).items()
                for name, shape in LohaLinear.part_shapes(stop - start, target.in_features, params).items()}

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, LohaParams)
        parent, attr, original = locate(model, target.path)
        init = ctx.init and compute_dtype_device(original)[1].type != "meta"  # nothing to draw on meta
        return WrapPatch(parent, attr, original, LohaLinear(original, target, params, params.scale, init,
                                                            ctx.generator))

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, LohaParams)
        return {"r": params.r, "alpha": params.alpha if params.alpha is not None else params.r,
                "rank_dropout": params.rank_dropout, "module_dropout": params.module_dropout,
                "use_effective_conv2d": False, "init_weights": True}

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        whole_linear_or_refuse("LoHa", target)
        return peft_names_only("LoHa", target, tensors, _LOHA_NAMES)  # same names, same layouts

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return peft_names_only("LoHa", target, tensors, _LOHA_NAMES)

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        # use_effective_conv2d only changes conv layers, which surgeon's LoHa does not take (the plan
        # says so), and init_weights only how PEFT draws a fresh adapter: the imported weights replace it
        return grouped_statements("inject loha", config, targets, dropout_words(config))
