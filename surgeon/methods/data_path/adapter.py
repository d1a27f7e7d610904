"""Bottleneck adapters in each layer's data path (Houlsby et al. 2019; Pfeiffer et al. 2021; He et
al. 2022's parallel form), as AdapterHub `adapters` 1.3 computes them (../shared/notes/adapters.md):

    inject adapter config=pfeiffer              # seq_bn: after the FFN, reduction 16, relu
    inject adapter config=houlsby               # double_seq_bn: after attention and after the FFN, swish
    inject adapter config=parallel in layers.[6-11]   # par_bn: beside the FFN, reduction 2, scale 4

A(x) = up(act(down(x))), bottleneck m = size, or hidden // reduction (at least 1). Where it acts,
with h a sub-layer's output and r that sub-block's input (the residual stream):

| config | post-norm (BERT: y = LN(h + r)) | pre-norm (Llama, GPT-2, T5: y = r + h) |
|---|---|---|
| pfeiffer | z = LN(h + r); y = LN(A(z) + h + r) | z = r + h; y = A(z) + z |
| houlsby | at attention and FFN: y = LN(A(h) + h + r) | y = r + (A(h) + h) |
| parallel | y = LN(h + s A(r) + r) | y = r + (h + s A(r)); r before the FFN's norm |

The adapters are modules registered on the layer (`adapter_output`, `adapter_attention`, with
AdapterHub's own parameter names inside: `adapter_down.0`, `adapter_up`) and wired in with
forward hooks on the layer's own modules; no model code is copied and no class is swapped. Revert
removes the hooks and the modules. `init=zero` (the default) draws the down-projection as a
Linear layer does and zeroes the up-projection, so a fresh adapter is an exact identity; `bert` is
AdapterHub's default for pfeiffer and houlsby (N(0, 0.02) on both), `houlsby` a normal of std 1e-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgeon.methods._rng import draw
from surgeon.methods.base import DROP_SWITCH, ApplyContext, DropSwitch, Method, MethodParams, Patch, Target, register

_DEFAULTS = {  # config -> (reduction, activation, scale), AdapterHub's SeqBn/DoubleSeqBn/ParBn configs
    "pfeiffer": (16.0, "relu", 1.0),
    "houlsby": (16.0, "swish", 1.0),
    "parallel": (2.0, "relu", 4.0),
}
_ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class AdapterParams(MethodParams):
    config: Literal["pfeiffer", "houlsby", "parallel"] = Field(
        "pfeiffer", description="pfeiffer: after the FFN; houlsby: after attention and the FFN; parallel: beside the FFN")
    reduction: float | None = Field(None, gt=0, description="hidden size / bottleneck size (16, 16, 2 by config)")
    size: int | None = Field(None, ge=1, description="the bottleneck size itself (instead of reduction)")
    act: Literal["relu", "swish", "silu", "gelu", "tanh"] | None = Field(
        None, description="the bottleneck's activation (relu, swish, relu by config)")
    scale: float | None = Field(None, description="factor on the adapter's output (1, 1, 4 by config)")
    init: Literal["zero", "bert", "houlsby"] = Field(
        "zero", description="zero: an exact identity at step 0; bert: AdapterHub's N(0, 0.02); houlsby: std 1e-2")


@dataclass(frozen=True)
class Placement:
    """Where a layer's sub-layers put out h and take in r (paths relative to the layer)."""

    attn_out: str  # the module whose output is the attention sub-layer's h
    ffn_out: str  # the module whose output is the FFN's h
    ffn_in: str  # the module whose input `ffn_in_arg` is r, the FFN sub-block's input
    ffn_in_arg: int
    ffn_norm: str | None  # post-norm: the norm over h + r after the FFN; None: a pre-norm layer
    ffn_block: str = ""  # pre-norm: the module whose output is r + h after the FFN ("": the layer)

    def at(self, layer: nn.Module) -> Placement:
        """The paths in this layer: `{ff}` is the index of T5's feed-forward sub-layer (the last)."""
        ff = str(len(layer.layer) - 1) if "layer" in layer._modules else ""
        return replace(self, **{f.name: getattr(self, f.name).format(ff=ff) for f in fields(self)
                                if isinstance(getattr(self, f.name), str)})


# by layer class: the architectures whose placement is known (and checked against AdapterHub)
_PLACEMENTS = {
    "BertLayer": Placement("attention.output.dropout", "output.dropout", "output", 1, "output.LayerNorm"),
    "RobertaLayer": Placement("attention.output.dropout", "output.dropout", "output", 1, "output.LayerNorm"),
    "LlamaDecoderLayer": Placement("self_attn", "mlp", "post_attention_layernorm", 0, None),
    "Qwen2DecoderLayer": Placement("self_attn", "mlp", "post_attention_layernorm", 0, None),
    "MistralDecoderLayer": Placement("self_attn", "mlp", "post_attention_layernorm", 0, None),
    "GPT2Block": Placement("attn", "mlp", "ln_2", 0, None),
    # T5: layer.0 self-attention, (decoder: layer.1 cross-attention, not adapted), the last one the FFN
    "T5Block": Placement("layer.0.dropout", "layer.{ff}.dropout", "layer.{ff}", 0, None, "layer.{ff}"),
}


def settings(params: AdapterParams) -> tuple[float, str, float]:
    reduction, act, scale = _DEFAULTS[params.config]
    return (params.reduction or reduction, params.act or act,
            params.scale if params.scale is not None else scale)


def bottleneck_size(target: Target, params: AdapterParams) -> int:
    reduction, _, _ = settings(params)
    return params.size or max(1, int((target.hidden_size or 0) // reduction))


def _sites(params: AdapterParams) -> tuple[str, ...]:
    return ("adapter_attention", "adapter_output") if params.config == "houlsby" else ("adapter_output",)


class Bottleneck(nn.Module):
    """A(x) = up(act(down(x))) * scale, named as AdapterHub names it."""

    def __init__(self, hidden: int, size: int, act: str, scale: float, like: torch.Tensor) -> None:
        super().__init__()
        self.adapter_down = nn.Sequential(nn.Linear(hidden, size), _ACTIVATIONS[act]())
        self.adapter_up = nn.Linear(size, hidden)
        self.scale = scale
        self.__dict__[DROP_SWITCH] = DropSwitch()  # AdapterDrop (data_path/drop.py) turns it per forward
        self.to(dtype=like.dtype, device=like.device)

    @property
    def dropped(self) -> bool:
        return self.__dict__[DROP_SWITCH].dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.adapter_up(self.adapter_down(x.to(self.adapter_up.weight.dtype)))
        return (up * self.scale if self.scale != 1.0 else up).to(x.dtype)

    def initialise(self, init: str, generator: torch.Generator | None) -> None:
        down, up = self.adapter_down[0], self.adapter_up
        with torch.no_grad():
            for bias in (down.bias, up.bias):
                bias.zero_()
            if init == "zero":
                draw(down.weight, nn.init.kaiming_uniform_, generator, a=math.sqrt(5))
                up.weight.zero_()
            else:
                std = 0.02 if init == "bert" else 1e-2
                for weight in (down.weight, up.weight):
                    draw(weight, nn.init.normal_, generator, std=std)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


class AdapterPatch(Patch):
    """The adapter modules registered on a layer and the hooks that wire them in."""

    def __init__(self, layer: nn.Module, modules: dict[str, Bottleneck]) -> None:
        self.layer, self.names, self.handles = layer, list(modules), []
        self.captured: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            layer.add_module(name, module)

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{name}.{n}": p for name in self.names for n, p in getattr(self.layer, name).named_parameters()}

    def hook(self, path: str, kind: str, hook: Any) -> None:
        module = self.layer.get_submodule(path) if path else self.layer
        register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        self.handles.append(register(hook, with_kwargs=kind == "pre"))

    def revert(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.captured = [], {}
        for name in self.names:
            self.layer._modules.pop(name, None)


def _wire(patch: AdapterPatch, placement: Placement, params: AdapterParams) -> None:
    layer, kept = patch.layer, patch.captured
    output = getattr(layer, "adapter_output")

    def keep(name: str, index: int) -> Any:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kept[name] = args[index] if len(args) > index else list(kwargs.values())[index - len(args)]
        return pre

    def add_own(adapter: Bottleneck) -> Any:  # h -> A(h) + h
        def post(module: nn.Module, args: tuple, out: Any) -> Any:
            return None if adapter.dropped else _replace_first(out, adapter(_first(out)) + _first(out))
        return post

    def beside(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        r = kept.pop("r")
        return None if output.dropped else out + output(r)

    if params.config == "houlsby":
        patch.hook(placement.attn_out, "post", add_own(getattr(layer, "adapter_attention")))
        patch.hook(placement.ffn_out, "post", add_own(output))
    elif params.config == "parallel":
        patch.hook(placement.ffn_in, "pre", keep("r", placement.ffn_in_arg))
        patch.hook(placement.ffn_out, "post", beside)
    elif placement.ffn_norm is None:  # pfeiffer, pre-norm: on the block's output z = r + h
        patch.hook(placement.ffn_block, "post", add_own(output))
    else:  # pfeiffer, post-norm: z = LN(h + r), then LN(A(z) + h + r) with the same norm
        patch.hook(placement.ffn_in, "pre", keep("r", placement.ffn_in_arg))
        patch.hook(placement.ffn_out, "post", lambda m, a, out: kept.__setitem__("h", out))

        def again(norm: nn.Module, args: tuple, z: torch.Tensor) -> torch.Tensor | None:
            h, r = kept.pop("h"), kept.pop("r")
            if output.dropped:
                return None
            return F.layer_norm(output(z) + h + r, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

        patch.hook(placement.ffn_norm, "post", again)


@register
class Adapter(Method):
    verb = "inject"
    name = "adapter"
    Params = AdapterParams
    prepositions = frozenset({"in"})
    kinds = frozenset({"container"})
    default_target = "layers.*"
    summary = "bottleneck adapters in each layer's data path (pfeiffer, houlsby, parallel; AdapterHub's math)"

    @classmethod
    def keeps(cls, target: Target, params: MethodParams) -> bool:
        """`inject adapter` alone (every layer): the layers (role `layers.N`), not the containers
        inside them; a layer of unknown placement stays, so `check` says why it is refused."""
        return target.type_name in _PLACEMENTS or (target.role or "").isdigit()

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        reason = super().check(target, params)
        if reason:
            return reason
        if target.type_name not in _PLACEMENTS:
            known = ", ".join(sorted(_PLACEMENTS))
            return (f"{target.path} is a {target.type_name}: adapter placement is known for {known}; "
                    "name the layers with 'in layers.*' on one of those")
        if not target.hidden_size:
            return f"{target.path}: the model's config gives no hidden_size for the adapter's width"
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, AdapterParams)
        d, m = target.hidden_size or 0, bottleneck_size(target, params)
        shapes: dict[str, tuple[int, ...]] = {}
        for site in _sites(params):
            shapes |= {f"{site}.adapter_down.0.weight": (m, d), f"{site}.adapter_down.0.bias": (m,),
                       f"{site}.adapter_up.weight": (d, m), f"{site}.adapter_up.bias": (d,)}
        return shapes

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, AdapterParams) and target.hidden_size
        layer = model.get_submodule(target.path)
        _, act, scale = settings(params)
        like = next(layer.parameters())
        modules = {site: Bottleneck(target.hidden_size, bottleneck_size(target, params), act, scale, like)
                   for site in _sites(params)}
        if ctx.init:
            for module in modules.values():
                module.initialise(params.init, ctx.generator)
        patch = AdapterPatch(layer, modules)
        _wire(patch, _PLACEMENTS[target.type_name].at(layer), params)
        return patch
