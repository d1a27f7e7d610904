"""Sliding-window attention: `attend window size=4096 [in PATTERN]`. Each query sees the last `size`
keys, itself included (transformers' convention: `kv > q - size`, Mistral's `sliding_window`), and
`generate` keeps at most `size - 1` keys per layer when every attention layer has the window. On a
Llama this is `MistralForCausalLM(sliding_window=size)` with the same weights (the tests compare)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from surgeon.methods.attention._attend import Attend
from surgeon.methods.attention._seam import MASK, AttentionCall, Modifier
from surgeon.methods.base import MethodParams, Target, register


class WindowParams(MethodParams):
    size: int = Field(..., ge=1, description="keys each query sees, itself included")


class WindowModifier(Modifier):
    stage = MASK

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def modify(self, call: AttentionCall) -> None:
        call.allow(call.key_positions[None, :] > call.query_positions[:, None] - self.size)

    def cache_bounds(self) -> tuple[int, int]:
        return 0, self.size


@register
class Window(Attend):
    name = "window"
    Params = WindowParams
    modifier_type = WindowModifier
    summary = "sliding-window attention: each query sees the last size keys; generate keeps size - 1"
    unmergeable_because = "a window is how attention reads the keys, which no weight holds"

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        assert isinstance(params, WindowParams)
        if target.max_positions and params.size > target.max_positions:
            return (f"a window of {params.size} keys is longer than the {target.max_positions} positions the model "
                    f"was trained on (max_position_embeddings): a window is at most that")
        return super().check(target, params)

    @classmethod
    def describe(cls, target: Target, params: MethodParams) -> str:
        assert isinstance(params, WindowParams)
        return (f"attention: a window of {params.size} keys; KV cache bounded at {params.size} entries "
                "(when every attention layer has it)")

    @classmethod
    def modifier(cls, model: nn.Module, inner: nn.Module, target: Target, params: MethodParams) -> Modifier:
        assert isinstance(params, WindowParams)
        return WindowModifier(params.size)
