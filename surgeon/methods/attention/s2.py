"""Shifted sparse attention, S2-Attn (LongLoRA, Chen et al. 2024): `attend s2 group=0.25`. In
training, the sequence of N tokens is cut into groups of G = N * group tokens and each query attends
causally within its group; half the heads see the groups shifted by G/2, so information flows
between neighbouring groups. In eval the layer attends fully, as LongLoRA's inference does (its
issues #14 and #120). It is the paper's and the repository's `forward_noflashattn`
(dvlab-research/LongLoRA at d4eb344, llama_attn_replace.py L225-340): the second half of the heads
rolled by -G//2 along the sequence, attention inside each group, rolled back by G//2. (The roll
wraps the last group around, so the shifted heads' last group mixes the sequence's end with its
start; the authors call it harmless: their issues #15 and #90.) Costs N*G scores instead of N^2."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.methods.attention._attend import Attend
from surgeon.methods.attention._seam import GROUPS, AttentionCall, Modifier
from surgeon.methods.base import MethodParams, Target, register


class S2Params(MethodParams):
    group: float = Field(0.25, gt=0, le=1, description="the group's share of the sequence (LongLoRA's "
                         "group_size_ratio, 1/4)")


def _shift(states: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H, N, D) -> (B * N/G, H, G, D), the second half of the heads rolled by -G//2 first."""
    batch, heads, length, dim = states.shape
    half = heads // 2
    rolled = torch.cat([states[:, :half], states[:, half:].roll(-group // 2, dims=2)], dim=1)
    return rolled.transpose(1, 2).reshape(batch * (length // group), group, heads, dim).transpose(1, 2)


class S2Modifier(Modifier):
    stage = GROUPS

    def __init__(self, group: float) -> None:
        super().__init__()
        self.group = group

    def modify(self, call: AttentionCall) -> None:
        """Nothing to change: S2 computes in `attend`."""

    def attend(self, call: AttentionCall, inner: Callable[..., Any]) -> tuple[torch.Tensor, None] | None:
        if not call.module.training:
            return None
        if call.extra or call.bias is not None or call.allowed is not None or call.pairs is not None:
            raise SurgeonError("attend s2 computes attention inside groups in training, and cannot take extra keys, "
                               "a bias, a mask or per-pair positions of another statement there")
        batch, heads, length, dim = call.query.shape
        group = int(length * self.group)
        if group < 1 or length % group or call.key.shape[2] != length:
            raise SurgeonError(f"attend s2 group={self.group:g}: a training sequence of {length} tokens does not "
                               f"split into groups of {max(group, 1)} (int({length} * {self.group:g})); pad or cut "
                               "the batch to a length the groups divide, and train without a cache")
        _refuse_padding(call.mask, length)
        repeat = heads // call.key.shape[1]
        key, value = (s.repeat_interleave(repeat, dim=1) if repeat > 1 else s for s in (call.key, call.value))
        scaling = call.kwargs.get("scaling") or dim ** -0.5
        dropout = call.kwargs.get("dropout", 0.0)
        out = nn.functional.scaled_dot_product_attention(
            _shift(call.query, group), _shift(key, group), _shift(value, group), is_causal=True,
            dropout_p=dropout, scale=scaling)
        out = out.transpose(1, 2).reshape(batch, length, heads, dim)
        half = heads // 2
        return torch.cat([out[:, :, :half], out[:, :, half:].roll(group // 2, dims=1)], dim=2), None


def _refuse_padding(mask: torch.Tensor | None, length: int) -> None:
    if mask is None:
        return
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if not bool((visible[..., -length:] == causal).all()):
        raise SurgeonError("attend s2 trains on unpadded sequences (LongLoRA trains on full-length ones): pack the "
                           "batch, or give every row the same length")


@register
class S2(Attend):
    name = "s2"
    Params = S2Params
    modifier_type = S2Modifier
    mergeable = True  # training only: a merged model attends fully, as LongLoRA's inference does
    summary = "S2-Attn (LongLoRA): shifted group attention in training, full attention in eval"
    refuses_stack = {name: f"S2-Attn computes attention inside groups in training, without the {what}"
                     for name, what in (("prefix", "prefix's extra keys"), ("alibi", "bias"), ("window", "window mask"),
                                        ("sinks", "sinks' mask"), ("rerope", "per-pair positions"))}

    @classmethod
    def describe(cls, target: Target, params: MethodParams) -> str:
        assert isinstance(params, S2Params)
        return f"attention: shifted groups of {params.group:g} of the sequence in training (full attention in eval)"

    @classmethod
    def modifier(cls, model: nn.Module, inner: nn.Module, target: Target, params: MethodParams) -> Modifier:
        assert isinstance(params, S2Params)
        return S2Modifier(params.group)
