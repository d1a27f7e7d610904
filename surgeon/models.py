"""Loading and saving base models: a Hugging Face directory, or `package.module:factory`."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from surgeon.errors import ModelLoadError
from surgeon.manifest import SourceRef
from surgeon.originals import checkpoint_index


def _is_factory(ref: str) -> bool:
    return ":" in ref and not os.path.exists(ref)


def _hf_class(model_dir: Path) -> type:
    import transformers

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {err}") from None
    for name in config.get("architectures") or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _load_factory(ref: str, checkpoint: str | None, meta: bool) -> nn.Module:
    module_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ModelLoadError(f"cannot import model factory '{ref}': {err}") from None
    with torch.device("meta") if meta else torch.device("cpu"):
        model = factory()
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


def _load_hf(model_dir: Path, meta: bool) -> nn.Module:
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    cls = _hf_class(model_dir)
    try:
        if meta:
            config = AutoConfig.from_pretrained(model_dir)
            with torch.device("meta"):
                return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        weights = list(model_dir.glob("*.safetensors"))
        if not weights:
            raise ModelLoadError(f"{model_dir} has no .safetensors weights")
        for path in weights:  # fail early and clearly on a truncated or corrupt file
            with open(path, "rb") as handle:
                header = int.from_bytes(handle.read(8), "little")
            if header <= 0 or header > path.stat().st_size:
                raise ModelLoadError(f"cannot read checkpoint {path}: not a safetensors file")
        return cls.from_pretrained(model_dir, dtype="auto")
    except ModelLoadError:
        raise
    except (OSError, ValueError, SafetensorError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load the model in {model_dir}: {first}") from None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build a model whose parameters live on the meta device while its buffers (rotary
    frequencies, position ids) are computed for real: the skeleton a streamed checkpoint fills."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


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
    with _parameters_on_meta():
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
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
    return _load_hf(path, meta), SourceRef(kind="hf", location=str(path.resolve()))


def reload_source(source: SourceRef) -> nn.Module:
    """The base model a run was made from, read again from where the manifest says it lives."""
    if source.kind == "memory" or not source.location:
        raise ModelLoadError("this run was made from a model that exists only in memory; "
                             "use surgeon.load(run_dir, model) with that model in Python")
    return load_model(source.location, checkpoint=source.checkpoint)[0]


def save_base_model(model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model as a Hugging Face directory (or plain model.safetensors for other models)."""
    out_dir.mkdir(parents=True, exist_ok=True)
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
