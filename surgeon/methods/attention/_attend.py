"""What the `attend ...` statements share: they target self-attention modules (the whole model
without a clause, `in PATTERN` for some layers), add one modifier to each on the attention seam,
and take it off on revert. Each method file says only its parameters and its modifier."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from torch import nn

from surgeon.errors import PlanError
from surgeon.methods.attention._seam import AttentionSeam, Modifier, attention_modules, modifiers_of
from surgeon.methods.base import ApplyContext, Method, MethodParams, Patch, Target


def inner_attention(module: nn.Module) -> nn.Module:
    """The module that calls transformers' attention interface: the target or its attention child."""
    found = attention_modules(module)
    if not found:
        raise PlanError(f"{type(module).__name__} has no attention module that calls transformers' attention "
                        "interface, which the attention seam changes")
    return found[0]


class ModifierPatch(Patch):
    """One modifier on one attention module; `extra` undoes what the statement changed beside it."""

    def __init__(self, seam: AttentionSeam, module: nn.Module, modifier: Modifier, mergeable: bool) -> None:
        self.seam, self.module, self.modifier = seam, module, modifier
        self.mergeable = mergeable  # S2-Attn: training only, so a merged model attends fully, as LongLoRA's does
        seam.add(module, modifier)

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def merge(self) -> None:
        """Nothing to fold into the weights (only a training-time change is mergeable)."""

    def set_active(self, active: bool) -> None:
        self.modifier.switch.inactive = not active

    def revert(self) -> None:
        self.seam.remove(self.module, self.modifier)


# The order the attend statements stack in on one module (each stacks on those before it; the seam's
# stages, not this order, decide what runs first): a canonical order keeps the rewrite graph acyclic
STACK_ORDER = ("prefix", "logn", "window", "sinks", "alibi", "rerope", "s2")


class Attend(Method):
    """Base of the attend statements."""

    verb = "attend"
    prepositions = frozenset({"in"})
    kinds = frozenset({"container"})
    default_target = "**"
    modifier_type: ClassVar[type[Modifier]]
    patch_type: ClassVar[type[ModifierPatch]] = ModifierPatch

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name") in STACK_ORDER:
            cls.stacks_on = frozenset(STACK_ORDER[:STACK_ORDER.index(cls.name)])

    @classmethod
    def keeps(cls, target: Target, params: MethodParams) -> bool:
        return target.role == "attn"

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        if target.role != "attn":
            return f"{target.path} is not a self-attention module; attend {cls.name} changes self-attention (*.attn)"
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        return {}

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        inner = inner_attention(model.get_submodule(target.path))
        if any(isinstance(m, cls.modifier_type) for m in modifiers_of(inner)):
            raise PlanError(f"{target.path} already has attend {cls.name}")
        modifier = cls.modifier(model, inner, target, params)
        return cls.patch_type(AttentionSeam.of(model), inner, modifier, cls.mergeable)

    @classmethod
    @abstractmethod
    def modifier(cls, model: nn.Module, inner: nn.Module, target: Target, params: MethodParams) -> Modifier:
        """The layer's modifier (checks needing the live model raise PlanError here)."""


def every_layer_has(model: nn.Module, kind: type[Modifier]) -> list[Modifier] | None:
    """The modifiers of `kind`, one per attention module, when every attention module has one."""
    found = []
    for module in attention_modules(model):
        mine = [m for m in modifiers_of(module) if isinstance(m, kind)]
        if not mine:
            return None
        found.extend(mine)
    return found
