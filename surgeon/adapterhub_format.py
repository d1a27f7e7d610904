"""AdapterHub interchange: a saved adapter directory of `adapters` 1.x (`save_adapter(dir, name,
use_safetensors=True)`: adapter_config.json + adapter.safetensors) as the spec statement that says
the same thing and the tensors under surgeon's names; and back (`export_adapterhub`, for
`surgeon export RUN --format adapterhub`).

A directory is untrusted input: only safetensors are read (`pytorch_adapter.bin`, the library's
default, is a pickle and is refused with how to re-save it), and every option of the config that
surgeon's `inject adapter` does not compute is refused by name rather than dropped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from surgeon.errors import ExportError
from surgeon.methods.data_path.adapter import AdapterParams, settings, site_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"

# AdapterHub's options at the values surgeon computes (anything else is refused by name)
_NEUTRAL = {"ln_before": False, "ln_after": False, "use_gating": False, "phm_layer": False,
            "inv_adapter": None, "cross_adapter": False, "dropout": 0.0,
            "stochastic_depth": 0.0, "residual_before_ln": True, "adapter_residual_before_ln": False,
            "original_ln_after": True}
# config name -> what makes it that config: (mh_adapter, output_adapter, is_parallel, original_ln_before)
_SHAPES = {(False, True, False, True): "pfeiffer", (True, True, False, False): "houlsby",
           (False, True, True, False): "parallel"}
_ACTS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu", "tanh": "tanh"}


def is_adapterhub_dir(folder: Path) -> bool:
    """An AdapterHub saved adapter (its config names the library's version), not a PEFT adapter."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("version", "")).startswith("adapters.")


FUSION_CONFIG_FILE = "adapter_fusion_config.json"
FUSION_WEIGHTS_FILE = "model_adapter_fusion.safetensors"
# AdapterFusion config keys -> the value surgeon's fusion computes; `value`, `temperature` and
# `regularization` choose between surgeon's settings (fusion_statement)
_FUSION_NEUTRAL = {"query": True, "key": True, "query_before_ln": False, "residual_before": False,
                   "value_before_softmax": True}


def fusion_folder(folder: Path) -> Path | None:
    """The folder holding an AdapterHub saved fusion: `folder` itself, or one of its sub-folders
    (the library's save_all_adapters layout: one folder per adapter, one per fusion)."""
    if (folder / FUSION_CONFIG_FILE).is_file():
        return folder
    found = sorted(p.parent for p in folder.glob(f"*/{FUSION_CONFIG_FILE}")) if folder.is_dir() else []
    if len(found) > 1:
        raise ExportError(f"{folder} holds {len(found)} AdapterHub fusions ({', '.join(p.name for p in found)}): "
                          "import one at a time (name its folder)")
    return found[0] if found else None


def read_fusion_dir(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Path]]:
    """(the fusion's saved config, its tensors, each fused adapter's folder): the adapters sit beside
    the fusion folder (or inside it), each in a folder of its name."""
    try:
        saved = json.loads((folder / FUSION_CONFIG_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / FUSION_WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as err:
        raise ExportError(f"cannot read the AdapterHub fusion in {folder}: {err}") from None
    names = saved.get("adapter_names") if isinstance(saved, dict) else None
    if not isinstance(names, list) or len(names) < 2 or not all(
            isinstance(n, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", n) for n in names):
        raise ExportError(f"{folder / FUSION_CONFIG_FILE} names no adapters surgeon can name (adapter_names: {names!r})")
    places: dict[str, Path] = {}
    for name in names:
        found = [p for p in (folder / name, folder.parent / name) if is_adapterhub_dir(p)]
        if not found:
            raise ExportError(f"the fusion fuses '{name}', but neither {folder / name} nor {folder.parent / name} "
                              "holds that AdapterHub adapter (save it with model.save_adapter beside the fusion)")
        places[name] = found[0]
    return saved, tensors, places


def fusion_statement(saved: dict[str, Any]) -> str:
    """`fuse adapters <a,b> ...` for an AdapterHub fusion config."""
    config = saved.get("config")
    if not isinstance(config, dict):
        raise ExportError(f"the AdapterHub fusion config has no 'config' ({sorted(saved)})")
    for key, neutral in _FUSION_NEUTRAL.items():
        if config.get(key, neutral) != neutral:
            raise ExportError(f"the AdapterHub fusion sets {key}={config[key]!r}, which surgeon's fusion does not "
                              f"compute (it computes {key}={neutral!r})")
    words = [f"fuse adapters <{','.join(saved['adapter_names'])}>"]
    if not config.get("value", True):
        words.append("config=static")
    if config.get("temperature"):
        words.append("temperature=true")
    if config.get("dropout_prob") is not None:
        words.append(f"dropout={float(config['dropout_prob'])!r}")
    if not config.get("regularization", True) and config.get("value", True):
        words.append("regularization=0")
    return " ".join(words)


def read_adapterhub_dir(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the saved config, the tensors) of an AdapterHub adapter directory."""
    if not (folder / WEIGHTS_FILE).is_file():
        if (folder / PICKLE_FILE).is_file():
            raise ExportError(f"{folder / PICKLE_FILE} is a pickle, which surgeon does not read (loading one can "
                              "run code); re-save the adapter with model.save_adapter(dir, name, "
                              "use_safetensors=True)")
        raise ExportError(f"{folder} holds no {WEIGHTS_FILE}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as err:
        raise ExportError(f"cannot read the AdapterHub adapter in {folder}: {err}") from None
    if not isinstance(config.get("config"), dict) or not isinstance(config.get("name"), str):
        raise ExportError(f"{folder / CONFIG_FILE} is not an AdapterHub adapter config (no 'config' and 'name')")
    return config, tensors


def statement_from_adapterhub(saved: dict[str, Any], layers: list[str] | None = None) -> str:
    """`inject adapter config=... reduction=... act=... scale=...` for a bottleneck adapter's config;
    its `leave_out` (indices into `layers`, the model's layers in the library's order) as `except`."""
    config = saved["config"]
    for key, neutral in _NEUTRAL.items():
        if config.get(key, neutral) != neutral:
            raise ExportError(f"the AdapterHub adapter sets {key}={config[key]!r}, which surgeon's adapters do not "
                              f"compute (they compute {key}={neutral!r})")
    shape = tuple(bool(config.get(k)) for k in ("mh_adapter", "output_adapter", "is_parallel", "original_ln_before"))
    if shape not in _SHAPES:
        raise ExportError("the AdapterHub adapter is not a seq_bn, double_seq_bn or par_bn bottleneck "
                          f"(mh_adapter, output_adapter, is_parallel, original_ln_before = {shape})")
    act = _ACTS.get(str(config.get("non_linearity", "")).lower())
    if act is None:
        raise ExportError(f"the AdapterHub adapter's non_linearity {config.get('non_linearity')!r} is not one surgeon "
                          f"has ({', '.join(sorted(set(_ACTS.values())))})")
    reduction = float(config.get("reduction_factor", 16))
    return (f"inject adapter config={_SHAPES[shape]} reduction={reduction!r} act={act} "
            f"scale={float(config.get('scaling', 1.0))!r}" + _left_out(config.get("leave_out", []), layers))


def _left_out(leave_out: Any, layers: list[str] | None) -> str:
    """` except LAYER` per layer AdapterHub's `leave_out` names (T5's decoder blocks come after the encoder's)."""
    if not leave_out:
        return ""
    count = len(layers or [])
    if not isinstance(leave_out, list) or not all(isinstance(i, int) and 0 <= i < count for i in leave_out):
        raise ExportError(f"the AdapterHub adapter's leave_out {leave_out!r} is not a list of layer indices of this "
                          f"model (0 to {count - 1})")
    if len(set(leave_out)) == count:
        raise ExportError("the AdapterHub adapter leaves out every layer of this model: there is nothing to import")
    return "".join(f" except {layers[i]}" for i in sorted(set(leave_out)))  # type: ignore[index]


def surgeon_name(name: str, adapter: str, named: bool = False) -> str:
    """AdapterHub's parameter name -> surgeon's (`<layer>.adapter_output.<the library's own names>`;
    `named`: the run's name of a named adapter, `<layer>[a].adapter_output[a]....`)."""
    tag = re.escape(adapter)
    patterns = (  # T5 first: its sub-layer index says attention (0) or feed-forward (the last)
        (rf"(.*\.block\.\d+)\.layer\.(\d+)\.adapters\.{tag}\.(.+)", lambda m: "attention" if m[2] == "0" else "output"),
        (rf"(.*)\.attention_adapters\.adapters\.{tag}\.(.+)", lambda m: "attention"),
        (rf"(.*)\.output_adapters\.adapters\.{tag}\.(.+)", lambda m: "output"),
        (rf"(.*)\.attention\.output\.adapters\.{tag}\.(.+)", lambda m: "attention"),
        (rf"(.*)\.output\.adapters\.{tag}\.(.+)", lambda m: "output"),
    )
    for pattern, site in patterns:
        match = re.fullmatch(pattern, name)
        if match:
            if named:
                return f"{match[1]}[{adapter}].adapter_{site(match)}[{adapter}].{match[match.re.groups]}"
            return f"{match[1]}.adapter_{site(match)}.{match[match.re.groups]}"
    raise ExportError(f"the AdapterHub adapter holds {name}, which is no bottleneck adapter tensor surgeon knows")


def surgeon_fusion_name(name: str, adapters: list[str], label: str | None = None) -> str:
    """AdapterHub's fusion tensor (`<layer>.output.adapter_fusion_layer.a,b.query.weight`) -> the
    run's name of `fuse adapters <a,b>` (as LABEL)."""
    tag = re.escape(",".join(adapters))
    match = re.fullmatch(rf"(.*)\.(?:output_adapters|output|layer\.\d+)\.adapter_fusion_layer\.{tag}\.(.+)", name)
    if match is None:
        raise ExportError(f"the AdapterHub fusion holds {name}, which is no fusion tensor of '{','.join(adapters)}'")
    layer = f"{match[1]}[{label}]" if label else match[1]
    return f"{layer}.adapter_fusion[{','.join(adapters)}].{match[2]}"


# --- Export: the inverse. A run of `inject adapter` statements becomes the directory that adapters
# 1.3.0's `model.save_adapter(dir, name, use_safetensors=True)` writes, which its
# `model.load_adapter(dir, use_safetensors=True)` loads with the run's outputs (checked by the library
# itself: tests/scripts/adapterhub/check_export.py, results in tests/data/adapterhub/export_check).

LIBRARY_VERSION = "adapters.1.3.0"  # the library's stamp on what it saves: the format written here
DEFAULT_NAME = "adapter"

# BnConfig.to_dict() of adapters 1.3.0, every key at the library's default (save_adapter writes them
# all); a config's own settings and the run's overwrite what they decide
_BN_BASE: dict[str, Any] = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": False, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
# surgeon's config -> what SeqBnConfig, DoubleSeqBnConfig, ParBnConfig set beyond BnConfig. init_weights
# stays the library's default: it only shapes a fresh add_adapter, a saved adapter brings its weights
_BN_CONFIGS: dict[str, dict[str, Any]] = {
    "pfeiffer": {"original_ln_before": True},
    "houlsby": {"mh_adapter": True},
    "parallel": {"is_parallel": True, "init_weights": "mam_adapter"},
}
# surgeon's activation -> the library's name. silu goes as swish: the library builds "swish" as
# nn.SiLU, surgeon's module for both (its "silu" is transformers' own SiLUActivation)
_LIBRARY_ACTS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu", "tanh": "tanh"}
# layer class -> where the library keeps that layer's adapters, below the layer's path: (attention
# site, output site); `{ff}` is T5's feed-forward sub-layer, the last. Only what adapters 1.3.0
# supports: it has no Qwen2, so a Qwen2 run is refused rather than written for a loader that has none
_LIBRARY_SITES = {
    "BertLayer": ("attention.output.adapters", "output.adapters"),
    "RobertaLayer": ("attention.output.adapters", "output.adapters"),
    "LlamaDecoderLayer": ("attention_adapters.adapters", "output_adapters.adapters"),
    "MistralDecoderLayer": ("attention_adapters.adapters", "output_adapters.adapters"),
    "GPT2Block": ("attention_adapters.adapters", "output_adapters.adapters"),
    "T5Block": ("layer.0.adapters", "layer.{ff}.adapters"),
}
_SURGEON_SITES = {"adapter_attention": 0, "adapter_output": 1}  # surgeon's module on the layer -> site


def export_adapterhub(patches: list[tuple[Any, Any]], out_dir: Path, model: nn.Module,
                      name: str = DEFAULT_NAME) -> dict[str, Any]:
    """Write a live surgery's (rewrite, patch) pairs as an AdapterHub saved adapter into `out_dir`
    (a fresh staging folder, which the caller swaps in); the config written. Everything is checked
    before anything is written, and what the library cannot hold is refused by name."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):  # the library puts it inside module paths
        raise ExportError(f"the AdapterHub adapter name {name!r} may hold only letters, digits, '_' and '-'")
    rewrites = _adapter_rewrites([rewrite for rewrite, _ in patches])
    config = bn_config(rewrites, model)
    adapted = {rewrite.target.path for rewrite in rewrites}
    config["leave_out"] = [index for path, index in library_layers(model).items() if path not in adapted]
    tensors: dict[str, torch.Tensor] = {}
    for rewrite, patch in patches:
        added = {local: p.detach().contiguous().cpu() for local, p in patch.added_parameters().items()}
        _check_size(rewrite, config, added)
        tensors |= {library_name(model, rewrite.target.path, local, name): t for local, t in added.items()}
    saved = saved_config(config, model, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    # as the library's json.dump(config, f, indent=2, sort_keys=True): its file byte for byte
    (out_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2, sort_keys=True), encoding="utf-8")
    return saved


def _adapter_rewrites(rewrites: list[Any]) -> list[Any]:
    """The `inject adapter` rewrites. Any other statement is refused: a saved adapter holds one
    bottleneck adapter and nothing else (AdapterDrop, too, is a forward setting there: skip_layers)."""
    others = sorted({f"'{r.verb} {r.method}' (statement {r.statement + 1})" for r in rewrites
                     if (r.verb, r.method) != ("inject", "adapter")})
    if others:
        raise ExportError("an AdapterHub saved adapter holds one bottleneck adapter (inject adapter) and nothing "
                          f"else; this run also has {', '.join(others)}, which cannot be exported to AdapterHub")
    if not rewrites:
        raise ExportError("the run adds no bottleneck adapter (inject adapter): nothing to export to AdapterHub")
    names = sorted({r.label or "(unnamed)" for r in rewrites})
    if len(names) > 1:
        raise ExportError(f"an AdapterHub saved adapter holds one adapter; this run has {', '.join(names)}: "
                          "save each in a run of its own to export it")
    return rewrites


def bn_config(rewrites: list[Any], model: nn.Module) -> dict[str, Any]:
    """The one BnConfig dict every statement's adapters are (leave_out still empty)."""
    found: dict[str, Any] | None = None
    for rewrite in rewrites:
        config = _statement_config(rewrite, model)
        if found is not None and config != found:
            changed = sorted(k for k in config if config[k] != found[k])
            raise ExportError(f"statement {rewrite.statement + 1} gives its adapters other settings ({', '.join(changed)}) "
                              "than an earlier one: an AdapterHub adapter has one config; export them as separate runs")
        found = config
    assert found is not None
    return found


def _statement_config(rewrite: Any, model: nn.Module) -> dict[str, Any]:
    params = AdapterParams(**rewrite.params)
    if rewrite.target.preposition in ("after", "beside"):
        raise ExportError(f"statement {rewrite.statement + 1} places its adapters explicitly ('{rewrite.target.preposition} "
                          "PATTERN'); an AdapterHub adapter is one of the config forms: write 'inject adapter "
                          "config=houlsby|pfeiffer|parallel [in LAYERS]' to export it")
    kind, hidden = rewrite.target.type_name, getattr(model.config, "hidden_size", None)
    if kind not in _LIBRARY_SITES:
        raise ExportError(f"{rewrite.target.path} is a {kind}: AdapterHub's adapters 1.3 has no adapters for it "
                          f"(it has them for {', '.join(sorted(_LIBRARY_SITES))})")
    if params.config not in _BN_CONFIGS:
        raise ExportError(f"inject adapter config={params.config} is not one AdapterHub bottleneck adapter "
                          f"(pfeiffer, houlsby and parallel are)")
    if not hidden or hidden != rewrite.target.hidden_size:
        raise ExportError(f"the model's config.hidden_size ({hidden}) is not the adapters' width "
                          f"({rewrite.target.hidden_size}), which the library takes from it")
    reduction, act, scale = settings(params)
    if params.size:
        reduction = _reduction_for(hidden, params.size)
    # reduction_factor 16, as the library writes its defaults; scaling always a JSON float: the library
    # reads anything else there as a mode name ("learned", "channel") and refuses an int
    factor = int(reduction) if float(reduction).is_integer() else reduction
    return _BN_BASE | _BN_CONFIGS[params.config] | {
        "non_linearity": _LIBRARY_ACTS[act], "reduction_factor": factor, "scaling": float(scale)}


def _reduction_for(hidden: int, size: int) -> float:
    """The reduction_factor with the fewest decimals for which the library's int(hidden // r) is
    `size` (10 for 6 at hidden 64, not 10.666666666666666): exact, readable, and what a reader
    that prints it to 6 digits (surgeon's import) reads back as the same bottleneck."""
    for digits in range(16):
        scale = 10 ** digits
        reduction = math.floor(hidden / size * scale) / scale  # the closest such value not above hidden / size
        if reduction > 0 and max(1, int(hidden // reduction)) == size:
            return reduction
    for reduction in (hidden / size, math.nextafter(hidden / size, 0.0)):  # rounding put hidden // r under size
        if max(1, int(hidden // reduction)) == size:
            return reduction
    raise ExportError(f"size={size}: no reduction_factor gives AdapterHub a bottleneck of {size} at hidden {hidden}")


def _check_size(rewrite: Any, config: dict[str, Any], added: dict[str, torch.Tensor]) -> None:
    """The tensors are the size the library will build from the config (else load_adapter fails)."""
    hidden = rewrite.target.hidden_size or 0
    expected = max(1, int(hidden // config["reduction_factor"]))
    for local, tensor in added.items():
        if local.endswith("adapter_down.0.weight") and tuple(tensor.shape) != (expected, hidden):
            raise ExportError(f"{rewrite.target.path}.{local} is {tuple(tensor.shape)}, but AdapterHub builds "
                              f"({expected}, {hidden}) from reduction_factor {config['reduction_factor']}")


def library_layers(model: nn.Module) -> dict[str, int]:
    """Every layer the library gives adapters, by path, with the index its leave_out counts.
    named_modules walks them in the library's order: 0..L-1, and on T5 the encoder's blocks before
    the decoder's, which the library numbers n_enc + i."""
    layers: dict[str, int] = {}
    for path, module in model.named_modules():
        if type(module).__name__ in _LIBRARY_SITES:
            layers[path] = len(layers)
    return layers


def library_name(model: nn.Module, layer_path: str, local: str, name: str) -> str:
    """surgeon's `<layer>.adapter_output.adapter_up.weight` -> the library's name for that tensor
    (the inverse of `surgeon_name`)."""
    site, _, rest = local.partition(".")
    layer = model.get_submodule(layer_path)
    where = _LIBRARY_SITES[type(layer).__name__][_SURGEON_SITES[site_of(site)]]
    ff = str(len(layer.layer) - 1) if "layer" in layer._modules else ""
    return f"{layer_path}.{where.format(ff=ff)}.{name}.{rest}"


def saved_config(config: dict[str, Any], model: nn.Module, name: str) -> dict[str, Any]:
    """adapter_config.json as the library's build_full_config writes it around the adapter config."""
    return {"config": config, "hidden_size": getattr(model.config, "hidden_size", None),
            "model_class": type(model).__name__, "model_name": model.config.name_or_path or "",
            "model_type": model.config.model_type, "name": name, "version": LIBRARY_VERSION}


def describe(saved: dict[str, Any]) -> str:
    """One line for the user: the library's config class, its settings, the layers left out."""
    config = saved["config"]
    shape = tuple(bool(config.get(k)) for k in ("mh_adapter", "output_adapter", "is_parallel", "original_ln_before"))
    classes = {"pfeiffer": "SeqBnConfig", "houlsby": "DoubleSeqBnConfig", "parallel": "ParBnConfig"}
    left = f", leave_out {config['leave_out']}" if config.get("leave_out") else ""
    return (f"{classes.get(_SHAPES.get(shape, ''), 'BnConfig')} (reduction_factor {config['reduction_factor']}, "
            f"{config['non_linearity']}, scaling {config['scaling']}{left})")
