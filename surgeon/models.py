"""Loading and saving base models: a Hugging Face directory, or `package.module:factory`."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from surgeon.checkpoints import whole_model
from surgeon.errors import ModelLoadError
from surgeon.manifest import FileStamp, SourceRef
from surgeon.originals import checkpoint_index
from surgeon.progress import working


def _is_factory(ref: str) -> bool:
    return ":" in ref and not os.path.exists(ref)


def _hf_class(model_dir: Path) -> type:
    import transformers

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {err}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{model_dir / 'config.json'} is not a JSON object")
    names = config.get("architectures") or []
    for name in names if isinstance(names, list) else []:
        # only a model class: config.json is data and must not pick an arbitrary transformers callable
        found = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
            return found
    return transformers.AutoModel


def _load_factory(ref: str, checkpoint: str | None, meta: bool) -> nn.Module:
    """Import and call `package.module:factory`. Only ever for a factory the user named, never one
    a run directory names: importing runs code."""
    module_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ModelLoadError(f"cannot import model factory '{ref}': {err}") from None
    try:
        with torch.device("meta") if meta else torch.device("cpu"):
            model = factory()
    except Exception as err:  # the user's code: any failure is theirs to read, in one line
        raise ModelLoadError(f"calling the model factory '{ref}' failed ({type(err).__name__}: {err}); "
                             "a factory is called with no arguments and returns an nn.Module") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"'{ref}' returned a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint and not meta:
        try:
            state = load_file(checkpoint)
        except (OSError, SafetensorError) as err:
            raise ModelLoadError(f"cannot read checkpoint {checkpoint}: {err}") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"checkpoint {checkpoint} does not fit '{ref}': missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
    return model


# Weight files that are pickles: loading one can run arbitrary code, so surgeon reads none of them.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _refuse_pickles(model_dir: Path) -> None:
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise ModelLoadError(f"{model_dir / pickles[0]} is a pickle, which can run code when it is loaded; "
                             "surgeon reads only safetensors. Convert it (or move it out of the folder) first")


def _check_safetensors(model_dir: Path, required: bool) -> None:
    """Every safetensors file (and the shard index) is readable: a clear error before transformers
    meets a truncated or corrupt one. Planning on the meta device needs no weights (`required`)."""
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights and required:
        raise ModelLoadError(f"{model_dir} has no .safetensors weights")
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (OSError, SafetensorError, ValueError) as err:
            raise ModelLoadError(f"cannot read checkpoint {path}: not a valid safetensors file ({err})") from None
    if weights:
        checkpoint_index(model_dir)


def _load_hf(model_dir: Path, meta: bool) -> nn.Module:
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    cls = _hf_class(model_dir)
    _refuse_pickles(model_dir)
    _check_safetensors(model_dir, required=not meta)
    try:
        if meta:
            config = AutoConfig.from_pretrained(model_dir)
            with torch.device("meta"):
                return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        with working("reading the checkpoint"):
            return cls.from_pretrained(model_dir, dtype="auto", use_safetensors=True)
    except ModelLoadError:
        raise
    except (OSError, ValueError, SafetensorError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load the model in {model_dir}: {first}") from None


def _unset(buffer: torch.Tensor) -> torch.Tensor:
    """A CPU tensor like `buffer` that says "never computed": NaN, or the dtype's least integer."""
    if buffer.dtype.is_floating_point or buffer.dtype.is_complex:
        return torch.full_like(buffer, float("nan"), device="cpu")
    if buffer.dtype == torch.bool:
        return torch.zeros_like(buffer, device="cpu")
    return torch.full_like(buffer, torch.iinfo(buffer.dtype).min, device="cpu")


def _still_unset(buffer: torch.Tensor) -> bool:
    if buffer.numel() == 0 or buffer.dtype == torch.bool:
        return False  # nothing to tell apart
    if buffer.dtype.is_floating_point or buffer.dtype.is_complex:
        return bool(torch.isnan(buffer).all())
    return bool((buffer == torch.iinfo(buffer.dtype).min).all())


def _compute_buffers(model: nn.Module, held: set[str]) -> None:
    """Give the buffers of a model built on the meta device their real values, the way transformers'
    `from_pretrained` does after building on meta: every buffer comes off meta onto the CPU
    (`_move_missing_keys_from_meta_to_device`), the parameters are flagged `_is_hf_initialized`
    so initialisation passes over them, and the model's own `initialize_weights` runs, whose
    per-architecture `_init_weights` writes what `__init__` computed (rotary `inv_freq` and
    `original_inv_freq` from the rope parameters, `position_ids`, causal masks, embedding scales).

    `initialize_weights` is called unwrapped, under `torch.no_grad`: its decorator
    `guard_torch_init_functions` swaps torch.nn.init's functions module-wide for the duration,
    which every other thread would see. The flagged parameters are on meta, where any init that
    is not guarded is a no-op that draws nothing from torch's RNG. Buffers the checkpoint does not
    hold (`held`) and that no `_init_weights` wrote are an error, not silent garbage."""
    import inspect

    for name, buffer in list(model.named_buffers()):
        path, _, local = name.rpartition(".")
        model.get_submodule(path)._buffers[local] = _unset(buffer)
    params = list(model.parameters())
    for param in params:
        param._is_hf_initialized = True  # type: ignore[attr-defined]
    try:
        initialize = inspect.unwrap(type(model).initialize_weights)  # type: ignore[attr-defined]
        with torch.no_grad():
            initialize(model)
    finally:
        for param in params:
            vars(param).pop("_is_hf_initialized", None)
    unset = [name for name, buffer in model.named_buffers() if name not in held and _still_unset(buffer)]
    if unset:
        raise ModelLoadError(f"cannot stream into {type(model).__name__}: transformers does not compute its "
                             f"buffer {', '.join(unset[:3])} when it builds the model on the meta device; "
                             "load the model and use surgeon.apply instead")


def resolve_device(name: str | torch.device | None) -> torch.device | None:
    """A device the model can go to, or ModelLoadError saying why not."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"unknown device '{name}': {err}") from None
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type not in ("cpu", "meta") and (available is None or not available()):
        raise ModelLoadError(f"device '{name}' is not available on this machine; leave --device out or use cpu")
    if device.type == "meta":
        raise ModelLoadError("device 'meta' holds no weights; 'surgeon check' plans without loading them")
    return device


def load_model_skeleton(model_dir: Path) -> nn.Module:
    """A Hugging Face model with meta parameters and real buffers, in eval mode, for streaming."""
    from transformers import AutoConfig

    cls = _hf_class(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    # torch.device is a torch function mode: thread-local, it puts this thread's new tensors on
    # meta and leaves every other thread (and every other model) alone
    with torch.device("meta"):
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    _compute_buffers(model, set(checkpoint_index(model_dir)))
    return model.eval()


def checkpoint_matches(model_dir: Path, skeleton: nn.Module) -> bool:
    """Whether the checkpoint's tensor names are the model's state-dict names (streamable as is)."""
    names = set(checkpoint_index(model_dir))
    state = set(skeleton.state_dict())
    owners: dict[int, set[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), set()).add(name)
    return names <= state and all(aliases & names for aliases in owners.values())


def stream_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a Hugging Face checkpoint, one shard and tensor at a time."""
    by_file: dict[Path, list[str]] = {}
    for name, path in checkpoint_index(model_dir).items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in names:
                    yield name, handle.get_tensor(name)
        except (OSError, SafetensorError) as err:
            raise ModelLoadError(f"cannot read checkpoint {path}: {err}") from None


def _header_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        if path.suffix != ".safetensors":
            return hashlib.sha256(handle.read()).hexdigest()
        size = int.from_bytes(handle.read(8), "little")
        return hashlib.sha256(handle.read(min(size, 100_000_000))).hexdigest()


def source_stamps(model_dir: Path) -> dict[str, FileStamp]:
    """Size, mtime and header hash of the directory's weight, index and config files."""
    stamps = {}
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (path.suffix == ".safetensors" or path.name in _STAMPED):
            stat = path.stat()
            stamps[path.name] = FileStamp(size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                                          header_sha256=_header_sha256(path))
    return stamps


_STAMPED = ("config.json", "model.safetensors.index.json")


def changed_source_files(recorded: dict[str, FileStamp], model_dir: Path) -> list[str]:
    """The files of `model_dir` that differ from the stamps taken at apply (added, gone or changed)."""
    now = source_stamps(model_dir)
    return sorted(name for name in set(recorded) | set(now) if recorded.get(name) != now.get(name))


def load_model(ref: str, *, checkpoint: str | None = None, meta: bool = False) -> tuple[nn.Module, SourceRef]:
    """The model named by `ref` and a reference to it for the manifest. `meta`: structure only."""
    if _is_factory(ref):
        source = SourceRef(kind="factory", location=ref, checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None)
        return _load_factory(ref, checkpoint, meta), source
    path = Path(ref)
    if not path.exists():
        raise ModelLoadError(f"model path not found: {ref}")
    if not path.is_dir():
        raise ModelLoadError(f"{ref} is not a directory: give a Hugging Face model directory or package.module:factory")
    model = _load_hf(path, meta)
    return model, SourceRef(kind="hf", location=str(path.resolve()), files=source_stamps(path))


def source_of(model: nn.Module, touched: set[str], full: bool = False) -> SourceRef:
    """Where an in-memory model came from: the directory `from_pretrained` read it from (it keeps
    it as `name_or_path`), when that directory still holds the model's tensors, else "memory".
    The tensors a run changes are compared whole (revert may re-read them from there); every
    other one by its dtype, shape and a sample of its values (all of them whole with `full`)."""
    memory = SourceRef(kind="memory")
    location = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    directory = Path(str(location)) if location else None
    if directory is None or not directory.is_dir() or not (directory / "config.json").is_file():
        return memory
    try:
        _refuse_pickles(directory)
        index = checkpoint_index(directory)
        if not index or not _holds_tensors(model, directory, index, touched, full):
            return memory
        return SourceRef(kind="hf", location=str(directory.resolve()), files=source_stamps(directory))
    except (ModelLoadError, OSError, SafetensorError):
        return memory


def _holds_tensors(model: nn.Module, directory: Path, index: dict[str, Path], touched: set[str], full: bool) -> bool:
    state = model.state_dict(keep_vars=True)
    if not set(index) <= set(state) or not checkpoint_matches(directory, model):
        return False
    by_file: dict[Path, list[str]] = {}
    for name, path in index.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                if not _same(state[name].detach(), handle, name, whole=full or name in touched):
                    return False
    return True


def _same(tensor: torch.Tensor, handle: Any, name: str, whole: bool) -> bool:
    piece = handle.get_slice(name)
    if tensor.device.type == "meta" or list(piece.get_shape()) != list(tensor.shape):
        return False
    if whole or tensor.dim() == 0 or tensor.numel() <= 4096:
        stored = handle.get_tensor(name)
    else:  # the first and last rows: a model trained or edited after loading differs there too
        stored = torch.cat([piece[:1].flatten(), piece[-1:].flatten()])
        tensor = torch.cat([tensor[:1].flatten(), tensor[-1:].flatten()])
    return stored.dtype == tensor.dtype and torch.equal(stored, tensor.cpu())


def reload_source(source: SourceRef, model_ref: str | None = None, checkpoint: str | None = None,
                  full_fingerprint: bool = False) -> tuple[nn.Module, Path | None]:
    """The base model a run was made from, and the directory it was read from: the model the user
    names (`model_ref`), or the Hugging Face directory the manifest records. A factory the manifest
    names is never run (a run directory is untrusted), and a directory whose files differ from the
    stamps taken at apply is refused before any weight is read, unless every tensor was hashed."""
    if model_ref is None and source.kind == "factory":
        hint = f" --checkpoint {source.checkpoint}" if source.checkpoint else ""
        raise ModelLoadError(f"this run was made from the model factory '{source.location}'; surgeon does not run "
                             f"code that a run directory names. If you trust it, name it yourself: --model "
                             f"{source.location}{hint}")
    if model_ref is None and (source.kind == "memory" or not source.location or not source.files):
        raise ModelLoadError("this run does not record a model directory it was read from; pass its base model "
                             "with --model, or use surgeon.load(run_dir, model) in Python")
    ref = model_ref or str(source.location)
    directory = Path(ref) if not _is_factory(ref) and Path(ref).is_dir() else None
    if directory is not None and source.files and not full_fingerprint:
        changed = changed_source_files(source.files, directory)
        if changed:
            raise ModelLoadError(
                f"{directory / changed[0]} is not the file the run was made from (size, mtime or header "
                "differ), and the run hashed only the tensors it changed, so the others cannot be vouched "
                "for. Restore the original file, or re-create the run with --full-fingerprint")
    model, _ = load_model(ref, checkpoint=checkpoint)
    return model, directory


def save_base_model(model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model as a Hugging Face directory (or plain model.safetensors for other models)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with whole_model(model), working("writing the checkpoint"):  # a live job would make save_pretrained write its run
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(out_dir, state_dict=state_dict)
        elif state_dict is not None:
            save_file(state_dict, str(out_dir / "model.safetensors"))
        else:
            save_model(model, str(out_dir / "model.safetensors"))


@torch.no_grad()
def sample_output(model: nn.Module, seed: int = 0) -> torch.Tensor | None:
    """The model's output on a fixed random batch of token ids, or None when it takes no ids."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        return None
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed)).to(device)
    extra = {"decoder_input_ids": ids} if getattr(config, "is_encoder_decoder", False) else {}
    out = model(input_ids=ids, **extra)
    found = getattr(out, "logits", None)
    found = found if found is not None else getattr(out, "last_hidden_state", None)
    return found.float() if found is not None else None
