"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022), patched in place.

Each targeted attention layer attends to P extra key/value vectors before the real tokens. Without
`projection` they are plain trainable tensors, one (P, 2*kv_dim) block per layer (P-tuning v2, PEFT's
PrefixTuningConfig with prefix_projection=False); with `projection=h` they come from PEFT's
PrefixEncoder MLP, embedding (P, kv_dim) -> Linear(kv_dim, h) -> Tanh -> Linear(h, 2L*kv_dim), whose
last Linear is split by rows into the L per-layer blocks (so each layer owns its rows and the count
is exactly PEFT's). `fold()` replaces the MLP by the prefix it produces.

The seam (no wrapper model, no cache seeding): each layer's prefix is the KEYS modifier of the
composing attention seam (`_seam.py`), which puts it in front of the keys and values and left-pads
the mask with "attend"; T5's position bias is padded here. The seam switches the model's configs
and restores them exactly on revert. Positions shift by P
(a pre-hook on the rotary / absolute position module), as in PEFT, where the prefix sits in the
cache. Because the prefix is never in the cache, `generate` works with any cache, and gradient
checkpointing works (PEFT refuses it).

AdapterHub's prefix (MAM, specs/mam.peft) is the same MLP with two differences, each a parameter:
its embedding is as wide as the hidden size (`width=hidden`; PEFT's is the key/value width, which
differs under grouped-query attention), and the real tokens keep positions 0.. (`positions=adapterhub`:
no shift; T5's relative bias is computed over [prefix; tokens], as the library computes it).
AdapterDrop (`drop adapters`) switches a layer's prefix off through its `DropSwitch`.

Layout (PEFT's): a layer's block holds K in columns [0, kv_dim) and V in [kv_dim, 2*kv_dim), each
viewed (P, n_kv_heads, head_dim). PEFT's prompt_embeddings (P, L*2*kv_dim) is the layer blocks side
by side, in layer order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgeon.errors import ExportError, PlanError, SurgeonError
from surgeon.graph import unwrap
from surgeon.methods._rng import draw
from surgeon.methods.attention._attend import inner_attention
from surgeon.methods.attention._seam import KEYS, AttentionCall, AttentionSeam, Modifier, attention_modules, modifiers_of
from surgeon.methods.base import DROP_SWITCH, ApplyContext, DropSwitch, Method, MethodParams, Patch, Target, register


class PrefixParams(MethodParams):
    tokens: int = Field(..., ge=1, le=4096, description="number of virtual tokens P per layer")
    projection: int | None = Field(None, ge=1, description="hidden size of PEFT's MLP reparameterisation "
                                   "(prefix tuning); omitted: plain per-layer prefixes (P-tuning v2)")
    width: Literal["kv", "hidden"] = Field(
        "kv", description="the projection's embedding width: kv (PEFT: the key/value width) or hidden "
        "(AdapterHub: the model's hidden size); they differ only under grouped-query attention")
    positions: Literal["peft", "adapterhub"] = Field(
        "peft", description="peft: the real tokens' positions start after the prefix, as where PEFT keeps it "
        "in the cache; adapterhub: they start at 0, and T5's relative bias spans [prefix; tokens] (AdapterHub 1.3)")


# ---------------------------------------------------------------------------------------------
# Shapes of a target, read from the module at apply time and from the planner's Target at plan time


def _kv_shape(inner: nn.Module) -> tuple[int, int]:
    """(n_kv_heads, head_dim) of the keys the attention function receives."""
    head_dim = next((getattr(inner, a) for a in ("head_dim", "attention_head_size", "key_value_proj_dim")
                     if isinstance(getattr(inner, a, None), int)), None)
    kv_dim = None
    for name in ("k_proj", "key", "k"):
        child = getattr(inner, name, None)
        child = unwrap(child) if isinstance(child, nn.Module) else child  # under a LoRA of an earlier statement
        if isinstance(child, nn.Linear):
            kv_dim = child.out_features
    if kv_dim is None and hasattr(inner, "split_size"):  # GPT-2's fused c_attn: q, k, v of split_size each
        kv_dim = inner.split_size
    if head_dim is None or kv_dim is None or kv_dim % head_dim:
        raise PlanError(f"cannot read the key/value shape of {type(inner).__name__}")
    return kv_dim // head_dim, head_dim


def _target_kv_dim(target: Target) -> int | None:
    """kv_dim as the planner saw it; needs the planner to record it for attention modules (see
    the report: Target.kv_dim). None when it does not."""
    value = getattr(target, "kv_dim", None)
    return int(value) if value else None


_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def _layer_index(path: str) -> int:
    found = _INDEX.search(path)
    return int(found.group(1)) if found else 0


def _stack_key(path: str) -> str:
    """The path with its layer index wildcarded: the layers that share one prefix MLP (T5's encoder
    self-attention, decoder self-attention and cross-attention are three stacks)."""
    return _INDEX.sub(".*", path, count=1)


def _shapes(kv_dim: int, hidden: int, leader: bool, params: PrefixParams) -> dict[str, tuple[int, ...]]:
    p, h = params.tokens, params.projection
    if h is None:
        return {"prefix": (p, 2 * kv_dim)}
    shapes: dict[str, tuple[int, ...]] = {}
    if leader:  # the embedding and the first Linear are shared by the stack; layer 0 holds them
        width = hidden if params.width == "hidden" else kv_dim
        shapes.update({"prefix_embedding": (p, width), "prefix_in_weight": (h, width), "prefix_in_bias": (h,)})
    shapes.update({"prefix_out_weight": (2 * kv_dim, h), "prefix_out_bias": (2 * kv_dim,)})
    return shapes


# ---------------------------------------------------------------------------------------------
# Live state: one _Layer per patched attention module, one _Group per stack with an MLP, one
# _ModelState per model (the config switch and the position hooks)


@dataclass(eq=False)
class _Group:
    """The MLP of one stack: the leader (layer 0) owns the embedding and the first Linear."""

    leader: nn.Module
    members: list[_Layer] = field(default_factory=list)
    folded: bool = False

    def hidden(self) -> torch.Tensor:
        m = self.leader
        return torch.tanh(F.linear(m.prefix_embedding, m.prefix_in_weight, m.prefix_in_bias))

    def fold(self) -> None:
        with torch.no_grad():
            hidden = self.hidden()
            blocks = [F.linear(hidden, layer.module.prefix_out_weight, layer.module.prefix_out_bias)
                      for layer in self.members]
        for layer, block in zip(self.members, blocks):
            for name in ("prefix_out_weight", "prefix_out_bias"):
                del layer.module._parameters[name]
            layer.names = ["prefix"]
            layer.module.register_parameter("prefix", nn.Parameter(block.contiguous()))
        for name in ("prefix_embedding", "prefix_in_weight", "prefix_in_bias"):
            del self.leader._parameters[name]
        self.folded = True


@dataclass(eq=False)
class _Layer(Modifier):
    """One layer's prefix: the attention seam's KEYS modifier."""

    stage: ClassVar[int] = KEYS
    module: nn.Module  # the target, which holds the parameters
    n_kv: int
    head_dim: int
    tokens: int
    names: list[str]
    group: _Group | None = None
    switch: DropSwitch = field(default_factory=DropSwitch)
    # positions=adapterhub on T5: the stack's attention that holds the relative position table
    bias_source: nn.Module | None = None
    gate: nn.Module | None = None  # UniPELT's prefix gate (data_path/gate.py), and the input it reads
    gate_input: torch.Tensor | None = None

    def block(self) -> torch.Tensor:
        """(P, 2*kv_dim): this layer's K and V columns."""
        if self.group is None or self.group.folded:
            return self.module.prefix
        return F.linear(self.group.hidden(), self.module.prefix_out_weight, self.module.prefix_out_bias)

    def key_value(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as (batch, n_kv, P, head_dim), in the keys' dtype."""
        block = self.block().to(like.dtype)
        k, v = block.view(self.tokens, 2, self.n_kv, self.head_dim).permute(1, 2, 0, 3)
        shape = (like.shape[0], self.n_kv, self.tokens, self.head_dim)
        k, v = k.unsqueeze(0).expand(shape), v.unsqueeze(0).expand(shape)
        if self.gate is not None and getattr(self.gate, "active", False) and self.gate_input is not None:
            g = self.gate(self.gate_input.to(self.gate.weight.dtype)).to(like.dtype)  # (batch, 1 or 2)
            k, v = k * g[:, 0].view(-1, 1, 1, 1), v * g[:, -1].view(-1, 1, 1, 1)
        return k, v

    def modify(self, call: AttentionCall) -> None:
        kv_len = call.key.shape[2] - call.extra
        pk, pv = self.key_value(call.key)
        call.key, call.value = torch.cat([pk, call.key], dim=2), torch.cat([pv, call.value], dim=2)
        call.extra += self.tokens
        if call.kwargs.get("position_bias") is not None:
            call.kwargs["position_bias"] = _t5_bias(self, call.kwargs["position_bias"], call.query.shape[2], kv_len)


# The live state hangs off the objects it belongs to (not global dicts keyed by id(), which a new
# model can reuse once an unreverted one is collected); revert deletes these attributes.
_LAYER_ATTR = "_surgeon_prefix"  # on the inner attention module: its _Layer
_STATE_ATTR = "_surgeon_prefix_state"  # on the top-level model: its _ModelState


_POSITION_EMBEDDINGS = {"wpe", "position_embeddings", "embed_positions"}


class _ModelState:
    """What the prefix takes over model-wide: the attention function and the position shift."""

    def __init__(self, model: nn.Module, tokens: int, positions: str) -> None:
        self.tokens, self.positions, self.count = tokens, positions, 0
        self.model_modules = attention_modules(model)
        self.groups: dict[tuple[str, str], _Group] = {}  # (stack, params) -> the MLP group being built
        self.seam = AttentionSeam.of(model)
        self.handles = []
        for path, module in model.named_modules() if positions == "peft" else ():
            if type(module).__name__.endswith("RotaryEmbedding"):
                self.handles.append(module.register_forward_pre_hook(self._shift_rotary, with_kwargs=True))
            elif isinstance(module, nn.Embedding) and path.rpartition(".")[2] in _POSITION_EMBEDDINGS:
                self.handles.append(module.register_forward_pre_hook(self._shift_absolute))

    def _all_inactive(self) -> bool:
        """Every prefix of the model switched off (job.activate): positions are the base's again.
        (AdapterDrop does not count: a dropped layer still sees the shifted positions.)"""
        layers = [m for module in self.model_modules for m in modifiers_of(module) if isinstance(m, _Layer)]
        return bool(layers) and all(layer.switch.inactive for layer in layers)

    def _shift_rotary(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # real tokens sit at positions P.. after the prefix, as in PEFT (its prefix is in the cache)
        if self._all_inactive():
            return None
        if "position_ids" in kwargs:
            kwargs = {**kwargs, "position_ids": kwargs["position_ids"] + self.tokens}
        else:
            args = (args[0], args[1] + self.tokens, *args[2:])
        return args, kwargs

    def _shift_absolute(self, module: nn.Embedding, args: tuple) -> tuple | None:
        if self._all_inactive():
            return None
        ids = args[0] + self.tokens
        if ids.numel() and int(ids.max()) >= module.num_embeddings:
            longest = int(args[0].max()) + 1
            raise SurgeonError(
                f"the input needs {longest} positions plus the prefix's {self.tokens} virtual tokens, but the model "
                f"has {module.num_embeddings} positions (max_position_embeddings): inputs may be at most "
                f"{module.num_embeddings - self.tokens} tokens long with this prefix")
        return (ids, *args[1:])

    def release(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.seam.count == 0:  # no modifier of any statement holds the configs' switch
            self.seam.release()


def _t5_bias(layer: _Layer, bias: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """T5's relative position bias over [prefix; tokens]. peft: the prefix has no relative position
    (bias 0). adapterhub: the library computes the table for key length kv + P, so the prefix keys
    sit at positions 0..P-1 and the real keys after them, the queries where they were."""
    source = layer.bias_source
    if source is None:  # positions=peft, or an attention without its own table (cross-attention: zeros)
        return torch.cat([bias.new_zeros((*bias.shape[:-1], layer.tokens)), bias], dim=-1)
    return source.compute_bias(q_len, kv_len + layer.tokens, device=bias.device,
                               past_seen_tokens=kv_len - q_len).to(bias.dtype)


def _blocks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Target path -> its (P, 2*kv_dim) block, from a statement's tensors ("path.local" keys),
    running the MLP where the statement has one."""
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        path, _, local = name.rpartition(".")
        by_path.setdefault(path, {})[local] = tensor
    if all("prefix" in own for own in by_path.values()):
        return {path: own["prefix"] for path, own in by_path.items()}
    hidden: dict[str, torch.Tensor] = {}
    for path, own in by_path.items():
        if "prefix_embedding" in own:
            hidden[_stack_key(path)] = torch.tanh(F.linear(own["prefix_embedding"], own["prefix_in_weight"],
                                                           own["prefix_in_bias"]))
    return {path: F.linear(hidden[_stack_key(path)], own["prefix_out_weight"], own["prefix_out_bias"])
            for path, own in by_path.items()}


# ---------------------------------------------------------------------------------------------


class PrefixPatch(Patch):
    def __init__(self, model: nn.Module, inner: nn.Module, layer: _Layer, state: _ModelState) -> None:
        self.model, self.inner, self.layer, self.state = model, inner, layer, state
        self.folded = False

    def added_parameters(self) -> dict[str, nn.Parameter]:
        params = self.layer.module._parameters
        return {name: params[name] for name in self.layer.names}  # type: ignore[misc]

    def set_active(self, active: bool) -> None:
        self.layer.switch.inactive = not active

    def fold(self) -> bool:
        group = self.layer.group
        if group is None or self.folded:
            return False
        if not group.folded:
            group.fold()
        self.folded = True
        return True

    def revert(self) -> None:
        for name in self.layer.names:
            del self.layer.module._parameters[name]
        self.layer.names = []
        self.inner.__dict__.pop(_LAYER_ATTR, None)
        self.inner.__dict__.pop(DROP_SWITCH, None)
        self.state.seam.remove(self.inner, self.layer)
        group = self.layer.group
        if group is not None and self.layer in group.members:
            group.members.remove(self.layer)
        self.state.count -= 1
        if self.state.count == 0:
            self.state.release()
            self.model.__dict__.pop(_STATE_ATTR, None)


def _hidden_size(model: nn.Module, target: Target) -> int:
    config = getattr(model, "config", None)
    hidden = target.hidden_size or getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not hidden:
        raise PlanError(f"{target.path}: the model's config gives no hidden_size for width=hidden")
    return int(hidden)


def _bias_source(model: nn.Module, target: Target, params: PrefixParams) -> nn.Module | None:
    """positions=adapterhub on T5: the attention of the stack's first layer, which holds the
    relative position table every layer of the stack uses."""
    if params.positions != "adapterhub":
        return None
    first = inner_attention(model.get_submodule(_stack_key(target.path).replace(".*", ".0", 1)))
    return first if getattr(first, "has_relative_attention_bias", False) else None


def _new(shape: tuple[int, ...], like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))


def _init(module: nn.Module, names: list[str], params: PrefixParams,
          generator: torch.Generator | None = None) -> None:
    """PEFT's defaults: nn.Embedding's N(0, 1) and nn.Linear's Kaiming-uniform (per-layer row blocks of
    PEFT's last Linear have its fan-in, so the same distribution), drawn from `generator` (None:
    the global RNG)."""
    with torch.no_grad():
        for name in names:
            tensor = module._parameters[name]
            if name in ("prefix", "prefix_embedding"):
                draw(tensor, nn.init.normal_, generator)
            elif name.endswith("weight"):
                draw(tensor, nn.init.kaiming_uniform_, generator, a=math.sqrt(5))
            else:  # a Linear's bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in of its weight
                fan_in = module._parameters[name.replace("bias", "weight")].shape[1]
                draw(tensor, nn.init.uniform_, generator, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


@register
class Prefix(Method):
    verb = "inject"
    name = "prefix"
    Params = PrefixParams
    kinds = frozenset({"container"})
    claims = frozenset({"prefix", "inputs"})
    summary = "prefix tuning / P-tuning v2: trainable keys and values in front of each attention layer"
    peft_type = "PREFIX_TUNING"
    unmergeable_because = ("a prefix is keys and values attention reads, not a change of any weight "
                           "(surgeon fold replaces its MLP by the prefix it produces)")
    peft_scope = "model"

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        assert isinstance(params, PrefixParams)
        if target.role not in ("attn", "cross_attn"):
            return f"{target.path} is not an attention module; prefix tuning targets attention (*.attn)"
        if params.width == "hidden" and params.projection is None:
            return "width=hidden sets the width of the projection's embedding: add projection=N, or drop width"
        if params.width == "hidden" and not target.hidden_size:
            return f"{target.path}: the model's config gives no hidden_size for width=hidden"
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, PrefixParams)
        kv_dim = _target_kv_dim(target)
        if kv_dim is None:
            return {}  # the planner did not record kv_dim (needs the shared change in the report)
        return _shapes(kv_dim, target.hidden_size or kv_dim, _layer_index(target.path) == 0, params)

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, PrefixParams)
        module = model.get_submodule(target.path)
        inner = inner_attention(module)
        n_kv, head_dim = _kv_shape(inner)
        leader = _layer_index(target.path) == 0
        if _LAYER_ATTR in inner.__dict__:
            raise PlanError(f"{target.path} already has a prefix")
        state = model.__dict__.get(_STATE_ATTR)
        if state is None:
            state = _ModelState(model, params.tokens, params.positions)
            model.__dict__[_STATE_ATTR] = state
        elif state.tokens != params.tokens and state.handles:
            raise PlanError(f"two prefix lengths ({state.tokens}, {params.tokens}) on one model with position "
                            "embeddings: the positions can shift by only one of them")
        elif state.positions != params.positions:
            raise PlanError(f"two prefix position schemes (positions={state.positions}, {params.positions}) on one "
                            "model: write the same positions= in every prefix statement")
        group = None
        if params.projection is not None:
            key = (_stack_key(target.path), params.model_dump_json())
            group = state.groups.get(key)
            if leader:
                group = state.groups[key] = _Group(leader=module)
            elif group is None or group.folded or not group.members:
                if state.count == 0:  # nothing else holds the model-wide switch: undo it now
                    state.release()
                    del model.__dict__[_STATE_ATTR]
                raise PlanError(f"prefix projection: {target.path} shares its stack's MLP, which layer 0 holds; "
                                "the statement must include layer 0 of the stack (or drop projection)")
        state.count += 1
        like = next(p for p in inner.parameters())
        shapes = _shapes(n_kv * head_dim, _hidden_size(model, target), leader, params)
        for name, shape in shapes.items():
            if hasattr(module, name):
                raise PlanError(f"{target.path} already has an attribute '{name}'")
            module.register_parameter(name, _new(shape, like))
        if ctx.init:
            _init(module, list(shapes), params, ctx.generator)
        layer = _Layer(module=module, n_kv=n_kv, head_dim=head_dim, tokens=params.tokens, names=list(shapes),
                       group=group, bias_source=_bias_source(model, target, params))
        if group is not None:
            group.members.append(layer)
        inner.__dict__[_LAYER_ATTR] = layer
        inner.__dict__[DROP_SWITCH] = layer.switch
        state.seam.add(inner, layer)
        return PrefixPatch(model, inner, layer, state)

    # --- PEFT interchange: PEFT's checkpoint holds only prompt_embeddings, (P, L*2*kv_dim) ---

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, PrefixParams)
        if params.positions != "peft":
            raise ExportError("a prefix with positions=adapterhub computes what PEFT does not (PEFT's real tokens "
                              "sit after the prefix): export it with positions=peft, or keep it a surgeon run")
        config: dict[str, Any] = {"num_virtual_tokens": params.tokens,
                                  "prefix_projection": params.projection is not None}
        if params.projection is not None:
            config["encoder_hidden_size"] = params.projection
        return config

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's prompt_embeddings (P, L*2*kv_dim): the layer blocks side by side in layer order,
        from every patch of the statement ("path.local" keys). An MLP is folded on the way (PEFT's
        checkpoint holds what the encoder produces, not the encoder)."""
        blocks = _blocks(tensors)
        stacks = {_stack_key(path) for path in blocks}
        if len(stacks) != 1:
            raise ExportError(f"PEFT's prefix tuning holds one stack of layers; this run has {sorted(stacks)}")
        return {"prompt_embeddings": torch.cat([blocks[p] for p in sorted(blocks, key=_layer_index)], dim=1)}

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse, for the folded form (what PEFT's checkpoint holds): "path.prefix" per layer
        of `target`'s stack. Needs the planner's kv_dim to know the layer count."""
        kv_dim = _target_kv_dim(target)
        if kv_dim is None:
            raise ExportError("importing a PEFT prefix needs the key/value width of the attention targets, "
                              "which this planner does not record")
        embeddings = tensors["prompt_embeddings"]
        width = 2 * kv_dim
        if embeddings.shape[1] % width:
            raise ExportError(f"prompt_embeddings of width {embeddings.shape[1]} is not a whole number of "
                              f"layers of {width} columns")
        stack = _stack_key(target.path)
        return {f"{stack.replace('.*', f'.{i}', 1)}.prefix": embeddings[:, i * width:(i + 1) * width]
                for i in range(embeddings.shape[1] // width)}

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        # PEFT's checkpoint holds the plain prefix (the MLP collapsed away), so the import is the
        # folded form: no projection. Seq2seq: PEFT reaches only the decoder self-attention.
        tokens = int(config["num_virtual_tokens"])
        where = "decoder.**.attn" if config.get("task_type") == "SEQ_2_SEQ_LM" else "*.attn"
        return f"inject prefix tokens={tokens} into {where}"
