"""DoRA (Liu et al. 2024): weight-decomposed LoRA. The weight is split into a magnitude and a
direction, and LoRA adapts the direction:

    W' = m * (W0 + s B A) / ||W0 + s B A||_c        (||.||_c: the norm of each output row)

m (one value per output) starts at ||W0||_c and B at zero, so the patched layer starts out equal
to the original. As in the paper (section 4.3) and PEFT, the norm is treated as a constant: it is
recomputed from the current A, B on every forward but gets no gradient. The forward is written
the way PEFT writes it, h = base(x) + (m/n - 1) W0 x + (m/n) s B A x, so the bias is not rescaled
and dropout (when active) reaches the W0 x term too, exactly as in PEFT's `use_dora=True`.

On a slice of a fused projection (GPT-2's c_attn) each named slice gets its own A, B and m; since
the norm is taken per output row, DoRA on a block of rows is DoRA on those rows alone, and the
other rows stay exactly the base layer's output. PEFT cannot hold slices, so export refuses them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.errors import ExportError
from surgeon.methods.base import ApplyContext, MethodParams, Patch, Target, locate, register
from surgeon.methods.weights.lora import Lora, LoraLinear, LoraParams, compute_dtype_device, LoraPatch


class DoraParams(LoraParams):
    """LoRA's parameters (r, alpha, dropout, init, rslora, bias); the magnitude vector takes none."""


def _parts(target_slices: dict[str, tuple[int, int]], d_out: int) -> list[tuple[str, int, int]]:
    """(parameter-name suffix, first row, end row) of every block of output rows DoRA adapts."""
    if not target_slices:
        return [("", 0, d_out)]
    return [(f"_{name}", start, stop) for name, (start, stop) in target_slices.items()]


class DoraLinear(LoraLinear):
    """DoRA on nn.Linear or transformers' Conv1D (or a quantized one), whole or on slices."""

    weighable = False  # the magnitude renormalises the direction: not linear in the scale

    def __init__(self, base: nn.Module, target: Target, params: LoraParams, init: bool,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base, target, params, init, generator)
        self.parts = _parts(self.slices, self.out_features)
        for suffix, start, stop in self.parts:
            self.register_parameter(f"lora_magnitude_vector{suffix}", self._new(stop - start))
        if init:  # B is zero, so this is ||W0||_c: the layer starts equal to the original
            with torch.no_grad():
                weight = self._base_weight()
                for suffix, start, stop in self.parts:
                    self._magnitude(suffix).copy_(self._norm(suffix, weight[start:stop]))

    def _factors(self, suffix: str) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"lora_A{suffix}"), getattr(self, f"lora_B{suffix}")

    def _magnitude(self, suffix: str) -> nn.Parameter:
        return getattr(self, f"lora_magnitude_vector{suffix}")

    def _base_weight(self) -> torch.Tensor:
        """W0 as (d_out, d_in) in the compute dtype; a quantized base hands over its dequantized weight."""
        if hasattr(self.base, "dequantized"):
            return self.base.dequantized()
        weight = self.base.weight
        return weight.T if self.transposed else weight

    def _norm(self, suffix: str, rows: torch.Tensor) -> torch.Tensor:
        """||W0 + s B A||_c for one block of rows, detached (the paper's and PEFT's choice)."""
        a, b = self._factors(suffix)
        with torch.no_grad():
            return torch.linalg.norm(rows + self.scale * (b @ a), dim=1).to(rows.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # in LoRA's dtype, as PEFT: the base's (its compute dtype, for a quantized one) may differ
        # once the model was cast after apply
        weight = self._base_weight().to(self.dtype)
        h = self.dropout(x).to(self.dtype)
        # with dropout active PEFT applies W0 to the dropped input; else it reuses base(x) - bias
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        extras = []
        for suffix, start, stop in self.parts:
            base_part = F.linear(h, weight[start:stop]) if dropped else self._unbiased(out, start, stop)
            extras.append((start, stop, self._extra(suffix, weight[start:stop], h, base_part)))
        if not self.slices:
            return out + extras[0][2].to(out.dtype)
        out = out.clone()  # the extras may have kept views of out for backward: write into a copy
        for start, stop, extra in extras:
            out[..., start:stop].add_(extra.to(out.dtype))
        return out

    def _unbiased(self, out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """W0 x for these rows, from the base output: the magnitude does not rescale the bias."""
        rows = out[..., start:stop].to(self.dtype)
        bias = getattr(self.base, "bias", None)
        return rows - bias[start:stop].to(self.dtype) if bias is not None else rows

    def _extra(self, suffix: str, rows: torch.Tensor, h: torch.Tensor, base_part: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to W0 x (+ bias): (m/n - 1) W0 x + (m/n) s B A x, as PEFT computes it."""
        a, b = self._factors(suffix)
        ratio = self._magnitude(suffix) / self._norm(suffix, rows)
        return (ratio - 1) * base_part + ratio * (F.linear(F.linear(h, a), b) * self.scale)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """m * (W0 + s B A) / ||W0 + s B A||_c - W0, so that W0 + delta is DoRA's merged weight
        (also for a quantized base, whose `merged_with` adds the delta to its dequantized weight)."""
        weight = self._base_weight()
        delta = torch.zeros_like(weight)
        for suffix, start, stop in self.parts:
            a, b = self._factors(suffix)
            directed = weight[start:stop] + self.scale * (b @ a)
            ratio = self._magnitude(suffix) / torch.linalg.norm(directed, dim=1).to(directed.dtype)
            delta[start:stop] = ratio[:, None] * directed - weight[start:stop]
        return {"weight": delta.T if self.transposed else delta}  # in the layout of the original module


# surgeon's local name -> PEFT's, relative to the module (checked against a saved PEFT DoRA model)
_PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude_vector": "lora_magnitude_vector"}


@register
class Dora(Lora):
    verb = "inject"
    name = "dora"
    Params = DoraParams
    kinds = frozenset({"linear", "conv1d"})
    takes_slices = True
    stacks_on = frozenset({"quantize"})
    shares_modules = False  # its magnitude is taken of the weight it wraps, which must be the layer's own
    routes_rows = False
    mergeable = True
    summary = "LoRA on the direction of the weight, with a learned magnitude per output (Liu et al. 2024)"
    peft_type = "LORA"

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, DoraParams)
        shapes: dict[str, tuple[int, ...]] = {}
        for suffix, start, stop in _parts(dict(target.slices), target.out_features or 0):
            shapes[f"lora_A{suffix}"] = (params.r, target.in_features or 0)
            shapes[f"lora_B{suffix}"] = (stop - start, params.r)
            shapes[f"lora_magnitude_vector{suffix}"] = (stop - start,)
        return shapes

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, DoraParams)
        parent, attr, original = locate(model, target.path)
        init = ctx.init and compute_dtype_device(original)[1].type != "meta"  # no weights to take norms of on meta
        wrapper = DoraLinear(original, target, params, init, ctx.generator)
        patch = LoraPatch(parent, attr, original, wrapper, params, target.path)
        if patch.bias_name:
            original.bias.requires_grad_(True)
        return patch

    # PEFT interchange: LoraConfig(use_dora=True), tensors under PEFT's names in PEFT's layouts

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, DoraParams)
        return {"r": params.r, "lora_alpha": params.alpha if params.alpha is not None else params.r,
                "lora_dropout": params.dropout, "use_rslora": params.rslora, "bias": params.bias,
                "use_dora": True, "init_lora_weights": "gaussian" if params.init == "gaussian" else True}

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if target.slices:
            raise ExportError(f"DoRA on the {'/'.join(target.slices)} slice of the fused {target.path} has no PEFT "
                              "equivalent: PEFT adapts whole modules (one magnitude per output of the module); "
                              f"target the whole module ('into {target.path.rsplit('.', 1)[-1]}') to export")
        unknown = sorted(set(tensors) - set(_PEFT_NAMES))
        if unknown:
            raise ExportError(f"tensors {unknown} of {target.path} are not DoRA's")
        return {_PEFT_NAMES[local]: tensor for local, tensor in tensors.items()}

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        local_of = {peft: local for local, peft in _PEFT_NAMES.items()}
        unknown = sorted(set(tensors) - set(local_of))
        if unknown:
            raise ExportError(f"PEFT tensors {unknown} of {target.path} are not DoRA's")
        return {local_of[name]: tensor for name, tensor in tensors.items()}

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        if not config.get("use_dora"):
            raise ExportError("a LoRA adapter without use_dora=true is plain LoRA, not DoRA")
        # every other LoraConfig option reads as for LoRA (rank/alpha patterns, dropout, rslora, bias)
        plain = Lora.statement_from_peft({**config, "use_dora": False}, targets)
        return "\n".join("inject dora" + line.removeprefix("inject lora") for line in plain.splitlines())
