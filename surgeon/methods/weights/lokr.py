"""LoKr / KronA (Edalati et al. 2022): dW = (alpha/r) * (W1 ⊗ W2), W1 l x m, W2 k x n, l*k = d_out, m*n = d_in.

Everything is PEFT's `LoKrConfig` on a Linear layer, so weights move between the two unchanged:
- the factor shapes come from PEFT's `factorization` of each width: factor=-1 splits it near its
  square root (64 -> 8 x 8, 32 -> 4 x 8); factor=f splits it f x width/f, f going to W1;
- W2 is the low-rank lokr_w2_a (k x r) @ lokr_w2_b (r x n) when r < max(k, n)/2, else a full
  lokr_w2; with decompose_both, W1 likewise (lokr_w1_a, lokr_w1_b) when r < max(l, m)/2;
- init: W1 zero (lokr_w1, or lokr_w1_a zero and lokr_w1_b Kaiming), W2 Kaiming-uniform (a=sqrt(5)),
  so the delta is zero at step 0;
- rank_dropout drops output rows of the delta (divided by the kept fraction only with
  rank_dropout_scale), module_dropout skips the delta for a forward, drawn in PEFT's order.
Where PEFT quietly falls back when a factor does not divide a width (factor=7 on 64 gives 4 x 16),
surgeon refuses at plan time and lists the factors that work.

The forward never builds the d_out x d_in delta (PEFT does): (W1 ⊗ W2) x is W1 X W2^T for x read as
an m x n matrix X, two small matmuls per token. Merging builds it once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from surgeon.methods._rng import draw
from surgeon.methods.base import ApplyContext, Method, MethodParams, Patch, Target, WrapPatch, locate, register
from surgeon.methods.weights.lora import compute_dtype_device
from surgeon.methods.weights.loha import (FactoredDelta, dropout_words, grouped_statements, part_spans, peft_names_only,
                                  whole_linear_or_refuse)


class LokrParams(MethodParams):
    r: int = Field(8, ge=1, description="rank of the low-rank Kronecker factor(s)")
    alpha: float | None = Field(None, gt=0, description="scale numerator: the delta is scaled by alpha/r; default r")
    factor: int = Field(-1, description="split every width as factor x width/factor (W1 gets factor); "
                        "-1: near the square root, as PEFT's decompose_factor=-1")
    decompose_both: bool = Field(False, description="make W1 low-rank too, where r is small enough")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="in training, drop each output row of the delta "
                                "with this probability (PEFT's rank_dropout)")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="in training, skip the whole delta with this "
                                  "probability (PEFT's module_dropout)")
    rank_dropout_scale: bool = Field(False, description="divide the rank-dropout mask by its mean "
                                     "(PEFT's rank_dropout_scale)")

    @field_validator("factor")
    @classmethod
    def _factor(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("factor must be -1 (automatic) or a positive integer")
        return value

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else float(self.r)) / self.r


def factorize(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's `factorization`, step for step (the shapes must agree for weights to move):
    a factor that divides gives (factor, dimension/factor); otherwise the pair of divisors reached
    by walking up from 1 while the smaller stays <= factor (any, for -1) and the larger shrinks."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n  # PEFT never updates this bound: kept so the walk stops where PEFT's stops
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True)
class KronShape:
    """W1 is l x m, W2 is k x n; each full, or a product through rank r."""

    l: int  # noqa: E741 (the paper's and PEFT's letters)
    k: int
    m: int
    n: int
    full_w1: bool
    full_w2: bool


def kron_shape(rows: int, d_in: int, params: LokrParams) -> KronShape:
    l, k = factorize(rows, params.factor)  # noqa: E741
    m, n = factorize(d_in, params.factor)
    return KronShape(l=l, k=k, m=m, n=n,
                     full_w1=not (params.decompose_both and params.r < max(l, m) / 2),
                     full_w2=not params.r < max(k, n) / 2)


class LokrLinear(FactoredDelta):
    """LoKr on nn.Linear or transformers' Conv1D (or a quantized one), whole or on slices."""

    def __init__(self, base: nn.Module, target: Target, params: LokrParams, init: bool,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base, target, params, params.scale, init, generator)
        self.rescale_rank_dropout = params.rank_dropout_scale

    @staticmethod
    def part_shapes(rows: int, d_in: int, params: Any) -> dict[str, tuple[int, ...]]:
        s, r = kron_shape(rows, d_in, params), params.r
        shapes: dict[str, tuple[int, ...]] = (
            {"lokr_w1": (s.l, s.m)} if s.full_w1 else {"lokr_w1_a": (s.l, r), "lokr_w1_b": (r, s.m)})
        shapes |= {"lokr_w2": (s.k, s.n)} if s.full_w2 else {"lokr_w2_a": (s.k, r), "lokr_w2_b": (r, s.n)}
        return shapes

    def _has(self, name: str, suffix: str) -> bool:
        return name + suffix in self._parameters

    def init_part(self, suffix: str, generator: torch.Generator | None = None) -> None:
        # PEFT's order and laws; W1 (or its left factor) stays zero, so the delta starts at zero
        drawn = [] if self._has("lokr_w1", suffix) else ["lokr_w1_b"]
        drawn += ["lokr_w2"] if self._has("lokr_w2", suffix) else ["lokr_w2_a", "lokr_w2_b"]
        for name in drawn:
            draw(self.factor(name, suffix), nn.init.kaiming_uniform_, generator, a=math.sqrt(5))

    def _w(self, which: str, suffix: str) -> torch.Tensor:
        if self._has(which, suffix):
            return self.factor(which, suffix)
        return self.factor(f"{which}_a", suffix) @ self.factor(f"{which}_b", suffix)

    def part_delta(self, suffix: str) -> torch.Tensor:
        return torch.kron(self._w("lokr_w1", suffix), self._w("lokr_w2", suffix)) * self.scale

    def part_output(self, h: torch.Tensor, suffix: str) -> torch.Tensor:
        # output row i*k+p, input column j*n+q: (W1 ⊗ W2) x = W1 X W2^T with X[j, q] = x[j*n + q]
        w1, w2 = self._w("lokr_w1", suffix), self._w("lokr_w2", suffix)
        x = h.reshape(*h.shape[:-1], w1.shape[1], w2.shape[1])
        return torch.matmul(w1, x @ w2.T).flatten(-2) * self.scale


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


_LOKR_NAMES = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}


@register
class Lokr(Method):
    verb = "inject"
    name = "lokr"
    Params = LokrParams
    kinds = frozenset({"linear", "conv1d"})
    takes_slices = True
    stacks_on = frozenset({"quantize"})
    shares_modules = True
    routes_rows = True
    mergeable = True
    summary = "Kronecker product of two small factors, one low-rank (LoKr / KronA, Edalati et al. 2022)"
    peft_type = "LOKR"

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        reason = super().check(target, params)
        if reason or not isinstance(params, LokrParams) or params.factor == -1:
            return reason
        widths = {"input": target.in_features or 0}
        for suffix, (start, stop) in part_spans(target).items():
            widths[f"{suffix[1:]} slice" if suffix else "output"] = stop - start
        for what, width in widths.items():
            if width % params.factor:
                works = _divisors(math.gcd(*widths.values()))
                listed = ", ".join(f"{w} {what_}" for what_, w in widths.items())
                return (f"factor={params.factor} does not divide the {what} width {width} of {target.path} "
                        f"(LoKr splits each width as factor x width/factor); factors that divide every width "
                        f"of this layer ({listed}): {', '.join(map(str, works))}; or leave factor out "
                        "(automatic, as PEFT's decompose_factor=-1)")
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, LokrParams) and target.in_features is not None
        return {name + suffix: shape for suffix, (start, stop) in part_spans(target).items()
                for name, shape in LokrLinear.part_shapes(stop - start, target.in_features, params).items()}

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, LokrParams)
        parent, attr, original = locate(model, target.path)
        init = ctx.init and compute_dtype_device(original)[1].type != "meta"  # nothing to draw on meta
        return WrapPatch(parent, attr, original, LokrLinear(original, target, params, init, ctx.generator))

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, LokrParams)
        return {"r": params.r, "alpha": params.alpha if params.alpha is not None else params.r,
                "rank_dropout": params.rank_dropout, "module_dropout": params.module_dropout,
                "decompose_both": params.decompose_both, "decompose_factor": params.factor,
                "rank_dropout_scale": params.rank_dropout_scale, "use_effective_conv2d": False,
                "init_weights": True}

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        whole_linear_or_refuse("LoKr", target)
        return peft_names_only("LoKr", target, tensors, _LOKR_NAMES)  # same names, same layouts

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return peft_names_only("LoKr", target, tensors, _LOKR_NAMES)

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        # a decompose_factor that does not divide a width is refused by the plan, which says why;
        # use_effective_conv2d only changes conv layers and init_weights only a fresh adapter's draw
        words = dropout_words(config)
        if config.get("decompose_factor", -1) != -1:
            words.append(f"factor={int(config['decompose_factor'])}")
        words += [f"{key}=true" for key in ("decompose_both", "rank_dropout_scale") if config.get(key)]
        return grouped_statements("inject lokr", config, targets, words)
