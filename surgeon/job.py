"""The Python API: `surgeon.apply(spec, model)` -> Job; `surgeon.load(run_dir, model)` -> Job."""

from __future__ import annotations

import hashlib
import io
import math
import re
import json
import shutil
import warnings
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from surgeon import checkpoints, mixed_batch
from surgeon.combine import LoraFactors, Settings, check_settings, combine_module, effective
from surgeon.adapterhub_format import (export_adapterhub, library_layers, read_adapterhub_dir,
                                       statement_from_adapterhub)
from surgeon.adapterhub_format import fusion_statement, read_fusion_dir, surgeon_fusion_name
from surgeon.adapterhub_format import surgeon_name as adapterhub_name
from surgeon.errors import ExportError, ManifestError, PlanError, RevertError, SurgeonError, did_you_mean
from surgeon.files import write_dir
from surgeon.graph import build_module_graph
from surgeon.language import parse_spec, read_spec_text
from surgeon.loads import LoadedRun, expand_loads, unnamed_key
from surgeon.manifest import (ADAPTER_FILE, MANIFEST_FILE, ORIGINALS_DIR, STATE_PREFIX, TRAINED_BASE_PREFIX, Manifest,
                              OriginalsRef, PatchRecord, SourceRef, originals_folder, read_manifest, sha256_file,
                              tensor_record)
from surgeon.methods.base import ApplyContext, Patch
from surgeon.models import (checkpoint_matches, load_model, load_model_skeleton, resolve_device, source_of,
                            stream_checkpoint)
from surgeon.peft_format import export_peft, fill_from_peft, read_peft_dir, spec_from_peft
from surgeon.originals import CheckpointOriginals, Originals, SpilledOriginals, originals_for
from surgeon.planner import LivePatch, Plan, Rewrite, method_of, params_of, plan
from surgeon.progress import working
from surgeon.revert import check_tensors, revert_surgery
from surgeon.spec import Spec
from surgeon.steps import StepDriver, has_per_step_methods
from surgeon.surgery import Surgery, apply_plan, touched_tensor_names
from surgeon.report import plan_summary, print_plan
from surgeon.transaction import Snapshot, transaction


class Job:
    """A patched model and everything needed to train, save, merge and revert it."""

    def __init__(self, surgery: Surgery, scratch: Path | None = None) -> None:
        self._surgery = surgery
        self._reverted = False
        # a temporary folder of spilled originals lives as long as the job needs it: removed on
        # revert, when the job is garbage-collected, or at exit (`save` copies it into the run)
        self._scratch = weakref.finalize(self, shutil.rmtree, str(scratch), True) if scratch else None
        _LIVE.setdefault(surgery.model, []).append(weakref.ref(self))
        checkpoints.CheckpointSeam.enlist(self)
        if self.adapter_names():
            mixed_batch.MixedBatchSeam.enlist(self)
        patches = [patch for _, patch in surgery.patches]
        self._steps = StepDriver(self) if has_per_step_methods(patches) else None

    @property
    def model(self) -> nn.Module:
        return self._surgery.model

    @property
    def plan(self) -> Plan:
        return self._surgery.plan

    @property
    def manifest(self) -> Manifest:
        return self._surgery.manifest

    def _live(self) -> Surgery:
        if self._reverted:
            raise SurgeonError("this job was reverted; apply the spec again to patch the model")
        return self._surgery

    def adapter_names(self) -> list[str]:
        """The adapters the spec named (`... as NAME`), in spec order."""
        return list(dict.fromkeys(r.label for r, _ in self._live().patches if r.label))

    @property
    def _inactive(self) -> set[str]:
        return set(self.manifest.inactive)

    def active_adapters(self) -> list[str]:
        return [name for name in self.adapter_names() if name not in self._inactive]

    def activate(self, names: str | list[str] | dict[str, float] | None) -> None:
        """Only the named adapters in `names` act (None or []: none of them, so a spec of named
        statements computes the base model's outputs bit for bit); unnamed statements always act.
        `{name: weight}`: those act, each adapter's change scaled by its weight; with weights
        summing to 1, each adapted layer puts out the weighted average of its outputs under each
        adapter alone (AdapterHub's Average), and other weights scale the changes (0.5: half a
        LoRA). Weights apply to weight deltas (LoRA, LoHa, LoKr). Switching moves no tensor and
        re-initialises nothing; `trainable_parameters()` then holds only what is active. All or
        nothing: on error nothing changes."""
        weights = self._wanted(names)
        surgery = self._live()
        old = dict(self.manifest.weights)
        changes = [(r, p, r.label in weights, weights.get(r.label, 1.0)) for r, p in surgery.patches if r.label]
        done: list[tuple[Patch, bool, float]] = []
        said = ""
        try:
            for rewrite, patch, on, weight in changes:
                said = f"adapter '{rewrite.label}' ('{rewrite.verb} {rewrite.method}' on {rewrite.target.path})"
                before = (rewrite.label not in self._inactive, old.get(rewrite.label, 1.0))
                if before[1] != weight:
                    patch.set_weight(weight)
                    done.append((patch, True, before[1]))
                if before[0] != on:
                    patch.set_active(on)
                    done.append((patch, False, float(before[0])))
        except PlanError as err:
            for undone, weighted, value in reversed(done):
                undone.set_weight(value) if weighted else undone.set_active(bool(value))
            raise SurgeonError(f"{said}: {err}") from None
        surgery.manifest = self.manifest.model_copy(update={
            "inactive": sorted(set(self.adapter_names()) - set(weights)),
            "weights": {name: weight for name, weight in weights.items() if weight != 1.0}})

    def _wanted(self, names: Any) -> dict[str, float]:
        """`activate`'s argument as {name: weight}, checked."""
        if isinstance(names, dict):
            if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for k, v in names.items()):
                raise SurgeonError(f"activate's weights are {{adapter name: finite number}}, not {names!r}")
            weights = {name: float(weight) for name, weight in names.items()}
        else:
            listed = [names] if isinstance(names, str) else list(names) if isinstance(names, (list, tuple)) else \
                [] if names is None else [names]
            if not all(isinstance(name, str) for name in listed):
                raise SurgeonError(f"activate takes an adapter name, a list of names, {{name: weight}} or None, "
                                   f"not {names!r}")
            weights = {name: 1.0 for name in listed}
        known = self.adapter_names()
        for name in weights:
            if name not in known:
                raise SurgeonError(f"no adapter named '{name}' in this job; "
                                   f"{did_you_mean(name, known) or 'its adapters: ' + (', '.join(known) or 'none')}")
        return weights

    def _activation(self) -> dict[str, float]:
        """What is active now, with its weights (what `activate` takes back)."""
        return {name: self.manifest.weights.get(name, 1.0) for name in self.active_adapters()}

    @contextmanager
    def active(self, names: str | list[str] | dict[str, float] | None) -> Iterator[nn.Module]:
        """`with job.active("a"): ...`: only those adapters inside the block, the previous ones after it."""
        before = self._activation()
        self.activate(names)
        try:
            yield self.model
        finally:
            self.activate(before)

    def combine(self, weights: dict[str, float], combination: str = "svd", name: str | None = None, *,
                density: float | None = None, majority_sign_method: Literal["total", "frequency"] = "total",
                svd_rank: int | None = None, svd_clamp: float | None = None, seed: int | None = None) -> str:
        """A new named LoRA adapter combining named LoRA adapters, `{name: weight}`, as PEFT's
        `add_weighted_adapter` makes it (every combination type of PEFT; surgeon/combine.py). It
        joins this job switched off, as PEFT adds it: `job.activate(name)` to use it. Its
        statement joins the spec (written out with the paths it covers), so a saved run holds
        it. `seed` seeds the DARE draws (None: torch's global RNG). Nothing changes on error.
        Returns the new adapter's name (default: the names joined by '_')."""
        surgery = self._live()
        name = name or "_".join(weights)
        factors, first = self._lora_factors(weights, name)
        settings = Settings(effective(combination, len(weights)), density, majority_sign_method, svd_rank, svd_clamp)
        rank = check_settings(settings, [next(iter(f.values())).rank for f in factors.values()])
        paths = [path for path, _ in surgery.model.named_modules() if any(path in f for f in factors.values())]
        options = "".join(f" {k}={v}" for k, v in (("dropout", first.dropout), ("rslora", "true" if first.rslora else ""))
                          if v)
        statement = f"inject lora r={rank} alpha={rank}{options} into <{','.join(paths)}> as {name}"
        described = ", ".join(f"{adapter} ({weight:g})" for adapter, weight in weights.items())
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        combined = {path: combine_module([(f[path], float(weights[adapter])) for adapter, f in factors.items()
                                          if path in f], rank, settings, generator) for path in paths}
        new = self._extend(f"# combined from {described} by {combination}\n{statement}")
        with torch.no_grad():
            for rewrite, patch in new:
                a, b = combined[rewrite.target.path]
                added = patch.added_parameters()
                added["lora_A"].copy_(a)
                added["lora_B"].copy_(b)
                patch.set_active(False)
        surgery.manifest = self.manifest.model_copy(update={"inactive": sorted({*self._inactive, name})})
        return name

    def _lora_factors(self, weights: dict[str, float], name: str) -> tuple[dict[str, dict[str, LoraFactors]], Any]:
        """Per adapter named in `weights`: module path -> its LoRA there; and the first one's params."""
        if not isinstance(weights, dict) or not weights or not all(
                isinstance(k, str) and isinstance(v, (int, float)) for k, v in weights.items()):
            raise SurgeonError("combine takes {adapter name: weight, ...} (at least one)")
        known = self.adapter_names()
        for adapter in weights:
            if adapter not in known:
                raise SurgeonError(f"no adapter named '{adapter}' in this job; "
                                   f"{did_you_mean(adapter, known) or 'its adapters: ' + (', '.join(known) or 'none')}")
        if name in known:
            raise SurgeonError(f"an adapter named '{name}' is already in this job: give the combination another name")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
            raise SurgeonError(f"{name!r} cannot name an adapter: a name is a word (letters, digits, '_', '-')")
        if any(record.merged for record in self.manifest.patches):
            raise SurgeonError("this job is merged: revert it (or load the run again) to combine its adapters")
        factors: dict[str, dict[str, LoraFactors]] = {adapter: {} for adapter in weights}
        first: Any = None
        for rewrite, patch in self._live().patches:
            if rewrite.label not in weights:
                continue
            if (rewrite.verb, rewrite.method) != ("inject", "lora") or rewrite.target.slices or \
                    rewrite.target.kind not in ("linear", "conv1d", "embedding"):
                what = f"'{rewrite.verb} {rewrite.method}'" if rewrite.method != "lora" else (
                    f"LoRA on {'a slice of ' if rewrite.target.slices else 'the ' + rewrite.target.kind + ' '}"
                    f"{rewrite.target.path}")
                raise SurgeonError(f"adapter '{rewrite.label}' has {what}: combinations are of plain LoRA adapters "
                                   "on whole linear or embedding layers, as PEFT's add_weighted_adapter")
            params = params_of(rewrite)
            first = first or params
            added = patch.added_parameters()
            factors[rewrite.label][rewrite.target.path] = LoraFactors(added["lora_A"].detach(),
                                                                      added["lora_B"].detach(), params.scale)
        return factors, first

    def _extend(self, text: str) -> list[tuple[Rewrite, Patch]]:
        """Apply the statements of `text` to the live model as part of this job: its spec grows by
        them, its plan, patches and manifest too, as if the spec had said them from the start.
        They may only act on modules the job already touches (the base fingerprint stays whole)."""
        surgery = self._live()
        spec_text = self.manifest.spec_text.rstrip("\n") + "\n" + text + "\n"
        spec = parse_spec(spec_text, self.manifest.spec_source)
        full = plan(spec, build_module_graph(surgery.model))  # the graph sees through the job's wrappers
        old_count = len(self.plan.spec.statements)
        new_rewrites = tuple(r for r in full.rewrites if r.statement >= old_count)
        if {_key(r) for r in full.rewrites if r.statement < old_count} != {_key(r) for r in self.plan.rewrites}:
            raise SurgeonError("this job's spec plans differently on the live model; revert and apply the whole spec")
        touched = {r.target.path for r in self.plan.rewrites}
        outside = sorted({r.target.path for r in new_rewrites} - touched)
        if outside:
            raise SurgeonError(f"the new statements act on {outside[:3]}, which this job does not touch")
        flags = {p: p.requires_grad for p in surgery.model.parameters()}
        part = apply_plan(full.model_copy(update={"rewrites": new_rewrites}), surgery.model,
                          source=self.manifest.source, ctx=ApplyContext(init=False))
        for param, flag in flags.items():  # apply_plan froze everything but what it added
            param.requires_grad_(flag)
        surgery.plan = full.model_copy(update={"rewrites": (*self.plan.rewrites, *new_rewrites)})  # apply order
        surgery.patches += part.patches
        surgery.manifest = self.manifest.model_copy(update={
            "spec_text": spec_text, "spec_sha256": hashlib.sha256(spec_text.encode()).hexdigest(),
            "patches": [*self.manifest.patches, *part.manifest.patches]})
        return part.patches

    def added_tensors(self) -> dict[str, nn.Parameter]:
        """Every tensor the surgery added, by `target.local_name` (`target[NAME].local_name` for a
        named adapter), merged patches included."""
        return {rewrite.key(name): param
                for rewrite, patch in self._live().patches for name, param in patch.added_parameters().items()}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Only what the spec made trainable, by name: `torch.optim.AdamW(job.trainable_parameters().values())`."""
        found: dict[str, nn.Parameter] = {}
        for record, (rewrite, patch) in zip(self.manifest.patches, self._live().patches):
            if record.merged or rewrite.label in self._inactive or rewrite.label in self.manifest.frozen:
                continue
            found.update({rewrite.key(n): p for n, p in patch.added_parameters().items()})
            found.update(patch.trained_base_parameters())
        return found

    def step(self, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Explicit control of the methods that change during training (AdaLoRA allocates its
        rank budget, ReLoRA merges and restarts): call after each `optimizer.step()`. Without
        it, they act on every step of an optimizer that holds the job's parameters (see
        surgeon/steps.py); the first call hands the stepping over to you. A no-op for the others."""
        self._live()
        if self._steps is not None:
            self._steps.manual_steps = True
            if self._steps.last_automatic == global_step:  # this optimizer step was already taken care of
                self._steps.last_automatic = None
                return
        self._step_patches(global_step, optimizer)

    def _step_patches(self, global_step: int, optimizer: torch.optim.Optimizer | None) -> None:
        for _, patch in self._live().patches:
            patch.step(global_step, optimizer)

    def regularization(self) -> torch.Tensor:
        """The methods' loss terms, summed (AdaLoRA's orthogonality), for you to add to the loss;
        once you ask for it, surgeon no longer adds its gradient at each optimizer step. Zero
        when no method has one."""
        if self._steps is not None:
            self._steps.manual_regularization = True
        term = self._regularization_term()
        return torch.zeros(()) if term is None else term

    def _regularization_term(self) -> torch.Tensor | None:
        terms = [t for _, patch in self._live().patches if (t := patch.regularization()) is not None]
        if not terms:
            return None
        return torch.stack([t.to(terms[0].dtype).to(terms[0].device) for t in terms]).sum()

    @contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """Inside the block the model computes what it computed before apply, bit for bit, without
        a revert: adapters, prompts, prefixes and trained base tensors are set aside (the
        reference model of DPO, PEFT's `disable_adapter()`). A quantized base stays quantized, as
        in PEFT. On leaving, the very same objects are back; nothing done to the model inside
        the block survives it."""
        surgery = self._live()
        adapting = [patch for _, patch in surgery.patches if patch.adapts]
        trained = {name: p for patch in adapting for name, p in patch.trained_base_parameters().items()}
        snapshot = Snapshot(surgery.model, surgery.patches, values=tuple(trained.values()))
        try:
            with torch.no_grad():
                for patch in reversed(adapting):
                    patch.revert()
                for name, param in trained.items():
                    param.copy_(surgery.base_originals[name])
            yield surgery.model
        finally:
            snapshot.restore()

    def summary(self, as_dict: bool = False) -> str | dict[str, Any]:
        """What `surgeon check` prints for this job's plan: as text, or (`as_dict`) as `--json` gives it,
        with the live model's trainable and total parameter counts."""
        found = plan_summary(self.plan)
        params = {id(p): p for p in self.model.parameters()}.values()
        found["live"] = {"trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
                         "all_parameters": sum(p.numel() for p in params)}
        if as_dict:
            return found
        console = Console(file=io.StringIO(), width=120, color_system=None, highlight=False)
        print_plan(found, console)
        return console.file.getvalue()  # type: ignore[attr-defined]

    def print_trainable_parameters(self) -> None:
        """PEFT's one line: trainable params, all params, trainable share."""
        live = self.summary(as_dict=True)["live"]  # type: ignore[index]
        share = 100 * live["trainable_parameters"] / max(1, live["all_parameters"])
        print(f"trainable params: {live['trainable_parameters']:,} || all params: {live['all_parameters']:,} "
              f"|| trainable%: {share:.4f}")

    def optimizer(self, name: str = "adamw", **options: Any) -> torch.optim.Optimizer:
        """An optimizer over `trainable_parameters()`. "paged_adamw" is bitsandbytes' paged AdamW
        (optimizer state in CUDA managed memory, QLoRA's answer to memory spikes) on CUDA when
        bitsandbytes is installed; elsewhere it falls back to torch.optim.AdamW and says so once."""
        params = list(self.trainable_parameters().values())
        if name == "adamw":
            return torch.optim.AdamW(params, **options)
        if name != "paged_adamw":
            raise SurgeonError(f"unknown optimizer '{name}': use 'adamw' or 'paged_adamw'")
        on_cuda = bool(params) and params[0].device.type == "cuda"
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if on_cuda and bnb is not None:
            return bnb.optim.PagedAdamW(params, **options)
        _say_once("paged_adamw", "paged AdamW needs CUDA and bitsandbytes "
                  f"({'no CUDA parameters' if not on_cuda else 'bitsandbytes is not installed'}); "
                  "using torch.optim.AdamW")
        return torch.optim.AdamW(params, **options)

    def save(self, run_dir: str | Path, format: Literal["surgeon", "peft", "adapterhub"] = "surgeon") -> Path:
        """Write manifest.json and adapters.safetensors (the added and trained tensors) to run_dir;
        with format="peft", PEFT's adapter_config.json + adapter_model.safetensors instead, which
        `peft.PeftModel.from_pretrained(base, run_dir)` loads; with format="adapterhub", AdapterHub's
        adapter_config.json + adapter.safetensors, which `model.load_adapter(run_dir, use_safetensors=True)` loads.

        The directory is written beside and swapped in at once: a crash at any moment leaves the
        previous run or the new one. An existing directory is replaced only if it holds a run
        (or an adapter, for format="peft" or "adapterhub"); anything else there is refused."""
        surgery = self._live()
        run_dir = Path(run_dir)
        if format not in ("surgeon", "peft", "adapterhub"):
            raise SurgeonError(f"unknown format '{format}': use 'surgeon', 'peft' or 'adapterhub'")
        _check_replaceable(run_dir, MANIFEST_FILE if format == "surgeon" else "adapter_config.json")
        if format == "peft":
            source = self.manifest.source
            write_dir(run_dir, lambda staging: export_peft(surgery.patches, staging, source.location
                                                           if source.kind == "hf" else None, surgery.model))
            return run_dir
        if format == "adapterhub":
            write_dir(run_dir, lambda staging: export_adapterhub(surgery.patches, staging, surgery.model))
            return run_dir
        spilled = self.manifest.originals
        written = [self.manifest]
        write_dir(run_dir, lambda staging: written.append(self.write_run(staging, copy_originals=True)))
        surgery.manifest = written[-1].model_copy(update={"originals": spilled})
        return run_dir

    def write_run(self, folder: Path, copy_originals: bool) -> Manifest:
        """Write the run's files into `folder` (a fresh staging folder) and return the manifest
        written. Spilled originals are copied in, or (a training checkpoint, `copy_originals`
        False) left to be spilled again from the base model that `surgeon.load` is given."""
        tensors = self._tensors_to_save()
        spilled = self.manifest.originals
        spilled_dir = Path(spilled.location) if spilled.kind == "spilled" and spilled.location else None
        with working("writing the run"):
            save_file(tensors, str(folder / ADAPTER_FILE))
        (folder / "spec.peft").write_text(self.manifest.spec_text, encoding="utf-8")
        if spilled_dir is not None and spilled_dir.is_dir() and copy_originals:
            shutil.copytree(spilled_dir, folder / ORIGINALS_DIR)
            manifest = self.manifest.model_copy(update={"originals": spilled.model_copy(update={"location": ORIGINALS_DIR})})
        else:
            manifest = self.checkpoint_manifest()
        manifest = manifest.model_copy(update={"adapter_sha256": sha256_file(folder / ADAPTER_FILE)})
        manifest.write(folder)
        return manifest

    def checkpoint_manifest(self) -> Manifest:
        """The manifest as a training checkpoint records it: spilled originals are left to be
        spilled again from the base model `surgeon.load` is given (none when nothing was
        spilled), and no adapters file is named."""
        spilled = self.manifest.originals
        if spilled.kind != "spilled":
            return self.manifest.model_copy(update={"adapter_sha256": None})
        exists = bool(spilled.location) and Path(str(spilled.location)).is_dir()
        return self.manifest.model_copy(update={"adapter_sha256": None,
                                                "originals": OriginalsRef(kind="base" if exists else "none")})

    def _tensors_to_save(self) -> dict[str, torch.Tensor]:
        surgery = self._live()
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.added_tensors().items()}
        for index, (_, patch) in enumerate(surgery.patches):
            for name, param in patch.trained_base_parameters().items():
                tensors[TRAINED_BASE_PREFIX + name] = param.detach().contiguous().cpu()
            for name, tensor in patch.saved_state().items():
                tensors[f"{STATE_PREFIX}{index}::{name}"] = tensor.detach().contiguous().cpu()
        if any(t.device.type == "meta" for t in tensors.values()):
            raise SurgeonError("the model is on the meta device: there are no weights to save")
        return tensors

    def merge(self, requantize: bool = False) -> nn.Module:
        """Fold every delta into the base weights; the model becomes plain (with `requantize`,
        quantized layers are quantized again, the delta included). Revert stays exact."""
        surgery = self._live()
        if self._inactive:
            raise PlanError(f"adapters {sorted(self._inactive)} are switched off: merge folds every adapter in; "
                            "activate them all first (job.activate(job.adapter_names())), or merge only some inside "
                            "`with job.merged(names):`")
        self._check_mergeable(surgery.patches)
        with transaction(surgery.model, surgery.patches):
            for _, patch in surgery.patches:
                patch.merge()
            if requantize:
                for _, patch in surgery.patches:
                    patch.requantize()
        merged = [record.model_copy(update={"merged": True}) for record in self.manifest.patches]
        surgery.manifest = self.manifest.model_copy(update={"patches": merged})
        return self.model

    @contextmanager
    def merged(self, adapters: str | list[str] | dict[str, float], requantize: bool = False) -> Iterator[nn.Module]:
        """Inside the block the model holds `adapters` (and the unnamed statements) folded into its
        weights, weighted as a {name: weight} says, and no other named adapter: a stock model to
        save (`surgeon merge RUN --adapter NAME`). On leaving, the very same objects are back as
        they were, adapters switched as before; nothing done inside survives the block."""
        surgery = self._live()
        trained = {name: p for _, patch in surgery.patches for name, p in patch.trained_base_parameters().items()}
        snapshot = Snapshot(surgery, surgery.model, surgery.patches, values=tuple(trained.values()))
        try:
            self.activate(adapters)
            aside = [(r, p) for r, p in surgery.patches if r.label in self._inactive]
            with torch.no_grad():
                for _, patch in reversed(aside):
                    patch.revert()
                    for name, param in patch.trained_base_parameters().items():
                        param.copy_(surgery.base_originals[name])
            set_aside = {id(p) for _, p in aside}
            kept = [(r, p) for r, p in surgery.patches if id(p) not in set_aside]
            self._check_mergeable(kept)
            for _, patch in kept:
                patch.merge()
            if requantize:
                for _, patch in kept:
                    patch.requantize()
            yield surgery.model
        finally:
            snapshot.restore()

    def _check_mergeable(self, patches: list[tuple[Rewrite, Patch]]) -> None:
        stuck: dict[type, list[str]] = {}
        for rewrite, patch in patches:
            if not patch.mergeable:
                stuck.setdefault(method_of(rewrite), []).append(rewrite.target.path)
        if stuck:
            raise PlanError("cannot merge: " + "; ".join(
                f"'{method.verb} {method.name}' ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}) "
                f"is not mergeable: {method.unmergeable_because}" for method, paths in stuck.items()))

    def fold(self) -> nn.Module:
        """Replace training-time reparameterisations by the plain tensors they produce (prefix
        tuning's MLP by the prefix), outputs unchanged; `save()` then stores the folded tensors."""
        surgery = self._live()
        records = list(self.manifest.patches)
        with transaction(surgery.model, surgery.patches):
            for index, (_, patch) in enumerate(surgery.patches):
                if patch.fold():
                    added = {name: tensor_record(p, hashed=False) for name, p in patch.added_parameters().items()}
                    records[index] = records[index].model_copy(update={"folded": True, "added": added})
        if not any(r.folded for r in records):
            raise PlanError("nothing to fold: no method of this run has a reparameterisation")
        surgery.manifest = self.manifest.model_copy(update={"patches": records})
        return self.model

    def revert(self) -> nn.Module:
        """Give the original model back, bit-exact, verified against the manifest's fingerprint."""
        surgery = self._live()
        last = _live_jobs(surgery.model)[-1:]
        if last and last[0] is not self:
            first_line = last[0].manifest.spec_text.strip().splitlines()[0]
            raise RevertError(f"this model was patched again after this job (by '{first_line}'); revert that "
                              "job first: jobs on one model revert in the reverse order of their applies")
        model = revert_surgery(surgery)
        self._reverted = True
        checkpoints.CheckpointSeam.leave(self)
        mixed_batch.MixedBatchSeam.leave(self)
        if self._steps is not None:
            self._steps.remove()
        _LIVE[surgery.model] = [ref for ref in _LIVE[surgery.model] if ref() not in (None, self)]
        if self._scratch is not None:
            self._scratch()
        return model


# The jobs live on each model, in the order they were applied: they revert in the reverse order.
_LIVE: weakref.WeakKeyDictionary[nn.Module, list[weakref.ref[Job]]] = weakref.WeakKeyDictionary()


def _live_jobs(model: nn.Module) -> list[Job]:
    return [job for ref in _LIVE.get(model, []) if (job := ref()) is not None and not job._reverted]


def _check_replaceable(run_dir: Path, marker: str) -> None:
    """A save replaces a directory whole: only an empty one, or one holding what it writes."""
    if run_dir.is_file() or run_dir.is_symlink():
        raise SurgeonError(f"{run_dir} is a file, not a directory; choose another place to save")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / marker).is_file():
        raise SurgeonError(f"{run_dir} exists and holds something other than a saved run (no {marker}); "
                           "a save replaces the whole directory, so choose a new or empty one")


_SAID: set[str] = set()


def _say_once(key: str, message: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        warnings.warn(message, stacklevel=3)


def _spec_of(spec: str | Path | Spec) -> Spec:
    if isinstance(spec, Spec):
        return spec
    text, source = read_spec_text(spec)
    return parse_spec(text, source)


def check(spec: str | Path | Spec, model: nn.Module) -> Plan:
    """Parse and plan without changing anything; raises on any problem. On a model that live jobs
    patched, the new rewrites must stack on theirs (the planner says why not). The plan is of the
    spec with its `load adapters` statements replaced by the runs' statements."""
    return _check(expand_loads(_spec_of(spec), model)[0], model)


def _check(spec: Spec, model: nn.Module) -> Plan:
    return plan(spec, build_module_graph(model), live=_live_patches(model))


def _live_patches(model: nn.Module) -> list[LivePatch]:
    return [LivePatch.of(rewrite, job.plan.spec) for job in _live_jobs(model) for rewrite, _ in job._surgery.patches]


def _originals_for(source: SourceRef, spill_to: str | Path | None) -> tuple[Originals, OriginalsRef]:
    """Replaced originals are re-read from the source checkpoint when there is one, else spilled."""
    if source.kind == "hf" and source.location and spill_to is None:
        return CheckpointOriginals(source.location), OriginalsRef(kind="checkpoint", location=source.location)
    folder = Path(spill_to) if spill_to else Path(tempfile.gettempdir()) / f"surgeon-originals-{uuid.uuid4().hex[:12]}"
    return SpilledOriginals(folder), OriginalsRef(kind="spilled", location=str(folder.resolve()))


def apply(spec: str | Path | Spec, model: nn.Module, *, seed: int | None = None,
          source: SourceRef | None = None, full_fingerprint: bool = False,
          originals_dir: str | Path | None = None) -> Job:
    """Patch `model` in place as `spec` says (a .peft path or the spec text). Nothing changes on error.

    A lossy rewrite (quantization) first writes the tensors it replaces to `originals_dir` (default:
    a fresh folder in the temp directory; `job.save()` copies it into the run), unless `source`
    names the checkpoint they can be re-read from."""
    expanded, loaded = expand_loads(_spec_of(spec), model)
    the_plan = _check(expanded, model)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None  # the global RNG stays the caller's
    source = source or source_of(model, touched_tensor_names(model, the_plan), full_fingerprint)
    originals, ref = _originals_for(source, originals_dir)
    scratch = Path(originals.location) if originals_dir is None and isinstance(originals, SpilledOriginals) else None
    try:
        surgery = apply_plan(the_plan, model, source=source, ctx=ApplyContext(originals=originals, generator=generator),
                             full_fingerprint=full_fingerprint, originals_ref=ref)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    job = Job(surgery, scratch)
    if loaded:
        try:
            _fill_loaded(job, loaded)
        except BaseException:
            job.revert()
            raise
    return job


def _fill_loaded(job: Job, loaded: list[LoadedRun]) -> None:
    """The loaded runs' tensors copied in; the runs loaded without trainable=true frozen."""
    for run in loaded:
        mine = {unnamed_key(rewrite.target.path, local): param for rewrite, patch in job._live().patches
                if rewrite.label == run.name for local, param in patch.added_parameters().items()}
        if set(mine) != set(run.tensors):
            raise ManifestError(f"{run.directory} plans other tensors on this model than it holds: "
                                f"{sorted(set(mine) ^ set(run.tensors))[:3]}")
        _copy_checked(mine, run.tensors)
    frozen = sorted(run.name for run in loaded if not run.trainable)
    _freeze(job, frozen)


def _freeze(job: Job, names: list[str]) -> None:
    for rewrite, patch in job._live().patches:
        if rewrite.label in names:
            for param in patch.added_parameters().values():
                param.requires_grad_(False)
    job._surgery.manifest = job.manifest.model_copy(update={"frozen": names})


def apply_checkpoint(spec: str | Path | Spec, model_ref: str, *, seed: int | None = None,
                     checkpoint: str | None = None, full_fingerprint: bool = False,
                     device: str | torch.device | None = None) -> Job:
    """Load MODEL and apply `spec`, streaming the checkpoint tensor by tensor when the spec
    quantizes, so the full-precision model is never in memory at once. With `device` ("cuda"),
    each tensor moves there as it is read and is quantized there: the device never holds the
    full-precision model either."""
    device = resolve_device(device)
    spec = _spec_of(spec)
    if any(statement.verb.text == "load" for statement in spec.statements):  # a loaded run checks the real base
        model, source = load_model(model_ref, checkpoint=checkpoint)
        if device is not None:
            model.to(device)
        return apply(spec, model, seed=seed, source=source, full_fingerprint=full_fingerprint)
    skeleton, source = load_model(model_ref, checkpoint=checkpoint, meta=True)
    the_plan = plan(_spec_of(spec), build_module_graph(skeleton))
    streaming = any(method_of(r).streams for r in the_plan.rewrites)
    if source.kind != "hf" or not streaming or not checkpoint_matches(Path(model_ref), skeleton):
        model, source = load_model(model_ref, checkpoint=checkpoint)
        if device is not None:
            model.to(device)
        return apply(the_plan.spec, model, seed=seed, source=source, full_fingerprint=full_fingerprint)
    del skeleton
    generator = torch.Generator().manual_seed(seed) if seed is not None else None  # the global RNG stays the caller's
    model = load_model_skeleton(Path(model_ref))
    originals, ref = _originals_for(source, None)
    surgery = apply_plan(the_plan, model, source=source, ctx=ApplyContext(originals=originals, generator=generator),
                         full_fingerprint=full_fingerprint, stream=stream_checkpoint(Path(model_ref)),
                         originals_ref=ref, device=device)
    return Job(surgery)


def _read_adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(run_dir / ADAPTER_FILE))
    except (OSError, SafetensorError) as err:
        raise ManifestError(f"cannot read {run_dir / ADAPTER_FILE}: {err}") from None


def load(run_dir: str | Path, model: nn.Module, *, originals_from: str | Path | None = None) -> Job:
    """Re-apply a saved run to a fresh copy of its base model, weights included.

    The run is untrusted input: the plan is recomputed from its spec against `model`, and the
    manifest's patch records and the tensors in adapters.safetensors must be exactly what that
    plan makes; anything else is a ManifestError and the model is left as it was. Originals a run
    re-reads from its source checkpoint come from `originals_from` when given (the directory the
    model was loaded from), else from the directory the run records; they are checked by hash."""
    run_dir = Path(run_dir)
    manifest, tensors, live_names = _read_run(run_dir)
    problem = check_tensors(model, manifest.fingerprint)
    if problem:
        raise ManifestError(f"the model is not the base model of {run_dir}: {problem}")
    spec = parse_spec(manifest.spec_text, manifest.spec_source)
    ref = manifest.originals
    if ref.kind == "spilled":
        ref = ref.model_copy(update={"location": str(originals_folder(run_dir, manifest))})
    elif ref.kind == "checkpoint" and originals_from is not None:
        ref = ref.model_copy(update={"location": str(Path(originals_from).resolve())})
    scratch = None
    if ref.kind == "base":  # a training checkpoint: the model given holds the originals, spill them anew
        originals, ref = _originals_for(SourceRef(kind="memory"), None)
        scratch = Path(originals.location)
    else:
        originals = originals_for(ref.kind, ref.location)
    the_plan = _check(spec, model)
    _check_records(run_dir, manifest.patches, the_plan)
    try:
        surgery = apply_plan(the_plan, model, source=manifest.source, ctx=ApplyContext(init=False, originals=originals),
                             originals_ref=ref)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    job = Job(surgery, scratch)
    try:
        for record, (_, patch) in zip(manifest.patches, surgery.patches):
            if record.folded:  # the run holds the folded tensors: fold before filling them in
                patch.fold()
        (_fill_live if live_names else _fill)(job, tensors)
        _switch_off(job, manifest, run_dir)
        unknown = sorted(set(manifest.frozen) - set(job.adapter_names()))
        if unknown:
            raise ManifestError(f"{run_dir}: the manifest freezes {unknown}, which are no adapters of its spec")
        _freeze(job, list(manifest.frozen))
    except BaseException:
        job.revert()
        raise
    # the stored manifest, but this model's own requires_grad flags are what revert restores
    surgery.manifest = manifest.model_copy(update={"trainable_before": surgery.manifest.trainable_before,
                                                   "originals": ref})
    for record, (_, patch) in zip(manifest.patches, surgery.patches):
        if record.merged:
            patch.merge()
    return job


def _key(rewrite: Rewrite) -> tuple[str, str, str, str | None]:
    return rewrite.verb, rewrite.method, rewrite.target.path, rewrite.label


def _switch_off(job: Job, manifest: Manifest, run_dir: Path) -> None:
    """The named adapters the run was saved with switched off, switched off again; the weighted
    ones weighted again."""
    if not manifest.inactive and not manifest.weights:
        return
    names = job.adapter_names()
    for field, listed in (("switches off", manifest.inactive), ("weights", manifest.weights)):
        unknown = sorted(set(listed) - set(names))
        if unknown:
            raise ManifestError(f"{run_dir}: the manifest {field} {unknown}, which are no adapters of its spec")
    if manifest.inactive and any(record.merged for record in manifest.patches):
        raise ManifestError(f"{run_dir}: the manifest records merged patches and switched-off adapters at once")
    try:
        job.activate({name: manifest.weights.get(name, 1.0) for name in names if name not in manifest.inactive})
    except SurgeonError as err:
        raise ManifestError(f"{run_dir}: {err}") from None


def _read_run(path: Path) -> tuple[Manifest, dict[str, torch.Tensor], bool]:
    """(manifest, tensors, whether the tensors go by the live model's names) of a run directory,
    or of a saved state dict that carries a run: accelerate's save_state / save_model folder (its
    model.safetensors), or a .safetensors file of `model.state_dict()`."""
    file = path if path.is_file() else path / checkpoints.WEIGHTS_FILE
    if (path / MANIFEST_FILE).is_file() or not file.is_file() or file.suffix != ".safetensors":
        return read_manifest(path), _read_adapters(path), False
    try:
        found = checkpoints.run_in_state(load_file(str(file)), file)
    except (OSError, SafetensorError) as err:
        raise ManifestError(f"cannot read {file}: {err}") from None
    if found is None:
        raise ManifestError(f"{path} is neither a surgeon run ({MANIFEST_FILE}) nor a state dict saved from a "
                            "patched model (it carries no surgeon manifest)")
    manifest, tensors = found
    if manifest.originals.kind == "spilled":
        raise ManifestError(f"{file}: a state dict cannot hold spilled originals, but its manifest names some")
    return manifest, tensors, True


def _fill_live(job: Job, tensors: dict[str, torch.Tensor]) -> None:
    """Fill the run's tensors from a state dict keyed by the live model's names."""
    seam = job.model.__dict__[checkpoints.SEAM_ATTR]
    expected = seam.run_tensor_names()
    _exactly(expected, tensors, "the tensors given are not exactly the run's")
    params = dict(job.model.named_parameters(remove_duplicate=False))
    _copy_checked({name: params[name] for name in expected}, tensors)


def _copy_checked(targets: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in targets.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ManifestError(f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}")
            param.copy_(tensors[name].to(param.dtype))


def _check_records(run_dir: Path, records: list[PatchRecord], the_plan: Plan) -> None:
    """The manifest's patches must be the plan its own spec gives on this model, one for one (in
    any order: a streamed apply patches modules in checkpoint order)."""
    where = run_dir / MANIFEST_FILE
    planned = {(f"{r.verb} {r.method}", r.target.path, r.label): r for r in the_plan.rewrites}
    if len(records) != len(planned):
        raise ManifestError(f"{where} lists {len(records)} patches, but its spec plans {len(planned)} on this model")
    for index, record in enumerate(records):
        rewrite = planned.pop((record.method, record.target, record.name), None)
        if rewrite is None:
            raise ManifestError(f"{where}: patch {index} ('{record.method}' on '{record.target}') is not in the "
                                "plan its spec gives on this model")
        slices = {k: list(v) for k, v in rewrite.target.slices.items()}
        params = json.loads(json.dumps(rewrite.params, default=str))
        found = record.model_dump(mode="json", include={"slices", "params"})
        if found != {"slices": slices, "params": params}:
            raise ManifestError(f"{where}: patch {index} ({record.target}) records other slices or parameters "
                                "than its spec gives")
        if not record.folded and set(record.added) != set(rewrite.added):
            raise ManifestError(f"{where}: patch {index} ({record.target}) adds {sorted(record.added)}, but "
                                f"its spec adds {sorted(rewrite.added)}")


def import_peft(peft_dir: str | Path, model_ref: str, run_dir: str | Path | None = None,
                checkpoint: str | None = None) -> Job:
    """A PEFT adapter directory as a surgeon job on MODEL: the spec that says the same thing,
    applied, with the adapter's weights; saved as a run when `run_dir` is given."""
    peft_dir = Path(peft_dir)
    config, tensors = read_peft_dir(peft_dir)
    model, source = load_model(model_ref, checkpoint=checkpoint)
    statement, by_module = spec_from_peft(config, tensors, model)
    text = f"# imported from the PEFT adapter {peft_dir.resolve()}\n{statement}\n"
    job = apply(parse_spec(text, str(peft_dir / "adapter_config.json")), model, source=source)
    return _filled(job, lambda: fill_from_peft(job._live().patches, by_module), run_dir)


def import_adapterhub(folder: str | Path, model_ref: str, run_dir: str | Path | None = None,
                      checkpoint: str | None = None) -> Job:
    """An AdapterHub saved adapter directory as a surgeon job on MODEL: the `inject adapter`
    statement that computes the same thing, applied, with the adapter's weights."""
    folder = Path(folder)
    saved, tensors = read_adapterhub_dir(folder)
    named = {adapterhub_name(name, saved["name"]): tensor for name, tensor in tensors.items()}
    model, source = load_model(model_ref, checkpoint=checkpoint)
    statement = statement_from_adapterhub(saved, list(library_layers(model)))
    text = f"# imported from the AdapterHub adapter '{saved['name']}' in {folder.resolve()}\n{statement}\n"
    job = apply(parse_spec(text, str(folder / "adapter_config.json")), model, source=source)
    return _filled(job, lambda: _fill_live(job, named), run_dir)


def import_adapterhub_fusion(folder: Path, model_ref: str, run_dir: str | Path | None = None,
                             checkpoint: str | None = None) -> Job:
    """An AdapterHub saved fusion (`adapter_fusion_config.json` + `model_adapter_fusion.safetensors`,
    its adapters in folders of their names beside it) as a surgeon job on MODEL: the named
    `inject adapter` statements and the `fuse adapters` statement that compute the same thing."""
    saved, fusion_tensors, places = read_fusion_dir(folder)
    model, source = load_model(model_ref, checkpoint=checkpoint)
    layers = list(library_layers(model))
    lines = [f"# imported from the AdapterHub fusion '{saved.get('name')}' in {folder.resolve()}"]
    tensors: dict[str, torch.Tensor] = {}
    for name, place in places.items():
        adapter, weights = read_adapterhub_dir(place)
        if adapter["name"] != name:
            raise ExportError(f"{place} holds the adapter '{adapter['name']}', but the fusion fuses '{name}' there")
        lines.append(f"{statement_from_adapterhub(adapter, layers)} as {name}")
        tensors |= {adapterhub_name(key, name, named=True): t for key, t in weights.items()}
    lines.append(fusion_statement(saved))
    names = list(places)
    tensors |= {surgeon_fusion_name(key, names): t for key, t in fusion_tensors.items()}
    job = apply(parse_spec("\n".join(lines) + "\n", str(folder / "adapter_fusion_config.json")), model, source=source)

    def fill() -> None:
        targets = job.added_tensors()
        _exactly(targets, tensors, "the AdapterHub fusion's tensors are not the ones its configs make")
        _copy_checked(targets, tensors)

    return _filled(job, fill, run_dir)


def _filled(job: Job, fill: Callable[[], None], run_dir: str | Path | None) -> Job:
    """An imported job with its weights filled in by `fill` (reverted if that fails), saved as a
    run when `run_dir` is given."""
    try:
        fill()
    except Exception:
        job.revert()
        raise
    if run_dir is not None:
        job.save(run_dir)
    return job


def _fill(job: Job, tensors: dict[str, torch.Tensor]) -> None:
    states: dict[int, dict[str, torch.Tensor]] = {}
    patches = job._surgery.patches
    for key in [k for k in tensors if k.startswith(STATE_PREFIX)]:
        index, _, name = key.removeprefix(STATE_PREFIX).partition("::")
        if not index.isdigit() or int(index) >= len(patches) or not name:
            raise ManifestError(f"{ADAPTER_FILE} holds '{key}', which is no patch state of this run")
        states.setdefault(int(index), {})[name] = tensors.pop(key)
    for index, state in states.items():
        patches[index][1].load_saved_state(state)
    targets = job.added_tensors()
    for _, patch in patches:
        targets.update({TRAINED_BASE_PREFIX + n: p for n, p in patch.trained_base_parameters().items()})
    _exactly(targets, tensors, f"{ADAPTER_FILE} does not hold exactly the run's tensors")
    _copy_checked(targets, tensors)


def _exactly(expected: Iterable[str], given: Iterable[str], problem: str) -> None:
    """A ManifestError saying `problem` and what is missing and unexpected, unless the names agree."""
    expected, given = set(expected), set(given)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        listed = [f"{label} {names[:3]}" for label, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise ManifestError(f"{problem}: {'; '.join(listed)}")
