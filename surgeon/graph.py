"""The model's module graph (networkx): modules, parameters, containment, ownership and roles.

Roles are architecture-neutral names (`layers.3.attn.q`) inferred from module names, classes and
the nesting they sit in, so one spec serves Llama, GPT-2, BERT and T5 alike. A fused projection
(GPT-2's `c_attn`) gets one role path per slice (`attn.q`, `attn.k`, `attn.v`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

ROLES = ("attn", "q", "k", "v", "o", "mlp", "up", "down", "gate", "embed", "head", "norm", "layers")

_LAYER_LISTS = {"layers", "h", "layer", "block", "blocks"}
_ATTN = {"self_attn", "attn", "attention", "SelfAttention", "self_attention"}
_CROSS = {"EncDecAttention", "crossattention", "encoder_attn", "cross_attn"}
_MLP = {"mlp", "feed_forward", "ffn", "DenseReluDense"}
_PROJ = {
    "q": {"q_proj", "query", "q", "q_lin", "wq"},
    "k": {"k_proj", "key", "k", "k_lin", "wk"},
    "v": {"v_proj", "value", "v", "v_lin", "wv"},
    "o": {"o_proj", "out_proj", "o", "c_proj", "out_lin", "wo", "dense"},
}
_FFN = {
    "up": {"up_proj", "c_fc", "wi", "wi_1", "fc1", "w1", "lin1"},
    "gate": {"gate_proj", "wi_0", "w3"},
    "down": {"down_proj", "c_proj", "wo", "fc2", "w2", "lin2"},
}
_FUSED_QKV = {"c_attn", "qkv_proj", "Wqkv", "qkv"}
_EMBED = {"embed_tokens", "wte", "word_embeddings", "shared", "embed_in"}
# output heads, by the name a model gives the module (LM, MLM, sequence/token classification, QA);
# a head made of several modules (RoBERTa's classifier, BERT's MLM `cls`) gives the role to each
# module in it that holds parameters, so `head` reaches every tensor of the head
_HEAD = {"lm_head", "embed_out", "cls", "classifier", "score", "qa_outputs", "classification_head"}
_STACKS = {"encoder", "decoder"}


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    owners: tuple[str, ...]  # every module path that holds this very tensor (tied weights: 2+)
    merged: bool = False  # a merge put a delta into it


@dataclass
class ModuleInfo:
    path: str
    module: nn.Module = field(repr=False)
    type_name: str
    kind: str  # linear | conv1d | embedding | conv2d | norm | container | other
    role_paths: tuple[str, ...] = ()
    slices: dict[str, tuple[int, int]] = field(default_factory=dict)  # fused q/k/v output columns
    params: dict[str, ParamInfo] = field(default_factory=dict)  # local name -> info
    aliases: tuple[str, ...] = ()  # other paths of the very same module object

    @property
    def in_features(self) -> int | None:
        return _features(self)[0]

    @property
    def out_features(self) -> int | None:
        return _features(self)[1]


def _features(info: ModuleInfo) -> tuple[int | None, int | None]:
    weight = info.params.get("weight")
    if weight is None or len(weight.shape) < 2:
        return None, None
    shape = weight.shape
    if info.kind == "conv1d":  # transformers' Conv1D stores (in, out)
        return shape[0], shape[1]
    if info.kind == "embedding":
        return shape[0], shape[1]
    return shape[1], shape[0]


def _is_surgeon(module: nn.Module) -> bool:
    return type(module).__module__.startswith("surgeon.")


def wrapped(module: nn.Module) -> nn.Module | None:
    """What a surgeon wrapper (LoRA and the other weight methods) holds as `.base`, else None."""
    base = module._modules.get("base")
    return base if base is not None and _is_surgeon(module) else None


def unwrap(module: nn.Module) -> nn.Module:
    """The module a chain of surgeon wrappers stands for. A quantized layer is no wrapper: it
    replaced its original and answers for it itself (`original_kind`, `shape`)."""
    while (inner := wrapped(module)) is not None:
        module = inner
    return module


def _replacement_kind(module: nn.Module) -> str | None:
    """The kind of the layer a surgeon replacement (QuantizedLinear) stands for, else None."""
    kind = getattr(module, "original_kind", None) if _is_surgeon(module) else None
    return kind if isinstance(kind, str) else None


def _added_by_surgeon(module: nn.Module) -> bool:
    """A module a live patch put into the model (a prompt encoder): none of the model's own, so no
    target; the wrappers and replacements instead stand where their originals stood."""
    return _is_surgeon(module) and wrapped(module) is None and _replacement_kind(module) is None


def module_kind(module: nn.Module) -> str:
    """The module's kind; a surgeon wrapper or replacement has the kind of what it stands for,
    so a second spec sees a patched model's layers as the first spec saw them."""
    module = unwrap(module)
    replaced = _replacement_kind(module)
    if replaced is not None:
        return replaced
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.lower().endswith("norm"):
        return "norm"
    if len(module._modules) > 0:
        return "container"
    return "other"


def _is_norm(name: str, module: nn.Module) -> bool:
    return module_kind(module) == "norm" or "norm" in name.lower() or name.startswith("ln_")


def _head_role(module: nn.Module) -> tuple[str | None, str | None]:
    """A module of an output head: a layer that holds parameters is `head`; a container is walked
    (the role stays off it, so `inject lora into head` meets layers, not the container); a module
    without parameters (dropout, activation) gets none."""
    kind = module_kind(module)
    if kind == "container":
        return None, "head"
    owns = kind != "other" or any(p is not None for p in module._parameters.values())
    return ("head", None) if owns else (None, None)


def _child_role(name: str, child: nn.Module, ctx: str) -> tuple[str | None, str | None]:
    """(role segment or None for a transparent module, context for its children or None to stop)."""
    cls = type(child).__name__
    if ctx in ("top",):
        if name in _LAYER_LISTS and isinstance(child, nn.ModuleList):
            return "layers", "layers"
        if name in _EMBED and isinstance(child, nn.Embedding):
            return "embed", None
        if name in _HEAD:
            return _head_role(child)
        if name in _STACKS:
            return name, "top"
        if _is_norm(name, child):
            return "norm", None
        return None, "top"
    if ctx == "head":
        return _head_role(child)
    if ctx == "layers":
        return (name, "layer") if name.isdigit() else (None, None)
    if ctx == "layer":
        if name in _CROSS or "Cross" in cls:
            return "cross_attn", "attn"
        if name in _ATTN or "Attention" in cls:
            return "attn", "attn"
        if name in _MLP or "MLP" in cls or cls.endswith(("FF", "FeedForward")):
            return "mlp", "mlp"
        if name == "intermediate":  # BERT splits its FFN in two modules
            return "mlp", "mlp_in"
        if name == "output" and cls.endswith("Output"):
            return "mlp", "mlp_out"
        if _is_norm(name, child):
            return "norm", None
        if isinstance(child, nn.ModuleList) or name.isdigit():  # T5 block.layer.N
            return None, "layer"
        return None, None
    if ctx == "attn":
        for role, names in _PROJ.items():
            if name in names and module_kind(child) in ("linear", "conv1d"):
                return role, None
        if name in _FUSED_QKV:
            return "qkv", None
        if "Attention" in cls or name in _ATTN or name in _CROSS:
            return None, "attn"
        if name == "output":
            return None, "attn"
        if _is_norm(name, child):
            return "norm", None
        return None, None
    if ctx in ("mlp", "mlp_in", "mlp_out"):
        if ctx == "mlp_in" and name == "dense":
            return "up", None
        if ctx == "mlp_out" and name == "dense":
            return "down", None
        for role, names in _FFN.items():
            if name in names and ctx == "mlp":
                return role, None
        if _is_norm(name, child):
            return "norm", None
        if name in _MLP or "MLP" in cls:
            return None, "mlp"
        return None, None
    return None, None


def _role_paths(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> role paths, walking the tree once with the context each module sits in."""
    found: dict[int, list[str]] = {}

    def walk(module: nn.Module, prefix: list[str], ctx: str) -> None:
        for name, child in module.named_children():
            if _added_by_surgeon(child):
                continue
            # a wrapper at this path takes the role of its original (the role is keyed by the
            # wrapper, the module that stands here)
            original = unwrap(child)
            segment, child_ctx = _child_role(name, original, ctx)
            path = prefix + [segment] if segment else prefix
            if segment:
                found.setdefault(id(child), []).append(".".join(path))
            if child_ctx:
                walk(original, path, child_ctx)

    walk(model, [], "top")
    return found


def _fused_slices(info: ModuleInfo, config: object | None) -> dict[str, tuple[int, int]]:
    width = info.out_features or 0
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if heads and head_dim and width == (heads + 2 * kv_heads) * head_dim:
        q, kv = heads * head_dim, kv_heads * head_dim
    elif width % 3 == 0:
        q = kv = width // 3
    else:
        return {}
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}


class ModuleGraph:
    """Modules and parameters of one model as a networkx DiGraph, with role lookups."""

    def __init__(self, model: nn.Module) -> None:
        self.graph = nx.DiGraph()
        self.modules: dict[str, ModuleInfo] = {}
        self.params: dict[str, ParamInfo] = {}
        self.config = getattr(model, "config", None)
        self._build(model)

    def _build(self, model: nn.Module) -> None:
        roles = _role_paths(model)
        modules = list(model.named_modules(remove_duplicate=False))  # walked once (a 70B model has 2k+)
        stands = _standing_paths(modules)
        paths_of: dict[int, list[str]] = {}
        param_names: dict[int, list[tuple[str, str]]] = {}  # id(param) -> [(owner path, local name)]
        for path, module in modules:
            if stands[path] == path:
                paths_of.setdefault(id(module), []).append(path)
            for local, param in module._parameters.items():
                if param is not None:
                    param_names.setdefault(id(param), []).append((path, local))
        by_id: dict[int, ParamInfo] = {}
        for path, module in modules:
            self._add_params(path, module, param_names, stands, by_id)
        for path, module in modules:
            if stands[path] != path:
                continue  # inside a wrapper (its `.base`) or added by a live patch: not a target
            same = paths_of[id(module)]
            original = unwrap(module)
            info = ModuleInfo(
                path=path,
                module=module,
                type_name=type(original).__name__,
                kind=module_kind(module),
                role_paths=tuple(roles.get(id(module), ())) if same[0] == path else (),
                aliases=tuple(p for p in same if p != path),
            )
            for local, param in original._parameters.items():
                if param is not None:
                    info.params[local] = by_id[id(param)]
            if _replacement_kind(original) is not None and "weight" not in info.params:
                info.params["weight"] = _replaced_weight(path, original, info.kind)
            if info.kind in ("linear", "conv1d") and any(r.endswith(".qkv") for r in info.role_paths):
                info.slices = _fused_slices(info, self.config)
            self.modules[path] = info
            self.graph.add_node(("module", path), type=info.type_name, kind=info.kind, roles=info.role_paths)
            if path:
                parent = path.rpartition(".")[0]
                self.graph.add_edge(("module", parent), ("module", path), kind="contains")

    def _add_params(self, path: str, module: nn.Module, param_names: dict[int, list[tuple[str, str]]],
                    stands: dict[str, str], by_id: dict[int, ParamInfo]) -> None:
        """Every tensor of the model counts (a live job's too); a hidden module's belong to the
        path that stands for it. `by_id` collects each parameter's info once."""
        for param in module._parameters.values():
            if param is None:
                continue
            pinfo = by_id.get(id(param))
            if pinfo is None:
                pinfo = by_id[id(param)] = self._param_info(param, param_names, stands)
            self.params.setdefault(pinfo.name, pinfo)
            self.graph.add_edge(("module", stands[path]), ("param", pinfo.name), kind="owns")

    @staticmethod
    def _param_info(param: nn.Parameter, param_names: dict[int, list[tuple[str, str]]],
                    stands: dict[str, str]) -> ParamInfo:
        """Named by its first owner's state-dict name; owners are the paths that stand for them
        (a wrapper's original `q_proj.base` is `q_proj`), so a wrapper is not tied to itself."""
        owners = param_names[id(param)]
        first, local = owners[0]
        name = f"{first}.{local}" if first else local
        standing = tuple(dict.fromkeys(stands[p] for p, _ in owners))
        return ParamInfo(name, tuple(param.shape), str(param.dtype).removeprefix("torch."), standing,
                         getattr(param, "_surgeon_merged", False))

    def candidates(self) -> Iterator[tuple[str, str, str | None]]:
        """(name to match, module path, slice) for every real path, role path and slice role path."""
        for path, info in self.modules.items():
            yield path, path, None
            for role_path in info.role_paths:
                yield role_path, path, None
                stem = role_path.rpartition(".")[0]
                for slice_name in info.slices:
                    yield f"{stem}.{slice_name}" if stem else slice_name, path, slice_name

    def tied_outside(self, path: str) -> list[str]:
        """Paths of other modules that hold a parameter of `path` (tied weights)."""
        others = []
        for pinfo in self.modules[path].params.values():
            others += [owner for owner in pinfo.owners if owner != path]
        return sorted(set(others))

    def total_parameters(self) -> int:
        return sum(_numel(p.shape) for p in self.params.values())

    def total_bytes(self) -> int:
        return sum(_numel(p.shape) * dtype_size(p.dtype) for p in self.params.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _standing_paths(modules: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Module path -> the path of the module that stands for it: itself, or for what sits inside a
    surgeon wrapper or replacement (`q_proj.base`, `q_proj.dropout`) or was added by a patch (a
    prompt encoder), the nearest enclosing path that the model's own module stood at."""
    stands: dict[str, str] = {}
    sealed: set[str] = set()  # wrappers and replacements: what is inside them is theirs
    for path, module in modules:  # parents come before their children
        parent = path.rpartition(".")[0] if path else None
        if parent is not None and (parent in sealed or stands[parent] != parent):
            stands[path] = parent if parent in sealed else stands[parent]
        elif parent is not None and _added_by_surgeon(module):
            stands[path] = parent
        else:
            stands[path] = path
            if wrapped(module) is not None or _replacement_kind(module) is not None:
                sealed.add(path)
    return stands


def _replaced_weight(path: str, layer: nn.Module, kind: str) -> ParamInfo:
    """The weight a replacement (QuantizedLinear) stands for, as the original held it: its shape
    (Conv1D stores it transposed) and dtype, for the shape checks of a method stacked on it."""
    out_features, in_features = layer.shape
    shape = (in_features, out_features) if kind == "conv1d" else (out_features, in_features)
    dtype = str(getattr(layer, "original_dtype", torch.float32)).removeprefix("torch.")
    return ParamInfo(f"{path}.weight", tuple(shape), dtype, (path,))


def build_module_graph(model: nn.Module) -> ModuleGraph:
    """Stage entry: the module graph of `model` (no tensor is read)."""
    return ModuleGraph(model)


def dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype), device="meta").element_size()
