"""AdapterDrop (Rücklé et al. 2021): the adapter-family modules of chosen layers do nothing.

    inject adapter config=pfeiffer
    drop adapters in layers.[0-3]             # those layers compute exactly what the base computes
    drop adapters rate=0.5 in layers.[0-5]    # in training, each forward drops them with probability 0.5

What is dropped: every module in the layer that carries a drop switch (`DropSwitch` in
methods/base.py), bottleneck adapters and a prefix on the layer's attention (MAM) alike, as
AdapterHub's `skip_layers` drops them all. Without `rate` they are off in training and inference
(the layers' outputs, and the gradients, are the base model's: the adapters get none).
With `rate=p`, each training forward of a layer drops its adapters with probability p, drawn from
torch's RNG as dropout is; in eval they always act. Revert (or reverting the adapters) takes it away.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import SurgeryError
from surgeon.methods.base import ApplyContext, DropSwitch, Method, MethodParams, Patch, Target, drop_switches, register


class DropParams(MethodParams):
    rate: float | None = Field(None, ge=0, le=1, description="drop probability per training forward "
                                                             "(none: always dropped, in training and inference)")


class DropPatch(Patch):
    def __init__(self, layer: nn.Module, switches: list[DropSwitch], rate: float | None) -> None:
        self.switches, self.rate, self.active = switches, rate, True
        self.handle = layer.register_forward_pre_hook(self._decide)

    def set_active(self, active: bool) -> None:
        self.active = active  # inactive: the layer's adapters act on every forward

    def _decide(self, layer: nn.Module, args: Any) -> None:
        dropped = self.active and (self.rate is None or (layer.training and bool(torch.rand(()) < self.rate)))
        for switch in self.switches:
            switch.dropped = dropped

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def revert(self) -> None:
        self.handle.remove()
        for switch in self.switches:
            switch.dropped = False


@register
class DropAdapters(Method):
    verb = "drop"
    name = "adapters"
    Params = DropParams
    prepositions = frozenset({"in"})
    kinds = frozenset({"container"})
    stacks_on = frozenset({"adapter"})
    unmergeable_because = "AdapterDrop switches adapters off and holds no weights"
    summary = "AdapterDrop: the adapters of chosen layers do nothing (or, with rate=p, now and then in training)"

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        return {}

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, DropParams)
        layer = model.get_submodule(target.path)
        switches = drop_switches(layer)
        if not switches:
            raise SurgeryError(f"{target.path} holds no adapter to drop: write 'inject adapter ...' (or 'inject "
                               "prefix ...') before 'drop adapters' (in this spec or an earlier one)")
        return DropPatch(layer, switches, params.rate)
