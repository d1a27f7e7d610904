"""ALiBi (Press et al. 2022): `attend alibi [rope=off]`. The scaled logits get `-m_h * |i - j|`,
with the slopes of ofirpress/attention_with_linear_biases: `2^(-8h/n)` for n a power of two, else
those of the largest power of two c below n and the odd ones of 2c (Bloom's and MPT's slopes, which
the tests compare for 1..64 heads). `rope=off` drops the rotary embedding (its frequencies zeroed:
cos 1, sin 0), for ALiBi alone; revert puts the very buffers back. A model that already uses ALiBi
(Bloom, MPT, Falcon with alibi) is refused."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import PlanError
from surgeon.methods.attention._attend import Attend, ModifierPatch
from surgeon.methods.attention._seam import BIAS, AttentionCall, Modifier, rotary_of
from surgeon.methods.base import ApplyContext, MethodParams, Patch, Target, register

_ALIBI_MODELS = ("Bloom", "Mpt")  # Falcon is either: config.alibi says
_ROPE_OFF_ATTR = "_surgeon_rope_off"  # on the rotary module: the RopeOff of the statement that dropped it


class AlibiParams(MethodParams):
    rope: bool = Field(True, description="keep the rotary embedding (off: ALiBi alone, as the paper)")


def alibi_slopes(heads: int) -> list[float]:
    """ofirpress's get_slopes."""
    def powers(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(heads).is_integer():
        return powers(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return powers(closest) + alibi_slopes(2 * closest)[0::2][:heads - closest]


class AlibiModifier(Modifier):
    stage = BIAS

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32)

    def modify(self, call: AttentionCall) -> None:
        distance = (call.query_positions[:, None] - call.key_positions[None, :]).abs().float()
        slopes = self.slopes.to(call.query.device)
        call.add_bias(-slopes[:, None, None] * distance[None])


class RopeOff:
    """The rotary module's frequencies zeroed; the very buffers back on undo."""

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary
        self.buffers = {name: rotary._buffers[name] for name in ("inv_freq", "original_inv_freq")
                        if name in rotary._buffers}
        for name, buffer in self.buffers.items():
            rotary.register_buffer(name, torch.zeros_like(buffer), persistent=False)
        rotary.__dict__[_ROPE_OFF_ATTR] = self

    def undo(self) -> None:
        for name, buffer in self.buffers.items():
            self.rotary._buffers[name] = buffer
        self.rotary.__dict__.pop(_ROPE_OFF_ATTR, None)


class AlibiPatch(ModifierPatch):
    rope_off: RopeOff | None = None

    def revert(self) -> None:
        super().revert()
        if self.rope_off is not None:
            self.rope_off.undo()


@register
class Alibi(Attend):
    name = "alibi"
    Params = AlibiParams
    modifier_type = AlibiModifier
    patch_type = AlibiPatch
    claims = frozenset()
    summary = "ALiBi: a linear distance bias per head on the attention logits (rope=off drops RoPE)"
    unmergeable_because = "ALiBi is a bias on the attention logits, which no weight holds"

    @classmethod
    def claims_of(cls, params: MethodParams) -> frozenset[str]:
        assert isinstance(params, AlibiParams)
        return cls.claims if params.rope else cls.claims | {"rope"}

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        if target.type_name.startswith(_ALIBI_MODELS):
            return f"{target.path} ({target.type_name}) already uses ALiBi"
        return super().check(target, params)

    @classmethod
    def describe(cls, target: Target, params: MethodParams) -> str:
        assert isinstance(params, AlibiParams)
        return "attention: ALiBi distance bias" + ("" if params.rope else " (rotary embedding off)")

    @classmethod
    def modifier(cls, model: nn.Module, inner: nn.Module, target: Target, params: MethodParams) -> Modifier:
        config = getattr(model, "config", None)
        if getattr(config, "alibi", False):
            raise PlanError(f"{type(model).__name__} already uses ALiBi (config.alibi)")
        heads = getattr(inner, "num_heads", None) or getattr(config, "num_attention_heads", None)
        if not isinstance(heads, int):
            raise PlanError(f"{target.path}: cannot read the number of attention heads")
        return AlibiModifier(heads)

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, AlibiParams)
        rotary = rotary_of(model)
        if not params.rope and rotary is None:
            raise PlanError("rope=off: the model has no rotary embedding to drop")
        patch = super().apply(model, target, params, ctx)
        assert isinstance(patch, AlibiPatch)
        if not params.rope and _ROPE_OFF_ATTR not in rotary.__dict__:  # the statement's first layer drops it
            patch.rope_off = RopeOff(rotary)
        return patch
