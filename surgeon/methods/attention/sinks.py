"""Attention sinks (StreamingLLM, Xiao et al. 2023): `attend sinks tokens=4 window=1020`. Each query
sees the first `tokens` keys and the last `window` (itself included); `generate` keeps only those,
so its memory stays flat however long it runs (the bounded cache of `_cache.py`).

Positions are StreamingLLM's (mit-han-lab/streaming-llm, `pos_shift`): within the cache. Keys keep
the rotation of their absolute position, so a recent key is at its true distance from the query;
the sinks are pulled next to the window, at distance `min(t, tokens + window - 1) - j`, by a second
score with the query rotated back (the seam's PAIRS), with no re-rotation of cached keys. The
exact reference is a full-sequence forward with that distance per pair (tests/test_sinks.py). A
model without a rotary embedding gets the mask alone (its positions are in the hidden states)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from surgeon.methods.attention._attend import Attend
from surgeon.methods.attention._seam import MASK, AttentionCall, Modifier, PairScores, Rotation, rotary_of
from surgeon.methods.base import MethodParams, Target, register


class SinksParams(MethodParams):
    tokens: int = Field(4, ge=1, description="the first tokens every query keeps seeing (the sinks)")
    window: int = Field(1020, ge=1, description="the recent keys each query sees, itself included")


class SinksModifier(Modifier):
    stage = MASK

    def __init__(self, tokens: int, window: int, rotation: Rotation | None) -> None:
        super().__init__()
        self.tokens, self.window, self.rotation = tokens, window, rotation

    def modify(self, call: AttentionCall) -> None:
        keys, queries = call.key_positions, call.query_positions
        sink = keys < self.tokens
        call.allow(sink[None, :] | (keys[None, :] > queries[:, None] - self.window))
        shift = (self.tokens + self.window - 1 - queries).clamp(max=0)  # the query's slot minus its position
        if self.rotation is not None and bool(shift.any()):
            call.pairs = PairScores(self.rotation, shift, torch.zeros_like(keys),
                                    sink[None, :].expand(queries.numel(), -1))

    def cache_bounds(self) -> tuple[int, int]:
        return self.tokens, self.window


@register
class Sinks(Attend):
    name = "sinks"
    Params = SinksParams
    modifier_type = SinksModifier
    refuses_stack = {"rerope": "both set the distance each pair sees: ReRoPE's cap and the sinks' shift cannot "
                               "both hold for one pair"}
    summary = "attention sinks (StreamingLLM): the first tokens plus a recent window; generate in flat memory"
    unmergeable_because = "sinks are how attention reads the keys, which no weight holds"

    @classmethod
    def describe(cls, target: Target, params: MethodParams) -> str:
        assert isinstance(params, SinksParams)
        return (f"attention: {params.tokens} sink tokens + a window of {params.window}; KV cache bounded at "
                f"{params.tokens + params.window} entries (when every attention layer has it)")

    @classmethod
    def modifier(cls, model: nn.Module, inner: nn.Module, target: Target, params: MethodParams) -> Modifier:
        assert isinstance(params, SinksParams)
        rotary = rotary_of(model)
        return SinksModifier(params.tokens, params.window, Rotation(rotary) if rotary is not None else None)
