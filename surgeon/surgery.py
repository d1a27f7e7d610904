"""Stage 3: Plan + model -> patched model + Manifest. Rolls back whatever it patched if a step fails."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

from surgeon.errors import ModelLoadError, SurgeonError, SurgeryError
from surgeon.graph import wrapped
from surgeon.progress import track
from surgeon.manifest import Manifest, OriginalsRef, PatchRecord, SourceRef, TensorRecord, tensor_record
from surgeon.methods.base import ApplyContext, Patch
from surgeon.planner import Plan, Rewrite, method_of, params_of
from surgeon.transaction import Snapshot


@dataclass
class Surgery:
    """A live patched model: the patches (which can undo themselves) and what revert must restore."""

    model: nn.Module
    plan: Plan
    patches: list[tuple[Rewrite, Patch]]
    manifest: Manifest
    base_originals: dict[str, torch.Tensor] = field(default_factory=dict)  # trained base params


@lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    found = {}
    for package in ("surgeon", "torch", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def fingerprint(model: nn.Module, hashed: set[str] | None) -> dict[str, TensorRecord]:
    """name, dtype and shape of every tensor; sha256 of those in `hashed` (None: all of them).

    hashlib releases the GIL on large buffers, so the tensors are hashed on every core at once."""
    tensors = model.state_dict(keep_vars=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        records = pool.map(lambda item: tensor_record(item[1], hashed is None or item[0] in hashed), tensors.items())
        records = track(records, "hashing tensors", total=len(tensors))
        return dict(zip(tensors, records))


def touched_tensor_names(model: nn.Module, plan: Plan) -> set[str]:
    """State-dict names of every tensor owned by a target module (tied aliases included); for a
    target that a live job wrapped, the original's inside the wrapper too (a second spec)."""
    targets: set[int] = set()
    for rewrite in plan.rewrites:
        module: nn.Module | None = model.get_submodule(rewrite.target.path)
        while module is not None:
            targets.add(id(module))
            module = wrapped(module)
    touched_ids = {id(p) for m in model.modules() if id(m) in targets for p in m.parameters(recurse=False)}
    return {name for name, t in model.state_dict(keep_vars=True).items() if id(t) in touched_ids}


def _record(rewrite: Rewrite, patch: Patch, original_class: str) -> PatchRecord:
    return PatchRecord(
        method=f"{rewrite.verb} {rewrite.method}",
        name=rewrite.label,
        target=rewrite.target.path,
        slices=rewrite.target.slices,
        params=rewrite.params,
        original_class=original_class,
        replacement_class=_class_name(getattr(patch, "wrapper", None)) if hasattr(patch, "wrapper") else None,
        added={name: tensor_record(p, hashed=False) for name, p in patch.added_parameters().items()},
        trained_base=sorted(patch.trained_base_parameters()),
    )


def rollback(model: nn.Module, patches: list[tuple[Rewrite, Patch]], trainable_before: set[str]) -> None:
    for _, patch in reversed(patches):
        patch.revert()
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable_before)


def _load_streaming(model: nn.Module, stream: Iterable[tuple[str, torch.Tensor]], hashed: set[str] | None,
                    on_module_loaded: Callable[[str], None],
                    device: str | torch.device | None = None) -> dict[str, TensorRecord]:
    """Fill a model whose parameters are on the meta device from (name, tensor) pairs, one at a time,
    hashing each as it is read (on the CPU) and moving it to `device`, and calling
    `on_module_loaded(path)` once a module has all its parameters, so a streaming rewrite
    (quantization) can replace them before the next one arrives."""
    state = model.state_dict(keep_vars=True)
    pending: dict[str, set[str]] = {}
    for path, module in model.named_modules():
        names = {n for n, p in module._parameters.items() if p is not None}
        if names:
            pending[path] = names
    prints: dict[str, TensorRecord] = {}
    for name, tensor in track(stream, "reading the checkpoint", total=len(state)):
        if name not in state:
            raise ModelLoadError(f"the checkpoint holds {name}, which the model does not have")
        path, _, local = name.rpartition(".")
        module = model.get_submodule(path)
        current = state[name]
        if tuple(current.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"the checkpoint's {name} is {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(current.shape)}")
        prints[name] = tensor_record(tensor, hashed is None or name in hashed)
        if device is not None:
            tensor = tensor.to(device)
        if local in module._parameters:
            torch.utils.swap_tensors(current, nn.Parameter(tensor, requires_grad=current.requires_grad))
            pending.get(path, set()).discard(local)
            if path in pending and not pending[path]:
                del pending[path]
                on_module_loaded(path)
        else:
            module._buffers[local] = tensor
    still_meta = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if still_meta:
        raise ModelLoadError(f"the checkpoint does not hold {', '.join(still_meta[:3])}")
    for name, tensor in model.state_dict(keep_vars=True).items():  # tied aliases, buffers made at init
        prints.setdefault(name, tensor_record(tensor, hashed is None or name in hashed))
    if device is not None:
        model.to(device)  # the buffers made at init (rotary frequencies, position ids)
    return {name: prints[name] for name in state}


def apply_plan(plan: Plan, model: nn.Module, *, source: SourceRef, ctx: ApplyContext | None = None,
               full_fingerprint: bool = False, stream: Iterable[tuple[str, torch.Tensor]] | None = None,
               originals_ref: OriginalsRef | None = None, device: str | torch.device | None = None) -> Surgery:
    """Stage entry: patch `model` in place following `plan`, or leave it exactly as it was.

    With `stream`, the model's parameters are on the meta device and arrive as (name, tensor)
    pairs, each moved to `device` when one is given; rewrites of streaming methods are applied as
    soon as their module is loaded, so peak memory stays near the patched model's size."""
    ctx = ctx or ApplyContext()
    touched = touched_tensor_names(model, plan)
    hashed = None if full_fingerprint else touched
    trainable_before = {name for name, p in model.named_parameters() if p.requires_grad}
    before = Snapshot(model)
    for param in model.parameters():
        param.requires_grad_(False)
    patches: list[tuple[Rewrite, Patch]] = []
    records: list[PatchRecord] = []
    done: set[int] = set()

    def apply_one(index: int) -> None:
        rewrite = plan.rewrites[index]
        original_class = _class_name(model.get_submodule(rewrite.target.path))
        patch = method_of(rewrite).apply(model, rewrite.target, params_of(rewrite), ctx)
        patches.append((rewrite, patch))
        records.append(_record(rewrite, patch, original_class))
        done.add(index)

    def on_module_loaded(path: str) -> None:
        for index, rewrite in enumerate(plan.rewrites):
            if rewrite.target.path == path and method_of(rewrite).streams and index not in done:
                apply_one(index)

    try:
        if stream is None:
            prints = fingerprint(model, hashed)
        else:
            prints = _load_streaming(model, stream, hashed, on_module_loaded, device)
        for index in track(range(len(plan.rewrites)), "patching", total=len(plan.rewrites)):
            if index not in done:
                apply_one(index)
    except BaseException as err:
        try:  # the patches undo what they did outside the model (rank budgets); the snapshot the rest
            rollback(model, patches, trainable_before)
        finally:
            before.restore()
        if isinstance(err, SurgeonError) or not isinstance(err, Exception):
            raise
        failed = plan.rewrites[min(len(patches), len(plan.rewrites) - 1)].target.path
        raise SurgeryError(f"patching {failed} failed ({type(err).__name__}: {err}); "
                           f"the {len(patches)} patches made before it were rolled back") from err
    base_originals = {}
    for _, patch in patches:
        for name, param in patch.trained_base_parameters().items():
            base_originals[name] = param.detach().clone()
    manifest = Manifest(
        spec_text=plan.spec.text,
        spec_source=plan.spec.source,
        spec_sha256=hashlib.sha256(plan.spec.text.encode()).hexdigest(),
        versions=_versions(),
        source=source,
        fingerprint=prints,
        fingerprint_full=full_fingerprint,
        trainable_before=sorted(trainable_before),
        patches=records,
        originals=originals_ref or OriginalsRef(),
    )
    return Surgery(model=model, plan=plan, patches=patches, manifest=manifest, base_originals=base_originals)
