"""Hugging Face PEFT's adapter format, both ways: a surgeon run becomes an adapter directory
(`adapter_config.json` + `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads,
and a PEFT adapter directory becomes a surgeon run (spec, weights, manifest) that `surgeon.load`
applies.

The translation of parameters and tensor names lives with each method (the PEFT hooks of
`surgeon.methods.base.Method`); this module only groups statements into one PEFT config and moves
tensors. Quantize statements are not adapters: they are left out of the export (PEFT loads an
adapter onto whatever base it is given, a bitsandbytes-quantized one included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from surgeon.errors import ExportError
from surgeon.graph import build_module_graph
from surgeon.patterns import compile_pattern
from surgeon.methods.base import Method, MethodParams, Target, registry
from surgeon.planner import Rewrite, method_of, params_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PER_MODULE = {"r": "rank_pattern", "lora_alpha": "alpha_pattern", "alpha": "alpha_pattern"}  # what PEFT can vary by module


def export_peft(patches: list[tuple[Rewrite, Any]], out_dir: Path, base_model: str | None = None,
                model: nn.Module | None = None) -> dict[str, Any]:
    """Write the adapter directory for a live surgery's (rewrite, patch) pairs; the config written
    (of the unnamed statements, or of the first named adapter). Named adapters go one per
    sub-directory of their name, as PEFT's save_pretrained writes several adapters
    (`PeftModel.from_pretrained(base, out/"a", adapter_name="a")`, then `load_adapter(out/"b", "b")`);
    the unnamed statements, PEFT's "default" adapter, in `out_dir` itself. Everything is checked
    before anything is written."""
    adapters = [(r, p) for r, p in patches if method_of(r).verb != "quantize"]
    groups: dict[str | None, list[tuple[Rewrite, Any]]] = {}
    for rewrite, patch in adapters:
        groups.setdefault(rewrite.label, []).append((rewrite, patch))
    if len(groups) <= 1:
        return _export_one(adapters, out_dir, base_model, model)
    if "default" in groups:
        raise ExportError("an adapter named 'default' is PEFT's name for the unnamed statements: rename it to export")
    staged = {label: _export_one(group, None, base_model, model) for label, group in groups.items()}  # checks all
    for label, group in groups.items():
        _export_one(group, out_dir / label if label else out_dir, base_model, model)
    return staged[next(iter(groups))]


def _export_one(adapters: list[tuple[Rewrite, Any]], out_dir: Path | None, base_model: str | None,
                model: nn.Module | None) -> dict[str, Any]:
    """One PEFT adapter (one config) of `adapters` into `out_dir` (None: checked, not written)."""
    saved = [(r, p) for r, p in adapters if method_of(r).peft_scope == "modules_to_save"]
    adapters = [(r, p) for r, p in adapters if method_of(r).peft_scope != "modules_to_save"]
    if not adapters:
        raise ExportError("the run adds no adapter: there is nothing to export to PEFT" + (
            " (PEFT's modules_to_save, what train weights exports to, goes beside an adapter)" if saved else ""))
    if any(method_of(r).peft_scope == "model" for r, _ in adapters):
        if saved:
            raise ExportError("train weights beside a prompt-learning method is not exported to PEFT")
        return _export_prompt_learning(adapters, out_dir, base_model, model)
    config = _merged_config(adapters)
    tensors: dict[str, torch.Tensor] = {}
    targets = {r.target.path for r, _ in adapters}
    for rewrite, patch in adapters:
        method, params = method_of(rewrite), params_of(rewrite)
        added = {n: p.detach() for n, p in patch.added_parameters().items()}
        for name, tensor in method.to_peft_tensors(rewrite.target, params, added).items():
            tensors[f"{_PREFIX}{rewrite.target.path}.{name}"] = tensor
        for name, param in patch.trained_base_parameters().items():
            owner, _, leaf = name.rpartition(".")
            peft_name = f"{owner}.base_layer.{leaf}" if owner in targets else name
            tensors[_PREFIX + peft_name] = param.detach()
    saved_paths = _export_saved(saved, targets, model, tensors)
    config |= {"target_modules": sorted(targets), "base_model_name_or_path": base_model, "task_type": None,
               "inference_mode": True, "modules_to_save": _saved_names(saved_paths, model) if saved_paths else None}
    if model is not None:
        names = [name for name, _ in model.named_modules() if name]
        for key in ("target_modules", "feedforward_modules"):
            if isinstance(config.get(key), list):
                config[key] = _short_names(config[key], names)
    _write(out_dir, tensors, config)
    return config


def _write(out_dir: Path | None, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _export_saved(saved: list[tuple[Rewrite, Any]], targets: set[str], model: nn.Module | None,
                  tensors: dict[str, torch.Tensor]) -> list[str]:
    """The tensors of the modules `train weights` trained, as PEFT saves a module to save (under the
    module's own names, `classifier.weight`), into `tensors`; the modules' paths."""
    graph = build_module_graph(model) if model is not None and saved else None
    paths = []
    for rewrite, patch in saved:
        path, params = rewrite.target.path, params_of(rewrite)
        tied = graph.tied_outside(path) if graph is not None else (["another module"] if params.tied else [])
        if tied:
            raise ExportError(f"{path} shares its weights with {', '.join(tied)}: PEFT's modules_to_save trains a "
                              "copy of it, which unties them, while surgeon trained the shared tensor in place")
        inside = sorted(t for t in targets if t == path or t.startswith(path + "."))
        if inside:
            raise ExportError(f"{inside[0]} is adapted inside {path}, which train weights trains: PEFT's "
                              "modules_to_save would copy the adapter with it")
        trained = {n: p.detach() for n, p in patch.trained_base_parameters().items()}
        for local, tensor in method_of(rewrite).to_peft_tensors(rewrite.target, params, trained).items():
            tensors[f"{_PREFIX}{path}.{local}"] = tensor
        paths.append(path)
    return paths


def _saved_names(paths: list[str], model: nn.Module | None) -> list[str]:
    """`modules_to_save` as PEFT users write it: a module whose every tensor is saved stands for its
    layers (`classifier`, not `classifier.dense`, `classifier.out_proj`), and last names
    (`embed_tokens`, `norm`) where PEFT's own match (`name.endswith(entry)`) picks exactly them."""
    if model is None:
        return sorted(paths)
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    exported = {f"{p}.{local}" for p in paths for local, _ in model.get_submodule(p).named_parameters()}
    whole = set(paths)
    for name in sorted(names, key=lambda n: n.count(".")):  # outermost first
        module = model.get_submodule(name)
        held = {f"{name}.{key}" for key in module.state_dict(keep_vars=True)}
        if held and held <= exported and not any(name.startswith(w + ".") for w in whole if w != name):
            whole = {w for w in whole if not w.startswith(name + ".")} | {name}
    short = sorted({path.rsplit(".", 1)[-1] for path in whole})
    picked = {name for name in names if any(name.endswith(entry) for entry in short)}
    return short if picked == whole else sorted(whole)


def _export_prompt_learning(adapters: list[tuple[Rewrite, Any]], out_dir: Path | None, base_model: str | None,
                            model: nn.Module | None) -> dict[str, Any]:
    """PEFT's prompt learning: one statement, its tensors at the top level, a task type."""
    statements = {r.statement for r, _ in adapters}
    if len(statements) > 1:
        names = sorted({f"{r.verb} {r.method}" for r, _ in adapters})
        raise ExportError(f"a PEFT prompt-learning adapter holds one method; this run has {', '.join(names)}")
    first = adapters[0][0]
    method, params = method_of(first), params_of(first)
    if method.peft_type is None:
        raise ExportError(f"{method.verb} {method.name} has no PEFT equivalent")
    added = {f"{r.target.path}.{n}": t.detach() for r, p in adapters for n, t in p.added_parameters().items()}
    targets = [r.target for r, _ in adapters]
    tensors = method.to_peft_tensors(first.target, params, added)
    config = {"peft_type": method.peft_type} | method.peft_config(params) | method.peft_target_config(params, targets)
    config |= {"task_type": config.get("task_type") or _task_type(model), "base_model_name_or_path": base_model,
               "inference_mode": True}
    _write(out_dir, tensors, config)
    return config


def _task_type(model: nn.Module | None) -> str | None:
    """Which PeftModel class wraps the model: that decides how the prompt reaches it."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if getattr(config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def _short_names(paths: list[str], module_names: list[str]) -> list[str]:
    """The modules' last names when PEFT's suffix match over the model picks exactly `paths`."""
    short = sorted({path.rsplit(".", 1)[-1] for path in paths})
    picked = {m for m in module_names if any(m == n or m.endswith("." + n) for n in short)}
    return short if picked == set(paths) else sorted(paths)


def _merged_config(adapters: list[tuple[Rewrite, Any]]) -> dict[str, Any]:
    """One PEFT config for every statement: they must agree, but for what PEFT varies per module."""
    by_statement: dict[int, tuple[type[Method], MethodParams, list[Target]]] = {}
    for rewrite, _ in adapters:
        method = method_of(rewrite)
        if method.peft_type is None:
            raise ExportError(f"{method.verb} {method.name} (statement {rewrite.statement + 1}) has no PEFT equivalent")
        entry = by_statement.setdefault(rewrite.statement, (method, params_of(rewrite), []))
        entry[2].append(rewrite.target)
    types = {method.peft_type for method, _, _ in by_statement.values()}
    if len(types) > 1:
        raise ExportError(f"a PEFT adapter has one type; this run mixes {', '.join(sorted(t or '' for t in types))}")
    merged: dict[str, Any] = {"peft_type": types.pop()}
    for method, params, targets in by_statement.values():
        config = method.peft_config(params) | method.peft_target_config(params, targets)
        for key, value in config.items():
            _merge_entry(merged, key, value, [t.path for t in targets])
    return merged


def _merge_entry(merged: dict[str, Any], key: str, value: Any, paths: list[str]) -> None:
    if isinstance(value, list) and isinstance(merged.get(key), list):  # e.g. feedforward_modules
        merged[key] = sorted(set(merged[key]) | set(value))
    elif key not in merged:
        merged[key] = value
    elif merged[key] != value and key in _PER_MODULE:
        merged.setdefault(_PER_MODULE[key], {}).update({path: value for path in paths})
    elif merged[key] != value:
        raise ExportError(f"the statements disagree on PEFT's '{key}' ({merged[key]!r} vs {value!r}); "
                          "a PEFT adapter holds one value: export them as separate runs")


def read_peft_dir(peft_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path, weights_path = peft_dir / CONFIG_FILE, peft_dir / WEIGHTS_FILE
    if not config_path.is_file():
        raise ExportError(f"{peft_dir} has no {CONFIG_FILE}: not a PEFT adapter directory")
    if not weights_path.is_file():
        hint = " (adapter_model.bin is not read: convert it to safetensors)" if (peft_dir / "adapter_model.bin").is_file() else ""
        raise ExportError(f"{peft_dir} has no {WEIGHTS_FILE}{hint}")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except (ValueError, OSError, SafetensorError) as err:
        raise ExportError(f"cannot read the PEFT adapter in {peft_dir}: {err}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ExportError(f"{config_path} has no peft_type")
    return config, tensors


def spec_from_peft(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                   model: nn.Module) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """The spec that says what the adapter says, and the adapter's tensors by module path (PEFT names)."""
    candidates = [m for m in registry().values() if m.peft_type == config["peft_type"]]
    if not candidates:
        raise ExportError(f"PEFT type {config['peft_type']} has no surgeon method")
    if all(m.peft_scope == "model" for m in candidates):  # prompt learning: top-level tensors
        return candidates[0].statement_from_peft(config, []), {"": tensors}
    modules = {name for name, _ in model.named_modules() if name}
    saved, tensors = _split_saved(tensors, config.get("modules_to_save") or [], model)
    by_module = _tensors_by_module(tensors, modules)
    targets = sorted(path for path, found in by_module.items() if any(not n.startswith("base_layer.") for n in found))
    if not targets:
        raise ExportError("the PEFT adapter holds no tensors of a module of this model")
    saved_by_module = _tensors_by_module(saved, modules)
    extra = _saved_statement(config, sorted(saved_by_module), model) if saved_by_module else ""
    by_module |= saved_by_module
    reasons = []
    for method in candidates:
        try:
            statement = method.statement_from_peft(config, targets)
        except ExportError as err:
            reasons.append(f"{method.name}: {err}")
            continue
        names = config.get("target_modules")
        short = _shorter_targets(statement, names, model) if isinstance(names, list) else statement
        return _allow_ties(short, model) + extra, by_module
    raise ExportError("; ".join(reasons))


def _split_saved(tensors: dict[str, torch.Tensor], names: list[str],
                 model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tensors of the modules PEFT saves, the others). A module is saved when its path ends with
    an entry of `modules_to_save` (PEFT's own match, `name.endswith(entry)`)."""
    if isinstance(names, str):
        names = [names]
    roots = [path for path, _ in model.named_modules() if path and any(path.endswith(n) for n in names)]
    saved, rest = {}, {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PREFIX)
        inside = any(name.startswith(root + ".") for root in roots)
        (saved if inside else rest)[key] = tensor
    return saved, rest


def _saved_statement(config: dict[str, Any], paths: list[str], model: nn.Module) -> str:
    """The `train weights` line for the layers PEFT saves. PEFT trains a copy of a saved module, so
    one that shares a weight (a tied head) is untied there and cannot be said as training in place."""
    graph = build_module_graph(model)
    for path in paths:
        tied = graph.tied_outside(path)
        if tied:
            raise ExportError(f"the PEFT adapter saves {path}, which shares its weights with {', '.join(tied)}: PEFT "
                              "trains an untied copy, surgeon would train the shared tensor (not imported)")
    method = next(m for m in registry().values() if m.peft_scope == "modules_to_save")
    return "\n" + method.statement_from_peft(config, paths)


def _shorter_targets(statement: str, names: list[str], model: nn.Module) -> str:
    """`into <q_proj,v_proj>` (PEFT's own target_modules) instead of every full path, where those
    names match exactly the same modules of this model."""
    paths_of_model = [name for name, _ in model.named_modules() if name]
    lines = []
    for line in statement.splitlines():
        head, _, targets = line.partition(" into <")
        paths = set(targets.rstrip(">").split(",")) if targets else set()
        used = sorted(n for n in names if any(p == n or p.endswith("." + n) for p in paths))
        if used:
            pattern = compile_pattern(used[0] if len(used) == 1 else f"<{','.join(used)}>")
            if {p for p in paths_of_model if pattern.matches(p)} == paths:
                line = f"{head} into {pattern.text}"
        lines.append(line)
    return "\n".join(lines)


def _allow_ties(statement: str, model: nn.Module) -> str:
    """PEFT adapts a tied module (GPT-2's wte, tied to lm_head) without asking; surgeon's planner
    wants `tied=true` said: say it on the statements whose targets hold a tied weight."""
    graph = build_module_graph(model)
    lines = []
    for line in statement.splitlines():
        head, _, pattern_text = line.partition(" into ")
        pattern = compile_pattern(pattern_text) if pattern_text else None
        paths = [p for p in graph.modules if pattern is not None and pattern.matches(p)]
        if any(graph.tied_outside(path) for path in paths) and " tied=" not in head:
            line = f"{head} tied=true into {pattern_text}"
        lines.append(line)
    return "\n".join(lines)


def _tensors_by_module(tensors: dict[str, torch.Tensor], modules: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PREFIX)
        parts = name.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules), None)
        if owner is None:
            raise ExportError(f"the PEFT tensor {key} belongs to no module of this model (a different base model?)")
        found.setdefault(owner, {})[name[len(owner) + 1:]] = tensor
    return found


def fill_from_peft(patches: list[tuple[Rewrite, Any]], by_module: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy the adapter's tensors into a freshly applied surgery's added (and trained base) parameters."""
    if "" in by_module:  # prompt learning: top-level tensors for the statement's patches
        _fill_prompt_learning(patches, by_module[""])
        return
    with torch.no_grad():
        for rewrite, patch in patches:
            found = by_module.get(rewrite.target.path, {})
            own = {n: t for n, t in found.items() if not n.startswith("base_layer.")}
            method = method_of(rewrite)
            local = method.from_peft_tensors(rewrite.target, params_of(rewrite), own)
            saves = method.peft_scope == "modules_to_save"  # the module's own tensors, by model name
            added = patch.trained_base_parameters() if saves else patch.added_parameters()
            lacking = sorted(set(added) - set(local)) if saves else []
            if lacking:
                raise ExportError(f"the PEFT adapter saves {rewrite.target.path} without {lacking[0]}")
            for name, tensor in local.items():
                label = name if saves else f"{rewrite.target.path}.{name}"
                if name not in added or added[name].shape != tensor.shape:
                    shape = tuple(added[name].shape) if name in added else None
                    raise ExportError(f"the PEFT tensor for {label} is {tuple(tensor.shape)}, surgeon expects {shape}")
                added[name].copy_(tensor)
            for name, param in patch.trained_base_parameters().items():
                leaf = name.rpartition(".")[2]
                if f"base_layer.{leaf}" in found:
                    param.copy_(found[f"base_layer.{leaf}"])


def _fill_prompt_learning(patches: list[tuple[Rewrite, Any]], tensors: dict[str, torch.Tensor]) -> None:
    first = patches[0][0]
    local = method_of(first).from_peft_tensors(first.target, params_of(first), tensors)
    added = {f"{r.target.path}.{n}": t for r, p in patches for n, t in p.added_parameters().items()}
    with torch.no_grad():
        for name, tensor in local.items():
            if name not in added or added[name].shape != tensor.shape:
                shape = tuple(added[name].shape) if name in added else None
                raise ExportError(f"the PEFT tensor for {name} is {tuple(tensor.shape)}, surgeon expects {shape}")
            added[name].copy_(tensor)
