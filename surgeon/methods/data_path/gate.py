"""UniPELT's gates (Mao et al. 2022), as AdapterHub `adapters` 1.3 computes them (UniPELTConfig,
`use_gating=True`; ../shared/notes/adapters.md): each named sub-module's contribution scaled by a
learned gate of its own input,

    g(x) = mean over the sequence of sigmoid(W x + b)      (padded tokens included, as the library)

    inject prefix tokens=10 projection=512 width=hidden positions=adapterhub into *.attn as prefix
    inject adapter config=pfeiffer reduction=16 as adapter
    inject lora r=8 alpha=2 into *.attn.<q,v> as lora
    gate <lora,prefix,adapter>                                # specs/unipelt.peft

- LoRA: delta = B A x * g(x), x the layer's input; the gate replaces alpha/r. On a fused q/k/v
  projection (GPT-2's c_attn), one gate output per adapted slice.
- bottleneck adapter: A(z) * g(z), z the adapter's input, before its residual.
- prefix: the prefix keys and values times g(x), x the attention block's input (the normalised
  hidden states on pre-norm models).

A gate belongs to the adapter it gates: its tensors are named under that adapter's name, and it
is switched with it. It is a child module (`gate`, or `prefix_gate` on the attention module) of
what it gates, which reads it there (`methods/base.py: gate_of`). W starts N(0, 0.02), b at zero.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import PlanError, SurgeryError
from surgeon.graph import wrapped
from surgeon.methods._rng import draw
from surgeon.methods.base import GATE, ApplyContext, Method, MethodParams, Patch, Target, WordArgs, WordError, register
from surgeon.spec import Word

PREFIX_GATE = "prefix_gate"
_GATED = ("inject lora", "inject adapter", "inject prefix")


class GateParams(MethodParams):
    adapters: list[str] = Field(description="the named adapters gated (from the words: gate <a,b>)")


class Gate(nn.Linear):
    """g(x) = mean over dim 1 (the sequence) of sigmoid(W x + b): (batch, outputs)."""

    def __init__(self, width: int, outputs: int, like: torch.Tensor) -> None:
        super().__init__(width, outputs, device=like.device, dtype=like.dtype)
        self.active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(super().forward(x)).mean(dim=1)

    def initialise(self, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            draw(self.weight, nn.init.normal_, generator, std=0.02)
            self.bias.zero_()


def _what(target: Target) -> str:
    """Which kind of adapter sits at a gated target: 'lora', 'bottleneck' or 'prefix'."""
    if target.kind in ("linear", "conv1d"):
        return "lora"
    if target.preposition in ("after", "beside") or target.role not in ("attn", "cross_attn"):
        return "bottleneck"
    return "prefix"


def _bottleneck_site(target: Target) -> str:
    site = "adapter" if target.preposition in ("after", "beside") else "adapter_output"
    return f"{site}[{target.label}]"


class GatePatch(Patch):
    def __init__(self, owner: nn.Module, child: str, gate: Gate, local: str) -> None:
        self.owner, self.child, self.gate, self.local = owner, child, gate, local
        self.handle: Any = None
        self.layer: Any = None
        if child in owner._modules:
            raise SurgeryError(f"{type(owner).__name__} already has a gate")
        owner.add_module(child, gate)

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{self.local}{self.child}.{name}": param for name, param in self.gate.named_parameters()}

    def set_active(self, active: bool) -> None:
        self.gate.active = active

    def revert(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        if self.layer is not None:
            self.layer.gate, self.layer.gate_input = None, None
        self.owner._modules.pop(self.child, None)


@register
class GateMethod(Method):
    verb = "gate"
    name = "gate"  # registered under its verb: `gate <lora,prefix,adapter>`
    Params = GateParams
    prepositions = frozenset()
    kinds = frozenset({"linear", "conv1d", "container"})
    stacks_on = frozenset({"lora", "adapter", "prefix"})
    unmergeable_because = "a gate depends on each input (UniPELT), which no weight matrix holds"
    summary = "UniPELT: each named LoRA, bottleneck adapter or prefix scaled by a learned gate of its input"
    _form = "gate <NAME,NAME,...>"

    @classmethod
    def read_words(cls, words: tuple[Word, ...]) -> WordArgs:
        if len(words) != 1 or not (words[0].text.startswith("<") and words[0].text.endswith(">")) or words[0].quoted:
            if not words:
                raise PlanError(f"gate names the adapters it gates: {cls._form}")
            raise WordError("gate takes a list of adapter names", words[0], cls._form)
        names = [name.strip() for name in words[0].text[1:-1].split(",")]
        if not all(names):
            raise WordError("an empty adapter name", words[0], cls._form)
        return WordArgs(params={"adapters": names}, adapters=[words[0].model_copy(update={"text": n}) for n in names])

    @classmethod
    def place_over(cls, named: dict[str, list[tuple[Target, str, dict[str, Any]]]],
                   params: MethodParams) -> list[Target]:
        targets = []
        for name, rewrites in named.items():
            for target, method, adapter in rewrites:
                if method not in _GATED:
                    raise PlanError(f"'{name}' is '{method}': gate scales LoRA, bottleneck adapters and prefixes "
                                    "(inject lora, inject adapter, inject prefix)")
                if method == "inject adapter" and adapter.get("config") == "houlsby" \
                        and target.preposition not in ("after", "beside"):
                    raise PlanError(f"'{name}' is 'inject adapter config=houlsby': its two adapters per layer take "
                                    "one gate each in no library; gate pfeiffer or parallel adapters, or name each "
                                    "place (after *.attn, after *.mlp)")
                targets.append(target)  # the gate is the adapter's: it keeps its name
        return targets

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        return None if target.hidden_size or _what(target) == "lora" else f"{target.path}: no hidden_size in the config"

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        kind = _what(target)
        if kind == "lora":
            outputs, width, local = max(1, len(target.slices)), target.in_features or 0, f"{GATE}."
        elif kind == "bottleneck":
            outputs, width, local = 1, target.hidden_size or 0, f"{_bottleneck_site(target)}.{GATE}."
        else:
            outputs, width, local = 1, target.hidden_size or 0, f"{PREFIX_GATE}."
        return {f"{local}weight": (outputs, width), f"{local}bias": (outputs,)}

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        module = model.get_submodule(target.path)
        shapes = cls.added_shapes(target, params)
        outputs, width = shapes[next(iter(shapes))]
        kind = _what(target)
        if kind == "lora":
            owner, child, local = _lora_wrapper(module, target), GATE, ""
        elif kind == "bottleneck":
            site = _bottleneck_site(target)
            owner = module._modules.get(site)
            if owner is None:
                raise SurgeryError(f"{target.path} holds no adapter '{target.label}' to gate")
            child, local = GATE, f"{site}."
        else:
            owner, child, local = module, PREFIX_GATE, ""
        like = next(p for p in owner.parameters() if p.is_floating_point())
        gate = Gate(width, outputs, like)
        if ctx.init:
            gate.initialise(ctx.generator)
        patch = GatePatch(owner, child, gate, local)
        if kind == "prefix":
            _gate_prefix(patch, module, gate)
        return patch


def _lora_wrapper(module: nn.Module, target: Target) -> nn.Module:
    """The LoRA wrapper of the target's adapter, in the chain of wrappers on the module."""
    current: nn.Module | None = module
    while current is not None:
        if getattr(current, "label", None) == target.label and any(n.startswith("lora_A") for n in current._parameters):
            return current
        current = wrapped(current)
    raise SurgeryError(f"{target.path} holds no LoRA '{target.label}' to gate")


def _gate_prefix(patch: GatePatch, attention: nn.Module, gate: Gate) -> None:
    """The prefix of the attention block scaled by the gate of the block's input hidden states."""
    from surgeon.methods.attention._attend import inner_attention
    from surgeon.methods.attention.prefix import _LAYER_ATTR

    layer = inner_attention(attention).__dict__.get(_LAYER_ATTR)
    if layer is None:
        raise SurgeryError("the attention block holds no prefix to gate")
    layer.gate = gate

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        layer.gate_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    patch.handle = attention.register_forward_pre_hook(keep, with_kwargs=True)
    patch.layer = layer
