"""`load adapters "RUN" as NAME [trainable=true]`: a saved run's statements and weights, brought
into a spec under a name, so a spec composes runs trained apart (AdapterFusion's second stage).

Before planning, each `load` statement is replaced in the spec text by the run's own statements,
each named NAME, under a comment saying where they came from: the planner never sees `load`, and
a run saved from the new spec holds everything itself (it does not need the loaded runs again).
After the apply, the loaded tensors are copied in; unless `trainable=true`, they are frozen (the
job's manifest lists the frozen names, and `trainable_parameters()` leaves them out).

A loaded run is untrusted input, read as `surgeon.load` reads a run: its manifest is verified, its
base must be the model being patched (the fingerprint), and its tensors must be exactly those of
its records. What a set of adapters cannot be is refused by name: a run that quantizes or trains
base tensors, one merged or folded, one holding several named adapters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from surgeon.errors import Location, ManifestError, SpecError
from surgeon.language import parse_spec
from surgeon.manifest import ADAPTER_FILE, Manifest, TensorRecord, read_manifest
from surgeon.planner import tensor_key
from surgeon.revert import check_tensors
from surgeon.spec import Spec, Statement

VERB = "load"
FORM = 'load adapters "RUN_DIR" as NAME [trainable=true]'


@dataclass(frozen=True)
class LoadedRun:
    """One `load` statement, read: the adapter name, whether it trains, and its tensors by
    `unnamed_key` (a named adapter's own names can hold its name: `adapter_output[nli]`)."""

    name: str
    trainable: bool
    directory: Path
    tensors: dict[str, torch.Tensor]


def expand_loads(spec: Spec, model: nn.Module) -> tuple[Spec, list[LoadedRun]]:
    """Stage entry: the spec with every `load` statement replaced by the run's statements, and the
    runs read. A spec without `load` comes back as it is."""
    loads = [statement for statement in spec.statements if statement.verb.text == VERB]
    if not loads:
        return spec, []
    source = Path(spec.source)
    base_dir = source.parent if source.is_file() else Path.cwd()  # relative to the spec file
    runs, pieces = [], []
    names = [s.name for s in spec.statements if s.verb.text != VERB and s.name]
    for statement in loads:
        text, run = _read_load(spec, statement, base_dir, model)
        if run.name in names:
            raise _error(spec, f"the name '{run.name}' is taken twice: by another statement or load", statement.location)
        names.append(run.name)
        runs.append(run)
        pieces.append((statement.location, text))
    return parse_spec(_splice(spec.text, pieces), spec.source), runs


def _error(spec: Spec, message: str, location: Location, hint: str | None = None) -> SpecError:
    return SpecError(message, source=spec.source, text=spec.text, location=location, hint=hint)


def _read_load(spec: Spec, statement: Statement, base_dir: Path, model: nn.Module) -> tuple[str, LoadedRun]:
    words = statement.words
    if len(words) != 2 or words[0].text != "adapters" or not words[1].quoted:
        where = words[0].location if words else statement.location
        raise _error(spec, "load takes a quoted run directory", where, FORM)
    unknown = [p for p in statement.params if p.key != "trainable"]
    if unknown or statement.clauses:
        where = unknown[0].location if unknown else statement.clauses[0].location
        raise _error(spec, "load takes no target and no parameter but trainable", where, FORM)
    trainable = next((p.value for p in statement.params), False)
    if not isinstance(trainable, bool):
        raise _error(spec, f"trainable is true or false, not {trainable!r}", statement.params[0].location)
    if not statement.name:
        raise _error(spec, "load needs a name for what it brings in", statement.location, FORM)
    directory = (base_dir / words[1].text) if not Path(words[1].text).is_absolute() else Path(words[1].text)
    try:
        manifest = read_manifest(directory)
        problem = check_tensors(model, _comparable(manifest, model))
        if problem:
            raise ManifestError(f"{directory} was trained on another base model: {problem}")
        statements = _statements(manifest, directory, statement.name)
        tensors = _tensors(manifest, directory)
    except ManifestError as err:
        raise _error(spec, str(err), words[1].location) from None
    comment = f"# {VERB} adapters {words[1].text!r} as {statement.name}: its statements, named {statement.name}"
    return "\n".join([comment, *statements]), LoadedRun(statement.name, trainable, directory, tensors)


def _comparable(manifest: Manifest, model: nn.Module) -> dict[str, TensorRecord]:
    """The run's fingerprint of its base; names, dtypes and shapes alone for a model without
    weights (`surgeon check` plans on the meta device)."""
    if any(p.device.type == "meta" for p in model.parameters()):
        return {name: record.model_copy(update={"sha256": None}) for name, record in manifest.fingerprint.items()}
    return manifest.fingerprint


def _statements(manifest: Manifest, directory: Path, name: str) -> list[str]:
    """The run's statements as its spec says them, each named `name`."""
    refusal = next((why for record in manifest.patches for why, found in (
        ("quantizes its base", record.method.startswith("quantize")),
        ("trains base tensors", bool(record.trained_base) or record.method.startswith("train ")),
        ("is merged", record.merged), ("is folded", record.folded)) if found), None)
    if refusal:
        raise ManifestError(f"{directory} {refusal}: load adapters brings in added adapters only (a run of "
                            "inject statements, unmerged)")
    labels = sorted({record.name for record in manifest.patches if record.name})
    if len(labels) > 1:
        raise ManifestError(f"{directory} holds several named adapters ({', '.join(labels)}): load one run per "
                            "adapter (save each apart)")
    run_spec = parse_spec(manifest.spec_text, str(directory / "spec.peft"))
    lines = manifest.spec_text.split("\n")
    said = []
    for statement in run_spec.statements:
        where = statement.location
        text = lines[where.line - 1][where.column - 1:(where.end_column or 0) - 1]
        said.append(re.sub(r"\s+as\s+[A-Za-z_][A-Za-z0-9_\-]*\s*$", "", text) + f" as {name}")
    return said


def _tensors(manifest: Manifest, directory: Path) -> dict[str, torch.Tensor]:
    """The run's added tensors, exactly its records', by `unnamed_key`."""
    try:
        stored = load_file(str(directory / ADAPTER_FILE))
    except (OSError, SafetensorError) as err:
        raise ManifestError(f"cannot read {directory / ADAPTER_FILE}: {err}") from None
    renamed: dict[str, torch.Tensor] = {}
    for record in manifest.patches:
        for local in record.added:
            key = tensor_key(record.target, record.name, local)
            if key not in stored:
                raise ManifestError(f"{directory / ADAPTER_FILE} lacks {key}, which its manifest records")
            renamed[unnamed_key(record.target, local)] = stored.pop(key)
    if stored:
        raise ManifestError(f"{directory / ADAPTER_FILE} holds {sorted(stored)[:3]}, which no patch of its manifest adds")
    return renamed


def unnamed_key(path: str, local: str) -> str:
    """A tensor's key with no adapter name in it, whatever the adapter was called."""
    return tensor_key(path, None, re.sub(r"\[[^\]]*\]", "", local))


def _splice(text: str, pieces: list[tuple[Location, str]]) -> str:
    """`text` with each statement at its location replaced (statements sit on one line each)."""
    lines = text.split("\n")
    for where, replacement in sorted(pieces, key=lambda p: (p[0].line, p[0].column), reverse=True):
        line = lines[where.line - 1]
        lines[where.line - 1] = line[:where.column - 1] + replacement + line[(where.end_column or len(line) + 1) - 1:]
    return "\n".join(lines)
