"""Log-n attention scaling (Su 2021, "entropy invariance"; Qwen-1's `use_logn_attn`):
`attend logn [train_len=N]`. The query at 1-based position n is scaled by `log_m n` where n > m,
the trained length (default: the model's max_position_embeddings), so attention entropy stays
level past it; positions up to m are untouched, bit for bit. Qwen-1 applies it at inference only;
here it applies in training too (the blog's form), so a model trained long with it sees the same."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import PlanError
from surgeon.methods.attention._attend import Attend
from surgeon.methods.attention._seam import QUERY, AttentionCall, Modifier
from surgeon.methods.base import MethodParams, Target, register


class LognParams(MethodParams):
    train_len: int | None = Field(None, ge=2, description="the trained context length m (default: the model's "
                                  "max_position_embeddings)")


class LognModifier(Modifier):
    stage = QUERY

    def __init__(self, trained: int) -> None:
        super().__init__()
        self.trained = trained

    def modify(self, call: AttentionCall) -> None:
        given = call.kwargs.get("position_ids")
        positions = given if isinstance(given, torch.Tensor) and given.shape[-1] == call.query.shape[2] \
            else call.query_positions[None]
        counts = positions.double() + 1  # Qwen's 1-based i
        if not bool((counts > self.trained).any()):
            return
        scale = torch.where(counts > self.trained, counts.log() / math.log(self.trained), torch.ones_like(counts))
        call.query = call.query * scale.to(call.query.dtype)[:, None, :, None]


@register
class Logn(Attend):
    name = "logn"
    Params = LognParams
    modifier_type = LognModifier
    mergeable = False
    summary = "log-n scaling: queries past the trained length scaled by log_m n"
    unmergeable_because = "log-n scales the queries by their position, which no weight holds"

    @classmethod
    def describe(cls, target: Target, params: MethodParams) -> str:
        assert isinstance(params, LognParams)
        trained = params.train_len or target.max_positions
        return f"attention: queries past position {trained} scaled by log_{trained}(n)"

    @classmethod
    def modifier(cls, model: nn.Module, inner: nn.Module, target: Target, params: MethodParams) -> Modifier:
        assert isinstance(params, LognParams)
        trained = params.train_len or target.max_positions
        if not trained or trained < 2:
            raise PlanError("attend logn: the model's config gives no max_position_embeddings; write train_len=N")
        return LognModifier(trained)
