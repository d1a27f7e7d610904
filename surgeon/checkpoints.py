"""Checkpoints are runs: while a job is live, whatever saves the model writes the run, not the base.

Training stacks save a model in two ways, and both are covered on the model instance (nothing
global, all undone when the last job on the model reverts):

- `model.save_pretrained(dir)` (Trainer.save_model, every `save_steps` checkpoint, TRL's trainers,
  the accelerate recipe `unwrap_model(model).save_pretrained`) is replaced by `save_checkpoint`:
  the run's files (manifest.json, spec.peft, adapters.safetensors), `model.safetensors` holding
  only the run's tensors under the live model's names (what Trainer's `resume_from_checkpoint`
  loads), and a `config.json` whose model type tells `from_pretrained` how to load the folder, so
  it fails with that message instead of building a silently re-initialised model.
- `model.state_dict()` (accelerate's `save_model` / `save_state`, Lightning, torch.save) holds the
  tensors a run trains or adds, not the frozen base; `state_dict(keep_vars=True)` (what surgeon
  and most model code use to inspect a model) still holds everything. Loading such a state dict
  back (`load_state_dict(sd, strict=True)`, accelerate's `load_state`) does not count the frozen
  base as missing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from surgeon.errors import ManifestError, SurgeonError
from surgeon.manifest import MANIFEST_FILE, Manifest, parse_manifest
from surgeon.seam import ModelSeam

if TYPE_CHECKING:
    from surgeon.job import Job

WEIGHTS_FILE = "model.safetensors"  # the name Trainer and accelerate resume from
CONFIG_FILE = "config.json"
LOAD_HINT = ("surgeon run (adapters only, not a whole model): load it with surgeon.load(this_folder, base_model), "
             "or write a merged model with `surgeon merge this_folder --out DIR`")
SEAM_ATTR = "_surgeon_checkpoint_seam"
# the state-dict entry holding the run's manifest (JSON bytes); '::' cannot be in a module path
RUN_KEY = "surgeon::manifest"


class CheckpointSeam(ModelSeam):
    """The hooks and the `save_pretrained` override on one model, shared by its live jobs."""

    attr = SEAM_ATTR

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.saving_whole = 0  # inside `whole_model(model)`
        # partials, not bound methods: torch marks the hooks it is given with an attribute
        self.handles = [model.register_state_dict_post_hook(partial(CheckpointSeam._keep_run_tensors, self)),
                        model.register_load_state_dict_post_hook(partial(CheckpointSeam._forgive_frozen, self))]
        if callable(getattr(model, "save_pretrained", None)):
            model.__dict__["save_pretrained"] = self.save_pretrained

    def fresh_state(self) -> dict[str, Any]:
        return {"saving_whole": 0}  # a copy saves and gives its state dict whole, as any model does

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.model.__dict__.pop("save_pretrained", None)
        super().remove()

    def run_tensor_names(self) -> set[str]:
        """Live state-dict names of what the runs hold: added and trained tensors, and anything
        else the user made trainable (it would be lost otherwise)."""
        ids = {id(p) for job in self.live for p in (*job.added_tensors().values(),
                                                      *job.trainable_parameters().values())}
        # base tensors a patch changed during training (ReLoRA's restarts fold into the base)
        changed = {t.data_ptr() for job in self.live for _, patch in job._surgery.patches
                   for t in patch.saved_state().values() if t.numel()}
        return {name for name, p in self.model.named_parameters(remove_duplicate=False)
                if p.requires_grad or id(p) in ids or (p.numel() and p.data_ptr() in changed)}

    def whole(self) -> bool:
        """Whether the model is saved whole: inside `whole_model`, or once every job is merged
        (a merged model is what people save to serve)."""
        return self.saving_whole > 0 or all(all(p.merged for p in job.manifest.patches) for job in self.live)

    def _keep_run_tensors(self, module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
        if self.whole() or any(isinstance(v, nn.Parameter) for v in state.values()):  # keep_vars=True: an inspection
            return
        kept = {prefix + name for name in self.run_tensor_names()}
        for key in [k for k in state if k.startswith(prefix) and k not in kept]:
            del state[key]
        if len(self.live) == 1:  # the manifest rides along: the saved state dict is a whole run
            state[prefix + RUN_KEY] = manifest_tensor(self.live[0])

    def _forgive_frozen(self, module: nn.Module, incompatible: Any) -> None:
        kept = self.run_tensor_names()
        frozen = {name for name in self.model.state_dict(keep_vars=True) if name not in kept}
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if _local(k, frozen) is None]
        incompatible.unexpected_keys[:] = [k for k in incompatible.unexpected_keys if not k.endswith(RUN_KEY)]

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any,
                        state_dict: dict[str, torch.Tensor] | None = None, is_main_process: bool = True,
                        push_to_hub: bool = False, **_ignored: Any) -> None:
        if self.whole():
            type(self.model).save_pretrained(self.model, save_directory, *args, state_dict=state_dict,
                                             is_main_process=is_main_process, push_to_hub=push_to_hub, **_ignored)
            return
        if push_to_hub:
            raise SurgeonError("a surgeon checkpoint is not pushed to a hub; push the folder yourself")
        if is_main_process:
            save_checkpoint(self._only_job(), Path(save_directory), state_dict)

    def _only_job(self) -> Job:
        jobs = self.live
        if len(jobs) != 1:
            raise SurgeonError(f"this model carries {len(jobs)} live surgeon jobs; save_pretrained writes one run: "
                               "save each with job.save(run_dir)")
        return jobs[0]


@contextmanager
def whole_model(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model.state_dict()` and `model.save_pretrained()` give the whole model
    (base weights included) though a job is live on it."""
    seam = model.__dict__.get(SEAM_ATTR)
    if not isinstance(seam, CheckpointSeam):
        yield model
        return
    seam.saving_whole += 1
    try:
        yield model
    finally:
        seam.saving_whole -= 1


def manifest_tensor(job: Job) -> torch.Tensor:
    text = job.checkpoint_manifest().sealed_json()
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def run_in_state(tensors: dict[str, torch.Tensor], where: Path) -> tuple[Manifest, dict[str, torch.Tensor]] | None:
    """(manifest, tensors by the live model's names) of a saved state dict that carries a run
    (accelerate's save_state / save_model, torch.save of model.state_dict()), or None."""
    keys = [k for k in tensors if k == RUN_KEY or k.endswith("." + RUN_KEY)]
    if not keys:
        return None
    if len(keys) > 1:
        raise ManifestError(f"{where} holds {len(keys)} surgeon manifests; a state dict of one patched model holds one")
    prefix = keys[0].removesuffix(RUN_KEY)
    blob = tensors[keys[0]]
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ManifestError(f"{where}: {keys[0]} is not a manifest (a 1-d uint8 tensor of JSON text)")
    try:
        text = bytes(blob.numpy()).decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{where}: {keys[0]} is not UTF-8 JSON text") from None
    run = {k.removeprefix(prefix): t for k, t in tensors.items() if k != keys[0] and k.startswith(prefix)}
    return parse_manifest(text, where), run


def _local(key: str, names: set[str]) -> str | None:
    """`key` as a name of the model (a parent module adds a prefix), if it is one of `names`."""
    while True:
        if key in names:
            return key
        if "." not in key:
            return None
        key = key.partition(".")[2]


def save_checkpoint(job: Job, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `job`'s run into `folder`, beside whatever a trainer keeps there (optimizer, scheduler,
    trainer state): each file is written aside and moved in, the manifest last, so a crash leaves
    the old run or a mismatch that reading the run detects (adapters.safetensors is hashed)."""
    _check_folder(job, folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".surgeon-checkpoint-", dir=folder))
    try:
        job.write_run(staging, copy_originals=False)
        save_file(_weights(job, state_dict), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(_config(job.model), indent=2) + "\n")
        names = sorted(p.name for p in staging.iterdir() if p.name != MANIFEST_FILE) + [MANIFEST_FILE]
        for name in names:
            os.replace(staging / name, folder / name)
    except OSError as problem:
        raise SurgeonError(f"cannot write a checkpoint into {folder}: {problem.strerror or problem}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _check_folder(job: Job, folder: Path) -> None:
    """Never write adapter-sized weights over a whole model (the base's own directory, say)."""
    source = job.manifest.source
    if source.kind == "hf" and source.location and folder.resolve() == Path(source.location).resolve():
        raise SurgeonError(f"{folder} is the directory the base model was read from; save the checkpoint elsewhere")
    if folder.is_file():
        raise SurgeonError(f"{folder} is a file, not a directory; choose another place to save")
    holds_model = (folder / WEIGHTS_FILE).is_file() or any(folder.glob("model*.safetensors.index.json"))
    if holds_model and not (folder / MANIFEST_FILE).is_file():
        raise SurgeonError(f"{folder} holds a whole model ({WEIGHTS_FILE}); a surgeon checkpoint there would "
                           "replace its weights by adapters: choose a new or empty directory")


def _weights(job: Job, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The run's tensors under the live model's names; values from the state dict a trainer
    passes (gathered from every rank), else from the model."""
    seam = job.model.__dict__.get(SEAM_ATTR)
    names = seam.run_tensor_names() if seam is not None else set()
    live = job.model.state_dict(keep_vars=True)
    given = state_dict or {}
    return {name: (given[name] if name in given else live[name]).detach().contiguous().cpu() for name in sorted(names)}


def _config(model: nn.Module) -> dict[str, Any]:
    """A config.json that `from_pretrained` refuses with LOAD_HINT (its model type is unknown to
    transformers); the base config is kept inside for reference."""
    config = getattr(model, "config", None)
    base = json.loads(config.to_json_string(use_diff=False)) if hasattr(config, "to_json_string") else {}
    return {"model_type": LOAD_HINT, "surgeon_base_config": base,
            "transformers_version": base.get("transformers_version")}
