"""IA3 (Liu et al. 2022, T-Few): learned vectors rescale activations element-wise.

    inject ia3 into *.attn.<k,v>        # l_k, l_v scale the keys and values (the layers' outputs)
    inject ia3 into *.mlp.down          # l_ff scales the FFN hidden activation (the down layer's input)

A feedforward target (role `down`, or `feedforward=true`) scales its input, so the vector sits after
the FFN's nonlinearity as in the paper; any other target scales its output, bias included, as PEFT's
`IA3Config(feedforward_modules=...)` does. Vectors start at ones, so the patched model's output
equals the original's. Merging scales the weight's rows (output) or columns (input), and the bias
with the rows. On GPT-2's fused c_attn the k and v slices get one vector each and the q columns
stay exactly the base layer's; PEFT cannot hold slices, so export refuses them.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import ExportError
from surgeon.methods.base import (ApplyContext, Method, MethodParams, Patch, Target, WrapPatch, locate,
                                  register)
from surgeon.methods.weights.lora import compute_dtype_device

FEEDFORWARD_ROLES = frozenset({"down"})  # the layer that reads the FFN's hidden activation


class Ia3Params(MethodParams):
    feedforward: bool | None = Field(
        None, description="scale the layer's input (the FFN hidden activation) instead of its output; "
                          "default: true for the FFN down projection (role 'down'), false elsewhere")


def is_feedforward(target: Target, params: Ia3Params) -> bool:
    """Input scaling or output scaling: the explicit parameter, else the target's role."""
    if params.feedforward is not None:
        return params.feedforward
    return target.role in FEEDFORWARD_ROLES


class Ia3Linear(nn.Module):
    """IA3 on nn.Linear or transformers' Conv1D (or a quantized one), whole or on output slices."""

    def __init__(self, base: nn.Module, target: Target, feedforward: bool) -> None:
        super().__init__()
        self.base = base
        self.feedforward = feedforward
        self.transposed = target.kind == "conv1d"
        self.slices = dict(target.slices)
        d_in, d_out = target.in_features, target.out_features
        assert d_in is not None and d_out is not None
        self.in_features, self.out_features = d_in, d_out
        for name, size in _vector_sizes(target, feedforward).items():
            self.register_parameter(name, self._ones(size))  # ones: the layer starts as it was
        self.train(base.training)  # a wrapper made while the model is in eval mode stays in eval mode

    def _ones(self, size: int) -> nn.Parameter:
        dtype, device = compute_dtype_device(self.base)
        return nn.Parameter(torch.ones(size, dtype=dtype, device=device))

    def output_scale(self) -> torch.Tensor:
        """One factor per output: the learned vector, or ones around the learned slices."""
        if not self.slices:
            return self.ia3_l
        pieces, end = [], 0
        for name, (start, stop) in sorted(self.slices.items(), key=lambda item: item[1]):
            vector = getattr(self, f"ia3_l_{name}")
            pieces += [vector.new_ones(start - end), vector]
            end = stop
        return torch.cat([*pieces, pieces[-1].new_ones(self.out_features - end)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            scale = self.ia3_l
            return self.base((x.to(scale.dtype) * scale).to(x.dtype))
        out = self.base(x)
        return (out * self.output_scale()).to(out.dtype)

    def _linear_weight(self) -> torch.Tensor:
        """W0 as (d_out, d_in); a quantized base hands over its dequantized weight."""
        if hasattr(self.base, "dequantized"):
            return self.base.dequantized()
        weight = self.base.weight
        return weight.T if self.transposed else weight

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """What to add to the weight (and bias) so the plain layer computes what this one does."""
        weight = self._linear_weight()
        if self.feedforward:
            delta = weight * (self.ia3_l[None, :] - 1)  # columns: the input features
        else:
            delta = weight * (self.output_scale()[:, None] - 1)  # rows: the outputs
        deltas = {"weight": delta.T if self.transposed else delta}  # in the layout of the original module
        bias = getattr(self.base, "bias", None)
        if bias is not None and not self.feedforward:  # the output scale multiplies the bias too
            deltas["bias"] = bias * (self.output_scale().to(bias.dtype) - 1)
        return deltas


def _vector_sizes(target: Target, feedforward: bool) -> dict[str, int]:
    if feedforward:
        return {"ia3_l": target.in_features or 0}
    if not target.slices:
        return {"ia3_l": target.out_features or 0}
    return {f"ia3_l_{name}": stop - start for name, (start, stop) in target.slices.items()}


class Ia3Patch(WrapPatch):
    mergeable = True

    def merge(self) -> None:
        """A quantized base folds only the weight delta in (`merged_with`); the scaled bias is
        written into the fresh plain layer it returns, which no one else holds."""
        fresh = self.merged_into is None
        super().merge()
        bias = getattr(self.merged_into, "bias", None)
        if fresh and hasattr(self.original, "merged_with") and bias is not None and not self.wrapper.feedforward:
            with torch.no_grad():
                bias.copy_(self.wrapper.base.bias * self.wrapper.output_scale().to(bias.dtype))


@register
class Ia3(Method):
    verb = "inject"
    name = "ia3"
    Params = Ia3Params
    kinds = frozenset({"linear", "conv1d"})
    takes_slices = True
    stacks_on = frozenset({"quantize"})
    mergeable = True
    summary = "learned vectors rescale keys, values and the FFN hidden activation (Liu et al. 2022)"
    peft_type = "IA3"

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        reason = super().check(target, params)
        if reason:
            return reason
        assert isinstance(params, Ia3Params)
        if target.slices and is_feedforward(target, params):
            return (f"feedforward=true scales the input of {target.path}, which its "
                    f"{'/'.join(target.slices)} slice shares with the others; target the whole module")
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, Ia3Params)
        return {name: (size,) for name, size in _vector_sizes(target, is_feedforward(target, params)).items()}

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, Ia3Params)
        parent, attr, original = locate(model, target.path)
        wrapper = Ia3Linear(original, target, is_feedforward(target, params))
        return Ia3Patch(parent, attr, original, wrapper)

    # PEFT interchange: IA3Config; PEFT keeps `ia3_l` as (d_out, 1), or (1, d_in) when feedforward

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, Ia3Params)
        return {"init_ia3_weights": True}

    @classmethod
    def peft_target_config(cls, params: MethodParams, targets: list[Target]) -> dict[str, Any]:
        """IA3Config.feedforward_modules: the full paths of the targets whose input is scaled
        (PEFT asks by name; surgeon decides by role or by the explicit parameter)."""
        assert isinstance(params, Ia3Params)
        return {"feedforward_modules": [t.path for t in targets if is_feedforward(t, params)]}

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert isinstance(params, Ia3Params)
        if target.slices:
            raise ExportError(f"IA3 on the {'/'.join(target.slices)} slice of the fused {target.path} has no PEFT "
                              "equivalent: PEFT scales every output of a module with one vector; target the "
                              f"whole module ('into {target.path.rsplit('.', 1)[-1]}') to export")
        if set(tensors) != {"ia3_l"}:
            raise ExportError(f"IA3 on {target.path} holds one tensor, ia3_l; got {sorted(tensors)}")
        vector = tensors["ia3_l"]
        return {"ia3_l": vector[None, :] if is_feedforward(target, params) else vector[:, None]}

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert isinstance(params, Ia3Params)
        if set(tensors) != {"ia3_l"}:
            raise ExportError(f"PEFT tensors {sorted(tensors)} of {target.path} are not IA3's (ia3_l)")
        vector = tensors["ia3_l"]
        expected = (1, target.in_features) if is_feedforward(target, params) else (target.out_features, 1)
        if tuple(vector.shape) != expected:
            raise ExportError(f"PEFT's ia3_l of {target.path} is {tuple(vector.shape)}, expected {expected}")
        return {"ia3_l": vector.flatten()}

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        feedforward = config.get("feedforward_modules") or []
        groups: dict[bool, list[str]] = {}
        for path in targets:
            groups.setdefault(_peft_is_feedforward(feedforward, path), []).append(path)
        # explicit feedforward=: PEFT's list decides, not surgeon's roles
        return "\n".join(f"inject ia3 feedforward={'true' if ff else 'false'} into <{','.join(paths)}>"
                         for ff, paths in groups.items())


def _peft_is_feedforward(feedforward_modules: str | list[str], path: str) -> bool:
    """PEFT's own rule (IA3Model._check_target_module_feedforward): a regex must match the whole
    path; a list entry matches when the path ends with it."""
    if isinstance(feedforward_modules, str):
        return bool(re.fullmatch(feedforward_modules, path))
    return any(path.endswith(name) for name in feedforward_modules)
