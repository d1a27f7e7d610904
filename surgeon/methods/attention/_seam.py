"""The composing attention seam: one attention function per inner implementation, registered with
transformers' AttentionInterface as `surgeon_sdpa` / `surgeon_eager`, and an ordered list of
modifiers on each attention module that statements add to.

A call goes through the layer's modifiers in stage order, each changing an `AttentionCall`:

    KEYS     extra keys and values in front of the real ones (prefix tuning)
    QUERY    the queries scaled (log-n)
    MASK     which keys each query may see (a window, sinks), AND-ed into the model's mask
    BIAS     an additive bias on the scaled logits (ALiBi)
    PAIRS    per-pair positions: a second score with re-rotated queries/keys for selected pairs
             (ReRoPE, StreamingLLM's sink distances)
    GROUPS   the modifier computes the attention itself (S2-Attn in training)

then the seam computes: the model's own sdpa or eager function when nothing needs the scores
materialised (a mask and a bias become one additive mask), its own eager product when pairs do.
Positions are cache slots: queries at kv-q.., keys at 0..kv-1, unless a bounded cache layer
(`BoundedLayer`, the window and sinks statements' generate cache) says where its kept keys are.
Relative methods need nothing more: with left padding slots and position ids differ by a per-row
constant.

Model-wide, the seam gives every module that holds one of the model's configs (T5's stacks carry
their own) a copy with `_attn_implementation` switched, so a config another model shares is never
written, and puts the very objects back with its last modifier; a registered mask function goes
with each name (a custom name without one gets `attention_mask=None`: transformers PR #45811).
"""

from __future__ import annotations

import copy
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.methods.base import DropSwitch

NAME = "surgeon_"
INNERS = ("sdpa", "eager")
MODIFIERS_ATTR = "_surgeon_attention"  # on an attention module: its list of modifiers
SEAM_ATTR = "_surgeon_attention_seam"  # on the top-level model: its AttentionSeam
KEY_POSITIONS_ATTR = "_surgeon_key_positions"  # on an attention module: where its bounded cache's keys sit

KEYS, QUERY, MASK, BIAS, PAIRS, GROUPS = range(6)


@dataclass(eq=False)
class PairScores:
    """For the pairs `select` (q, kv) picks, the score of the query rotated by `query_shift` (q,)
    positions against the key rotated by `key_shift` (kv,), instead of the plain score."""

    rotation: Rotation
    query_shift: torch.Tensor
    key_shift: torch.Tensor
    select: torch.Tensor


@dataclass(eq=False)
class AttentionCall:
    module: nn.Module
    query: torch.Tensor  # (B, H, q, D)
    key: torch.Tensor  # (B, H_kv, extra + kv, D)
    value: torch.Tensor
    mask: torch.Tensor | None  # the model's, over the real keys: bool (sdpa) or additive (eager)
    kwargs: dict[str, Any]
    inner: str
    query_positions: torch.Tensor  # (q,) slots
    key_positions: torch.Tensor  # (kv,) slots of the real keys
    evicted: bool = False  # the cache dropped keys: the model's mask does not index them
    extra: int = 0  # key columns in front of the real keys, visible to every query, unpositioned
    allowed: torch.Tensor | None = None  # bool (q, kv), AND-ed into the mask
    bias: torch.Tensor | None = None  # float (1 or H, q, kv), added to the scaled logits
    pairs: PairScores | None = None

    def allow(self, allowed: torch.Tensor) -> None:
        self.allowed = allowed if self.allowed is None else self.allowed & allowed

    def add_bias(self, bias: torch.Tensor) -> None:
        self.bias = bias if self.bias is None else self.bias + bias

    @property
    def causal(self) -> bool:
        given = self.kwargs.get("is_causal")
        return bool(getattr(self.module, "is_causal", False) if given is None else given)


class Modifier(ABC):
    """One statement's change to one layer's attention."""

    stage: ClassVar[int]

    def __init__(self) -> None:
        self.switch = DropSwitch()  # off: the layer computes as without it (job.activate, AdapterDrop)

    @abstractmethod
    def modify(self, call: AttentionCall) -> None:
        """Change the call (see the stages above)."""

    def attend(self, call: AttentionCall, inner: Callable[..., Any]) -> tuple[torch.Tensor, Any] | None:
        """GROUPS: compute the attention output (B, q, H, D) instead of the seam, or None to let it."""
        return None

    def cache_bounds(self) -> tuple[int, int] | None:
        """(sinks, window) of the keys a generate cache needs to keep for this layer, or None: all."""
        return None


class Rotation:
    """Rotates post-RoPE queries or keys by further positions with the model's rotary module as it is
    at call time (a `scale rope` before or after composes), half-split as Llama and GPT-NeoX rotate."""

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary
        self.last: tuple[Any, tuple[torch.Tensor, torch.Tensor]] | None = None  # every layer of a step shifts alike

    def _cos_sin(self, shift: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.rotary.inv_freq
        # keyed by the shift's values: read on the CPU only (on a GPU .tolist() would wait for the device)
        small = shift.device.type == "cpu" and shift.numel() <= 64
        key = (shift.tolist(), dtype, inv_freq.data_ptr(), inv_freq._version) if small else None
        if key is not None and self.last is not None and self.last[0] == key:
            return self.last[1]
        angles = shift.float()[:, None] * inv_freq.float()[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        cos_sin = emb.cos().to(dtype), emb.sin().to(dtype)
        if key is not None:
            self.last = (key, cos_sin)
        return cos_sin

    def __call__(self, states: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """`states` (B, H, n, D) rotated by `shift` (n,) positions (a pure rotation: the rotary's
        attention scaling is in the states already)."""
        cos, sin = self._cos_sin(shift, states.dtype)
        dim = cos.shape[-1]
        rotated, rest = states[..., :dim], states[..., dim:]
        half = dim // 2
        turned = torch.cat([-rotated[..., half:], rotated[..., :half]], dim=-1)
        return torch.cat([rotated * cos + turned * sin, rest], dim=-1)


def rotary_of(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")
                 and isinstance(getattr(m, "inv_freq", None), torch.Tensor)), None)


# ---------------------------------------------------------------------------------------------
# The registered function


def _eager_of(module: nn.Module) -> Callable[..., Any]:
    """The model's own eager attention (not in the registry: `get_interface` falls back to it)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def inner_function(module: nn.Module, inner: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return _eager_of(module) if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]


def _slots(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    given = module.__dict__.pop(KEY_POSITIONS_ATTR, None)
    if given is not None and given.numel() == key.shape[2]:
        positions = given.to(query.device)
        return positions[-query.shape[2]:], positions, bool(positions[-1] + 1 != positions.numel())
    kv = key.shape[2]
    keys = torch.arange(kv, device=query.device)
    return keys[kv - query.shape[2]:], keys, False


def _attention(inner: str) -> Callable[..., Any]:
    def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        function = inner_function(module, inner)
        modifiers = [m for m in module.__dict__.get(MODIFIERS_ATTR, ()) if not m.switch.off]
        if not modifiers:
            module.__dict__.pop(KEY_POSITIONS_ATTR, None)
            return function(module, query, key, value, attention_mask, *args, **kwargs)
        q_pos, k_pos, evicted = _slots(module, query, key)
        call = AttentionCall(module, query, key, value, attention_mask, kwargs, inner, q_pos, k_pos, evicted)
        for modifier in sorted(modifiers, key=lambda m: m.stage):
            modifier.modify(call)
            out = modifier.attend(call, function)
            if out is not None:
                return out
        return _compute(call, function, *args)

    return attend


def _visible(call: AttentionCall) -> torch.Tensor | None:
    """Which real keys each query sees, (B or 1, 1, q, kv) bool, or None for every key (no mask)."""
    mask = call.mask
    if call.evicted:
        _refuse_padding(call)
        mask = None
    if mask is not None:
        visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    elif call.causal and (call.query.shape[2] > 1 or call.evicted or call.allowed is not None):
        visible = (call.key_positions[None, :] <= call.query_positions[:, None])[None, None]
    else:
        visible = None
    if call.allowed is not None:
        visible = call.allowed[None, None] if visible is None else visible & call.allowed
    if visible is not None and call.query.shape[2] == 1 and bool(visible.all()):
        return None  # a decode step that sees every key it was handed: the kernel's unmasked path
    return visible


def _refuse_padding(call: AttentionCall) -> None:
    """After eviction the model's mask indexes keys the cache no longer holds; padding cannot be read
    off it, so a padded batch is refused rather than attended wrongly."""
    mask, stored = call.mask, call.key.shape[2] - call.extra - call.query.shape[2]
    if mask is None or stored <= 0:
        return
    part = mask[..., :stored]
    visible = part if part.dtype == torch.bool else part > torch.finfo(part.dtype).min / 2
    if not bool(visible.all()):
        raise SurgeonError("a bounded KV cache (attend window / attend sinks) decodes unpadded rows once it has "
                           "dropped keys: generate each padded row alone, or with equal-length prompts")


def _with_extra(tensor: torch.Tensor, extra: int, value: Any) -> torch.Tensor:
    if not extra:
        return tensor
    pad = torch.full((*tensor.shape[:-1], extra), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=-1)


def _compute(call: AttentionCall, function: Callable[..., Any], *args: Any) -> Any:
    if call.pairs is not None and call.query.shape[2] == 1:
        _rotate_selected_keys(call)  # one query: its pairs are columns, and the model's own kernel runs
    visible = _visible(call)
    dtype = call.query.dtype
    if call.pairs is not None:
        return _pairwise(call, visible)
    kwargs = dict(call.kwargs)
    if call.bias is None and call.allowed is None and not call.evicted and call.mask is not None:
        # only extra keys: the model's mask as it is, padded with "attend" in its own form
        mask = _with_extra(call.mask, call.extra, True if call.mask.dtype == torch.bool else 0.0)
    elif call.bias is None:
        mask = None if visible is None else _with_extra(visible, call.extra, True)
        if mask is not None and call.inner == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    else:
        mask = _additive(call, visible)
    if mask is not None:
        kwargs.pop("is_causal", None)  # the mask says it
    return function(call.module, call.query, call.key, call.value, mask, *args, **kwargs)


def _additive(call: AttentionCall, visible: torch.Tensor | None) -> torch.Tensor:
    """(B or 1, H or 1, q, extra + kv) float: the bias where visible, the dtype's minimum elsewhere."""
    dtype = call.query.dtype
    bias = torch.zeros((1, 1, 1, 1), dtype=dtype, device=call.query.device) if call.bias is None \
        else call.bias.to(dtype)[None]
    if visible is not None:
        bias = bias.masked_fill(~visible, torch.finfo(dtype).min)
    shape = torch.broadcast_shapes(bias.shape, (1, 1, call.query.shape[2], call.key.shape[2] - call.extra))
    return _with_extra(bias.expand(shape), call.extra, 0.0)


def _rotate_selected_keys(call: AttentionCall) -> None:
    """For a single query, (R_a q).(R_b k) = q.(R_(b-a) k): the selected keys rotate instead, so the
    second score needs no score matrix of its own (decode steps of sinks and ReRoPE)."""
    pairs = call.pairs
    assert pairs is not None
    columns = pairs.select[0]
    if bool(columns.any()):
        real = call.key[:, :, call.extra:]
        turned = pairs.rotation(real[:, :, columns], pairs.key_shift[columns] - pairs.query_shift[0])
        real = real.clone()
        real[:, :, columns] = turned
        call.key = torch.cat([call.key[:, :, :call.extra], real], dim=2)
    call.pairs = None


def _repeat(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _pairwise(call: AttentionCall, visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with per-pair scores: softmax(scale * where(select, q2.k2, q.k) + mask) v."""
    module, query, pairs = call.module, call.query, call.pairs
    assert pairs is not None
    groups = query.shape[1] // call.key.shape[1]
    key, value = _repeat(call.key, groups), _repeat(call.value, groups)
    scaling = call.kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    real = key[:, :, call.extra:]
    second = torch.matmul(pairs.rotation(query, pairs.query_shift),
                          pairs.rotation(real, pairs.key_shift).transpose(2, 3)) * scaling
    real_scores = torch.where(pairs.select, second, scores[..., call.extra:])
    scores = torch.cat([scores[..., :call.extra], real_scores], dim=-1)
    scores = scores + _additive(call, visible)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    dropout = call.kwargs.get("dropout", 0.0)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def register_functions() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for inner in INNERS:
        if NAME + inner not in AttentionInterface._global_mapping:
            AttentionInterface.register(NAME + inner, _attention(inner))
            AttentionMaskInterface.register(NAME + inner, ALL_MASK_ATTENTION_FUNCTIONS[inner])


# ---------------------------------------------------------------------------------------------
# Model-wide: the config switch, shared by every modifier on the model


def inner_name(config: Any) -> str:
    inner = config._attn_implementation or "eager"
    return inner[len(NAME):] if inner.startswith(NAME) else inner


def configs_of(model: nn.Module) -> list[Any]:
    """Every distinct config object of the model (T5's stacks carry their own copies)."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            found.setdefault(id(config), config)
    return list(found.values())


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call transformers' attention interface."""
    return [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "config")]


@dataclass(eq=False)
class AttentionSeam:
    model: nn.Module
    saved: list[tuple[Any, Any]] = field(default_factory=list)
    count: int = 0
    bounds: dict[int, tuple[int, int, nn.Module]] = field(default_factory=dict)  # layer -> bounded cache
    handle: Any = None

    @classmethod
    def of(cls, model: nn.Module) -> AttentionSeam:
        """The model's seam, put on it (configs switched) by its first modifier."""
        seam = model.__dict__.get(SEAM_ATTR)
        if isinstance(seam, cls) and seam.model is model:
            return seam
        register_functions()
        saved = []
        for config in configs_of(model):
            inner = inner_name(config)
            if inner not in INNERS:
                raise SurgeonError(f"this rewrite of attention runs on the 'sdpa' or 'eager' attention, not '{inner}'; "
                                   "load the model with attn_implementation='sdpa'")
            saved.append((config, copy.deepcopy(config)))
        for config, switched in saved:  # a copy: another model may share the config object
            switched._attn_implementation = NAME + inner_name(config)
            for module in model.modules():
                if module.__dict__.get("config") is config:
                    module.config = switched
        seam = cls(model=model, saved=saved)
        seam.handle = model.register_forward_pre_hook(seam._bound_cache, with_kwargs=True)
        model.__dict__[SEAM_ATTR] = seam
        return seam

    def _bound_cache(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.bounds:
            from surgeon.methods.attention._cache import bound_cache

            for name in ("cache", "past_key_values"):
                bound_cache(kwargs.get(name), self.bounds)

    def _find_bounds(self) -> None:
        """Every attention layer's cache bounds, when all of them have the same (see _cache.py)."""
        found: dict[int, tuple[int, int, nn.Module]] = {}
        for module in attention_modules(self.model):
            asked = {b for m in modifiers_of(module) if (b := m.cache_bounds()) is not None}
            index = getattr(module, "layer_idx", None)
            if len(asked) != 1 or not isinstance(index, int):
                found = {}
                break
            found[index] = (*asked.pop(), module)
        self.bounds = found if len({b[:2] for b in found.values()}) == 1 else {}

    def add(self, module: nn.Module, modifier: Modifier) -> None:
        module.__dict__.setdefault(MODIFIERS_ATTR, []).append(modifier)
        self.count += 1
        self._find_bounds()

    def remove(self, module: nn.Module, modifier: Modifier) -> None:
        modifiers = module.__dict__.get(MODIFIERS_ATTR, [])
        if modifier in modifiers:
            modifiers.remove(modifier)
            self.count -= 1
        if not modifiers:
            module.__dict__.pop(MODIFIERS_ATTR, None)
        self._find_bounds()
        if self.count <= 0:
            self.release()

    def release(self) -> None:
        for config, switched in self.saved:
            for module in self.model.modules():
                if module.__dict__.get("config") is switched:
                    module.config = config
        self.saved = []
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.model.__dict__.get(SEAM_ATTR) is self:
            del self.model.__dict__[SEAM_ATTR]


def modifiers_of(module: nn.Module) -> list[Modifier]:
    return list(module.__dict__.get(MODIFIERS_ATTR, ()))
