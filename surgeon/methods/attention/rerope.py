"""ReRoPE and Leaky ReRoPE (Su 2023, bojone/rerope): `attend rerope window=512 [leak=16]`. The
relative distance a pair sees is `min(d, window)` (ReRoPE), or `d` below the window and
`window + (d - window) / leak` beyond it (Leaky ReRoPE), so no pair is ever further apart than the
model was trained on. Pairs at `d >= window` take a second score, from the post-RoPE query and key
rotated further (the seam's PAIRS): ReRoPE rotates the key back to position 0 and the query to
`window`; Leaky rotates the query to `(i + window (leak - 1)) / leak` and the key to `j / leak`, as
`leaky_rerope_patch.py` does with a second linear-scaled rotary. Nothing is cached twice: the cache
holds the keys the model rotated, and a decode step re-rotates only what its pairs need."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from surgeon.errors import PlanError
from surgeon.methods.attention._attend import Attend
from surgeon.methods.attention._seam import PAIRS, AttentionCall, Modifier, PairScores, Rotation, rotary_of
from surgeon.methods.base import MethodParams, Target, register


class ReropeParams(MethodParams):
    window: int = Field(512, ge=1, description="the largest relative distance a pair sees (ReRoPE's w)")
    leak: float | None = Field(None, gt=1, description="Leaky ReRoPE: beyond the window, distance grows by 1/leak "
                               "per token (bojone's k; omitted: ReRoPE, a flat cap)")


class ReropeModifier(Modifier):
    stage = PAIRS

    def __init__(self, window: int, leak: float | None, rotation: Rotation) -> None:
        super().__init__()
        self.window, self.leak, self.rotation = window, leak, rotation

    def modify(self, call: AttentionCall) -> None:
        queries, keys = call.query_positions.float(), call.key_positions.float()
        beyond = queries[:, None] - keys[None, :] >= self.window
        if not bool(beyond.any()):
            return
        if self.leak is None:
            query_shift, key_shift = self.window - queries, -keys
        else:
            query_shift = (queries + self.window * (self.leak - 1)) / self.leak - queries
            key_shift = keys / self.leak - keys
        call.pairs = PairScores(self.rotation, query_shift, key_shift, beyond)


@register
class Rerope(Attend):
    name = "rerope"
    Params = ReropeParams
    modifier_type = ReropeModifier
    summary = "ReRoPE / Leaky ReRoPE: relative distances capped at a window (leak: slowed beyond it)"
    unmergeable_because = "ReRoPE changes the distance attention sees per pair, which no weight holds"
    absent = "the model has no rotary position embedding for ReRoPE to cap"

    @classmethod
    def describe(cls, target: Target, params: MethodParams) -> str:
        assert isinstance(params, ReropeParams)
        if params.leak is None:
            return f"positions: relative distance capped at {params.window} (ReRoPE)"
        return f"positions: relative distance {params.window} + (d - {params.window})/{params.leak:g} beyond " \
               f"{params.window} (Leaky ReRoPE)"

    @classmethod
    def modifier(cls, model: nn.Module, inner: nn.Module, target: Target, params: MethodParams) -> Modifier:
        assert isinstance(params, ReropeParams)
        rotary = rotary_of(model)
        if rotary is None:
            raise PlanError(f"attend rerope: {type(model).__name__} has no rotary position embedding for ReRoPE "
                            "to cap (it uses learned absolute positions or ALiBi)")
        return ReropeModifier(params.window, params.leak, Rotation(rotary))
