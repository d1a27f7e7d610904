"""Bottleneck adapters in each layer's data path (Houlsby et al. 2019; Pfeiffer et al. 2021; He et
al. 2022's parallel form), as AdapterHub `adapters` 1.3 computes them (../shared/notes/adapters.md):

    inject adapter config=pfeiffer              # seq_bn: after the FFN, reduction 16, relu
    inject adapter config=houlsby               # double_seq_bn: after attention and after the FFN, swish
    inject adapter config=parallel in layers.[6-11]   # par_bn: beside the FFN, reduction 2, scale 4
    inject adapter after *.attn                 # explicit placement: on one sub-block's output h
    inject adapter scale=4 beside *.mlp         # explicit parallel form: reads r, adds to h

A(x) = up(act(down(x))), bottleneck m = size, or hidden // reduction (at least 1). Where it acts,
with h a sub-layer's output and r that sub-block's input (the residual stream):

| config | post-norm (BERT: y = LN(h + r)) | pre-norm (Llama, GPT-2, T5: y = r + h) |
|---|---|---|
| pfeiffer | z = LN(h + r); y = LN(A(z) + h + r) | z = r + h; y = A(z) + z |
| houlsby | at attention and FFN: y = LN(A(h) + h + r) | y = r + (A(h) + h) |
| parallel | y = LN(h + s A(r) + r) | y = r + (h + s A(r)); r before the FFN's norm |

Explicit placement names the sub-block (`*.attn` or `*.mlp`; BERT's two FFN modules count as one)
and leaves the config only its defaults (reduction, act, scale): `after X` is y = ... (A(h) + h)
at X's output, houlsby's form for one sub-block; `beside X` is y = ... (h + s A(r)) with r the
input of X's sub-block, where parallel takes it (the un-normalised residual stream on pre-norm
models). `config=houlsby` is `after *.attn` plus `after *.mlp`; `config=parallel` is `beside *.mlp`.
Explicitly placed adapters are one module `adapter` on the sub-block.

The config forms' adapters are modules registered on the layer (`adapter_output`, `adapter_attention`, with
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

from surgeon.errors import SurgeryError
from surgeon.methods._rng import draw
from surgeon.methods.rows import routed_rows
from surgeon.methods.base import (DROP_SWITCH, ApplyContext, DropSwitch, Method, MethodParams, Patch, Target, gate_of,
                                  own_parameters, register)

_DEFAULTS = {  # config -> (reduction, activation, scale), AdapterHub's SeqBn/DoubleSeqBn/ParBn configs
    "pfeiffer": (16.0, "relu", 1.0),
    "houlsby": (16.0, "swish", 1.0),
    "parallel": (2.0, "relu", 4.0),
}
_ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class AdapterParams(MethodParams):
    config: Literal["pfeiffer", "houlsby", "parallel"] = Field(
        "pfeiffer", description="pfeiffer: after the FFN; houlsby: after attention and the FFN; parallel: beside the "
        "FFN. With 'after PATTERN' / 'beside PATTERN' the placement is the pattern's; config gives the defaults")
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
    attn_in: str = ""  # the module whose input `attn_in_arg` is the attention sub-block's r
    attn_in_arg: int = 0

    def at(self, layer: nn.Module) -> Placement:
        """The paths in this layer: `{ff}` is the index of T5's feed-forward sub-layer (the last)."""
        ff = str(len(layer.layer) - 1) if "layer" in layer._modules else ""
        return replace(self, **{f.name: getattr(self, f.name).format(ff=ff) for f in fields(self)
                                if isinstance(getattr(self, f.name), str)})


# by layer class: the architectures whose placement is known (and checked against AdapterHub)
_PLACEMENTS = {
    "BertLayer": Placement("attention.output.dropout", "output.dropout", "output", 1, "output.LayerNorm",
                           attn_in="attention.output", attn_in_arg=1),
    "RobertaLayer": Placement("attention.output.dropout", "output.dropout", "output", 1, "output.LayerNorm",
                              attn_in="attention.output", attn_in_arg=1),
    "LlamaDecoderLayer": Placement("self_attn", "mlp", "post_attention_layernorm", 0, None, attn_in="input_layernorm"),
    "Qwen2DecoderLayer": Placement("self_attn", "mlp", "post_attention_layernorm", 0, None, attn_in="input_layernorm"),
    "MistralDecoderLayer": Placement("self_attn", "mlp", "post_attention_layernorm", 0, None, attn_in="input_layernorm"),
    "GPT2Block": Placement("attn", "mlp", "ln_2", 0, None, attn_in="ln_1"),
    # T5: layer.0 self-attention, (decoder: layer.1 cross-attention, not adapted), the last one the FFN
    "T5Block": Placement("layer.0.dropout", "layer.{ff}.dropout", "layer.{ff}", 0, None, "layer.{ff}", attn_in="layer.0"),
}


def settings(params: AdapterParams) -> tuple[float, str, float]:
    reduction, act, scale = _DEFAULTS[params.config]
    return (params.reduction or reduction, params.act or act,
            params.scale if params.scale is not None else scale)


def bottleneck_size(target: Target, params: AdapterParams) -> int:
    reduction, _, _ = settings(params)
    return params.size or max(1, int((target.hidden_size or 0) // reduction))


_EXPLICIT = ("after", "beside")  # the prepositions that place an adapter on one sub-block


def _sites(target: Target, params: AdapterParams) -> tuple[str, ...]:
    """The adapter modules' names on their owner; a named adapter's carry its name
    (`adapter_output[nli]`), so several stand side by side at one place."""
    if target.preposition in _EXPLICIT:
        sites: tuple[str, ...] = ("adapter",)
    else:
        sites = ("adapter_attention", "adapter_output") if params.config == "houlsby" else ("adapter_output",)
    return tuple(f"{site}[{target.label}]" for site in sites) if target.label else sites


def site_of(module_name: str) -> str:
    """`adapter_output[nli]` -> `adapter_output`: where a (named) adapter module acts."""
    return module_name.partition("[")[0]


class Bottleneck(nn.Module):
    """A(x) = up(act(down(x))) * scale, named as AdapterHub names it."""

    def __init__(self, hidden: int, size: int, act: str, scale: float, like: torch.Tensor,
                 label: str | None = None) -> None:
        super().__init__()
        self.label = label  # the named adapter it belongs to: which rows of a mixed batch it serves
        self.adapter_down = nn.Sequential(nn.Linear(hidden, size), _ACTIVATIONS[act]())
        self.adapter_up = nn.Linear(size, hidden)
        self.scale = scale
        self.__dict__[DROP_SWITCH] = DropSwitch()  # AdapterDrop (data_path/drop.py) turns it per forward
        self.to(dtype=like.dtype, device=like.device)

    @property
    def dropped(self) -> bool:
        return self.__dict__[DROP_SWITCH].off

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A(x); in a mixed batch, zero on the rows that do not name this adapter."""
        rows = routed_rows(self.label, x)
        h = x if rows is None else x[rows]
        up = self.adapter_up(self.adapter_down(h.to(self.adapter_up.weight.dtype)))
        up = up * self.scale if self.scale != 1.0 else up
        gate = gate_of(self)
        if gate is not None:  # UniPELT: scaled by mean_seq(sigmoid(W z + b)), z the adapter's input
            up = up * gate(h).unsqueeze(-1)
        up = up.to(x.dtype)
        return up if rows is None else torch.zeros_like(x).index_copy(0, rows, up)

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
    """The adapter modules registered on `owner` (the layer, or the sub-block an explicit placement
    names) and the hooks on the layer's modules that wire them in."""

    def __init__(self, owner: nn.Module, layer: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.owner, self.layer, self.modules, self.handles = owner, layer, modules, []
        self.captured: dict[str, torch.Tensor] = {}
        for name in modules:
            if hasattr(owner, name):
                raise SurgeryError(f"{type(owner).__name__} already has '{name}': two adapters at one place "
                                   "(a config form and an explicit one?)")
        for name, module in modules.items():
            owner.add_module(name, module)

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{name}.{n}": p for name, module in self.modules.items() for n, p in own_parameters(module)}

    def set_active(self, active: bool) -> None:
        for module in self.modules.values():
            module.__dict__[DROP_SWITCH].inactive = not active

    def hook(self, path: str, kind: str, hook: Any) -> None:
        module = self.layer.get_submodule(path) if path else self.layer
        register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        self.handles.append(register(hook, with_kwargs=kind == "pre"))

    def revert(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.captured = [], {}
        for name in self.modules:
            self.owner._modules.pop(name, None)


def _keep(kept: dict[str, torch.Tensor], name: str, index: int) -> Any:
    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kept[name] = args[index] if len(args) > index else list(kwargs.values())[index - len(args)]
    return pre


def _after(patch: AdapterPatch, path: str, adapter: nn.Module) -> None:
    """h -> A(h) + h at the output of the module at `path`."""
    def post(module: nn.Module, args: tuple, out: Any) -> Any:
        return None if adapter.dropped else _replace_first(out, adapter(_first(out)) + _first(out))
    patch.hook(path, "post", post)


def _beside(patch: AdapterPatch, source: tuple[str, int], path: str, adapter: Bottleneck) -> None:
    """h -> h + A(r) at the output of the module at `path`, r the input `source` = (module, arg)."""
    kept, key = patch.captured, f"r:{path}"

    def post(module: nn.Module, args: tuple, out: Any) -> Any:
        r = kept.pop(key)
        return None if adapter.dropped else _replace_first(out, _first(out) + adapter(r))

    patch.hook(source[0], "pre", _keep(kept, key, source[1]))
    patch.hook(path, "post", post)


def _wire_explicit(patch: AdapterPatch, placement: Placement, target: Target) -> None:
    (adapter,) = patch.modules.values()
    attention = target.role == "attn"
    out = placement.attn_out if attention else placement.ffn_out
    if target.preposition == "after":
        _after(patch, out, adapter)
    else:
        source = (placement.attn_in, placement.attn_in_arg) if attention else (placement.ffn_in, placement.ffn_in_arg)
        _beside(patch, source, out, adapter)


def _wire(patch: AdapterPatch, placement: Placement, params: AdapterParams) -> None:
    at = {site_of(name): module for name, module in patch.modules.items()}
    output = at["adapter_output"]
    if params.config == "houlsby":
        _after(patch, placement.attn_out, at["adapter_attention"])
        _after(patch, placement.ffn_out, output)
    elif params.config == "parallel":
        _beside(patch, (placement.ffn_in, placement.ffn_in_arg), placement.ffn_out, output)
    else:
        wire_pfeiffer(patch, placement, output)


def wire_pfeiffer(patch: AdapterPatch, placement: Placement, output: nn.Module) -> None:
    """`output` (A) where pfeiffer's adapter acts: on the FFN block's output z, y = A(z) + z after
    its residual (pre-norm), or y = LN(A(z) + h + r) with the FFN's own norm (post-norm). An
    AdapterFusion layer is wired here as its adapters are."""
    kept = patch.captured
    if placement.ffn_norm is None:  # pre-norm: on the block's output z = r + h
        _after(patch, placement.ffn_block, output)
    else:  # post-norm: z = LN(h + r), then LN(A(z) + h + r) with the same norm
        # h + r is the norm's own input, so what other adapters added to h (houlsby's) stays in it
        patch.hook(placement.ffn_norm, "pre", _keep(kept, "h+r", 0))

        def again(norm: nn.Module, args: tuple, z: torch.Tensor) -> torch.Tensor | None:
            h_plus_r = kept.pop("h+r")
            if output.dropped:
                return None
            return F.layer_norm(output(z) + h_plus_r, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

        patch.hook(placement.ffn_norm, "post", again)


def _layer_of(model: nn.Module, target: Target) -> nn.Module:
    """The layer whose sub-block `target` is: the nearest enclosing module of known placement."""
    path = target.path
    while path:
        path = path.rpartition(".")[0]
        module = model.get_submodule(path)
        if type(module).__name__ in _PLACEMENTS:
            return module
    known = ", ".join(sorted(_PLACEMENTS))
    raise SurgeryError(f"{target.path} is in no layer of known adapter placement ({known})")


@register
class Adapter(Method):
    verb = "inject"
    name = "adapter"
    Params = AdapterParams
    prepositions = frozenset({"in", *_EXPLICIT})
    kinds = frozenset({"container"})
    default_target = "layers.*"
    places_by_role = True
    shares_modules = True
    routes_rows = True
    unmergeable_because = ("a bottleneck adapter computes up(act(down(x))), which no weight matrix holds; it stays a "
                           "module: load the run with surgeon.load, or export it (surgeon export --format adapterhub)")
    summary = ("bottleneck adapters in each layer's data path (pfeiffer, houlsby, parallel; AdapterHub's math), "
               "or after / beside one attention or FFN block")

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
        if not target.hidden_size:
            return f"{target.path}: the model's config gives no hidden_size for the adapter's width"
        if target.preposition in _EXPLICIT:
            if target.role in ("attn", "mlp"):
                return None
            what = "a cross-attention block (not adapted)" if target.role == "cross_attn" else f"a {target.type_name}"
            return (f"{target.path} is {what}: '{target.preposition} PATTERN' names attention or feed-forward "
                    "blocks (*.attn, *.mlp); whole layers are 'in layers.*'")
        if target.type_name not in _PLACEMENTS:
            known = ", ".join(sorted(_PLACEMENTS))
            return (f"{target.path} is a {target.type_name}: adapter placement is known for {known}; "
                    "name the layers with 'in layers.*' on one of those")
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, AdapterParams)
        d, m = target.hidden_size or 0, bottleneck_size(target, params)
        shapes: dict[str, tuple[int, ...]] = {}
        for site in _sites(target, params):
            shapes |= {f"{site}.adapter_down.0.weight": (m, d), f"{site}.adapter_down.0.bias": (m,),
                       f"{site}.adapter_up.weight": (d, m), f"{site}.adapter_up.bias": (d,)}
        return shapes

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, AdapterParams) and target.hidden_size
        owner = model.get_submodule(target.path)
        layer = _layer_of(model, target) if target.preposition in _EXPLICIT else owner
        _, act, scale = settings(params)
        like = next(owner.parameters())
        modules = {site: Bottleneck(target.hidden_size, bottleneck_size(target, params), act, scale, like, target.label)
                   for site in _sites(target, params)}
        if ctx.init:
            for module in modules.values():
                module.initialise(params.init, ctx.generator)
        patch = AdapterPatch(owner, layer, modules)
        placement = _PLACEMENTS[type(layer).__name__].at(layer)
        if target.preposition in _EXPLICIT:
            _wire_explicit(patch, placement, target)
        else:
            _wire(patch, placement, params)
        return patch
