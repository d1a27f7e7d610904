"""RoPE scaling, in place: `scale rope TYPE factor=F ...` gives a live model the rotary embedding a
model built with that `rope_parameters` has (../shared/notes/context-extension.md, section 1):

    scale rope linear factor=4          # position interpolation: inv_freq / 4
    scale rope ntk factor=4             # static NTK-aware: theta * 4^(d/(d-2)), transformers' default type
    scale rope dynamic factor=4         # dynamic NTK: theta grows with the sequence past the trained length
    scale rope yarn factor=4 [original=N] [beta_fast=32] [beta_slow=1] [attention_factor=x]
    scale rope llama3 factor=8 [low_freq_factor=1] [high_freq_factor=4] [original=N]
    scale rope longrope short_factor=[...] long_factor=[...] [original=N]

The rotary module's frequencies come from transformers' own `ROPE_INIT_FUNCTIONS` on a copy of the
model's config with the new parameters, so the logits equal a model built from that config (the
tests compare with exactly that). The copy replaces the config object on every module that held
the model's (the rotary module re-reads it during forward for dynamic and longrope, and a merged
checkpoint carries it); the original config, which another model may share, is never written.
`inv_freq` and `original_inv_freq` are registered as separate tensors (a dynamic reset can leave
them one object). Revert puts back the very buffers, the config objects and every attribute.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import PlanError
from surgeon.methods.base import ApplyContext, Method, MethodParams, Patch, Target, WordArgs, WordError, register
from surgeon.spec import Word

_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")


class RopeParams(MethodParams):
    type: Literal["linear", "ntk", "dynamic", "yarn", "llama3", "longrope"] = Field(
        description="the scaling (the word after 'scale rope')")
    factor: float | None = Field(None, ge=1, description="how many times the trained context (required but for "
                                 "longrope, which then takes max_position_embeddings / original)")
    original: int | None = Field(None, ge=1, description="the trained context length (default: the model's "
                                 "max_position_embeddings)")
    beta_fast: float | None = Field(None, gt=0, description="yarn: extrapolation boundary (32)")
    beta_slow: float | None = Field(None, gt=0, description="yarn: interpolation boundary (1)")
    attention_factor: float | None = Field(None, gt=0, description="yarn, longrope: scale of the attention "
                                           "logits' square root (default: computed from the factor)")
    low_freq_factor: float | None = Field(None, gt=0, description="llama3: low-frequency boundary (1)")
    high_freq_factor: float | None = Field(None, gt=0, description="llama3: high-frequency boundary (4)")
    short_factor: list[float] | None = Field(None, description="longrope: per-frequency factors within the original length")
    long_factor: list[float] | None = Field(None, description="longrope: per-frequency factors beyond it")


def rope_parameters(config: Any, params: RopeParams) -> dict[str, Any]:
    """The `rope_parameters` a model built for this statement has."""
    old = dict(config.rope_parameters or {})
    base = {k: old[k] for k in ("rope_theta", "partial_rotary_factor") if k in old}
    if params.type == "ntk":  # static NTK-aware: the default RoPE with a raised theta
        dim = _rotary_dim(config)
        return base | {"rope_type": "default", "rope_theta": base["rope_theta"] * params.factor ** (dim / (dim - 2))}
    new = base | {"rope_type": params.type}
    if params.factor is not None:
        new["factor"] = params.factor
    names = {"original": "original_max_position_embeddings", "beta_fast": "beta_fast", "beta_slow": "beta_slow",
             "attention_factor": "attention_factor", "low_freq_factor": "low_freq_factor",
             "high_freq_factor": "high_freq_factor", "short_factor": "short_factor", "long_factor": "long_factor"}
    for ours, theirs in names.items():
        if getattr(params, ours) is not None:
            new[theirs] = getattr(params, ours)
    if params.type in ("yarn", "llama3", "longrope"):
        new.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        if params.type == "llama3":
            new.setdefault("low_freq_factor", 1.0)
            new.setdefault("high_freq_factor", 4.0)
    return new


def _rotary_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * (config.rope_parameters or {}).get("partial_rotary_factor", 1.0))


def _rotary_module(model: nn.Module, target: Target) -> nn.Module:
    module = model.get_submodule(target.path)
    if not isinstance(getattr(module, "inv_freq", None), torch.Tensor) or not hasattr(module, "original_inv_freq"):
        raise PlanError(f"{target.path} is a {type(module).__name__} without inv_freq / original_inv_freq")
    return module


class RopePatch(Patch):
    """The rotary module's state and the model's config objects, put back on revert. Mergeable as
    it stands: the rotary module stays transformers' own class and the config says the new
    `rope_parameters`, so a merged checkpoint loads in stock transformers with them."""

    mergeable = True

    _ATTRS = ("rope_type", "attention_scaling", "max_seq_len_cached", "original_max_seq_len")

    def __init__(self, model: nn.Module, rotary: nn.Module, params: RopeParams) -> None:
        self.rotary = rotary
        old = rotary.config
        self.buffers = {name: rotary._buffers[name] for name in ("inv_freq", "original_inv_freq")}
        self.attrs = {name: rotary.__dict__[name] for name in self._ATTRS if name in rotary.__dict__}
        self.holders = [m for m in model.modules() if m.__dict__.get("config") is old]
        self.old_config = old
        config = copy.deepcopy(old)
        config.rope_parameters = rope_parameters(old, params)
        config.standardize_rope_params()
        self.config = config
        rope_type = config.rope_parameters["rope_type"]
        init = rotary.compute_default_rope_parameters if rope_type == "default" else _init_functions()[rope_type]
        inv_freq, scaling = init(config, device=rotary.inv_freq.device)
        inv_freq = inv_freq.to(rotary.inv_freq.dtype)
        for holder in self.holders:
            holder.config = config
        rotary.register_buffer("inv_freq", inv_freq.clone(), persistent=False)
        rotary.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        rotary.rope_type, rotary.attention_scaling = rope_type, scaling
        rotary.max_seq_len_cached = rotary.original_max_seq_len = config.max_position_embeddings

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def merge(self) -> None:
        """Nothing to fold: the model already is what a config with these rope_parameters builds."""

    def revert(self) -> None:
        for holder in self.holders:
            if holder.__dict__.get("config") is self.config:
                holder.config = self.old_config
        for name, buffer in self.buffers.items():
            self.rotary._buffers[name] = buffer
        for name in self._ATTRS:
            self.rotary.__dict__.pop(name, None)
        self.rotary.__dict__.update(self.attrs)
        self.rotary.__dict__.pop("long_inv_freq", None)  # longrope caches it as a plain attribute


def _init_functions() -> dict[str, Any]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS


@register
class ScaleRope(Method):
    verb = "scale"
    name = "rope"
    Params = RopeParams
    prepositions = frozenset({"in"})
    kinds = frozenset({"other"})
    default_target = "**"
    claims = frozenset({"rope"})
    mergeable = True
    absent = ("the model has no rotary position embedding (a *RotaryEmbedding with inv_freq): models with learned "
              "absolute positions (GPT-2's wpe, BERT's position_embeddings) or ALiBi (Bloom) have none to scale")
    summary = "RoPE scaling in place: linear (PI), ntk, dynamic, yarn, llama3, longrope, as transformers computes them"

    @classmethod
    def read_words(cls, words: tuple[Word, ...]) -> WordArgs:
        if len(words) != 1 or words[0].text not in _TYPES:
            where = words[0] if words else None
            hint = "types: " + ", ".join(_TYPES)
            if where is None:
                raise PlanError(f"scale rope needs a type ({hint}): scale rope linear factor=4")
            raise WordError(f"unknown RoPE scaling '{where.text}'", where, hint)
        return WordArgs(params={"type": words[0].text}, lenient=True)

    @classmethod
    def keeps(cls, target: Target, params: MethodParams) -> bool:
        return target.type_name.endswith("RotaryEmbedding")

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        assert isinstance(params, RopeParams)
        if params.type != "longrope" and params.factor is None:
            return f"scale rope {params.type} needs factor=... (how many times the trained context, at least 1)"
        if params.type == "longrope" and (params.short_factor is None or params.long_factor is None):
            return "scale rope longrope needs short_factor=[...] and long_factor=[...] (one per rotary frequency)"
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        return {}

    @classmethod
    def describe(cls, target: Target, params: MethodParams) -> str | None:
        assert isinstance(params, RopeParams)
        trained = params.original or target.max_positions
        factor = params.factor or (target.max_positions / trained if trained and target.max_positions else None)
        if not trained or not factor:
            return f"positions: {params.type} RoPE scaling"
        return f"positions: {trained} -> {int(trained * factor)} ({params.type} x{factor:g})"

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, RopeParams)
        rotary = _rotary_module(model, target)
        if rotary.config.rope_parameters.get("rope_type", "default") != "default":
            raise PlanError(f"{target.path} already uses {rotary.config.rope_parameters['rope_type']} RoPE scaling; "
                            "scale rope starts from the default rotary embedding")
        return RopePatch(model, rotary, params)
