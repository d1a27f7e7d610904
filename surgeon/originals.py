"""Where the originals of replaced tensors stay readable, so a lossy step never destroys the way back.

- `CheckpointOriginals`: the source checkpoint itself (a Hugging Face directory, one safetensors
  file or shards with an index); nothing is copied.
- `SpilledOriginals`: for a model that exists only in memory, apply writes each replaced tensor to
  its own safetensors file in a folder named in the manifest, before the tensor is dropped.

Either way revert checks what it reads against the sha256 in the manifest's fingerprint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from surgeon.errors import ModelLoadError, RevertError


class Originals(Protocol):
    location: str

    def keep(self, name: str, tensor: torch.Tensor) -> None:
        """Make sure `tensor` (the state-dict entry `name`) can be read back later."""

    def read(self, name: str) -> torch.Tensor:
        """The original tensor, or RevertError saying why it cannot be read."""


class CheckpointOriginals:
    def __init__(self, model_dir: str | Path) -> None:
        self.location = str(Path(model_dir).resolve())
        self._files: dict[str, Path] | None = None

    def _file_of(self, name: str) -> Path:
        if self._files is None:
            self._files = checkpoint_index(Path(self.location))
        if name not in self._files:
            raise RevertError(f"the source checkpoint {self.location} no longer holds {name}")
        return self._files[name]

    def keep(self, name: str, tensor: torch.Tensor) -> None:
        self._file_of(name)  # it is already on disk; only make sure it can be found there

    def read(self, name: str) -> torch.Tensor:
        return _read_tensor(self._file_of(name), name)


class SpilledOriginals:
    """`read_only`: the folder belongs to a saved run, which surgeon reads and never writes."""

    def __init__(self, folder: str | Path, read_only: bool = False) -> None:
        self.location = str(Path(folder).resolve())
        self.read_only = read_only

    def _path(self, name: str) -> Path:
        return Path(self.location) / (re.sub(r"[^A-Za-z0-9_.\-]", "_", name) + ".safetensors")

    def keep(self, name: str, tensor: torch.Tensor) -> None:
        if self._path(name).is_file():  # re-applying a saved run: its originals are already here
            return
        if self.read_only:
            raise RevertError(f"the run's originals folder {self.location} does not hold the original of {name}")
        Path(self.location).mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.detach().contiguous().cpu()}, str(self._path(name)))

    def read(self, name: str) -> torch.Tensor:
        path = self._path(name)
        if not path.is_file():
            raise RevertError(f"the original of {name} is gone: {path} does not exist")
        return _read_tensor(path, name)


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)
    except (OSError, SafetensorError) as err:
        raise RevertError(f"cannot read the original of {name} from {path}: {err}") from None


def checkpoint_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index when there is one. The files it names
    must lie in `model_dir`."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            found = {str(name): model_dir / str(file) for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"cannot read {index}: not a valid shard index ({type(err).__name__}: {err})") from None
        for name, path in found.items():
            if path.parent != model_dir or not path.is_file():
                raise ModelLoadError(f"{index} puts {name} in {path.name}, which is not a file in {model_dir}")
        return found
    found = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                found.update({name: path for name in handle.keys()})
        except (OSError, SafetensorError) as err:
            raise ModelLoadError(f"cannot read checkpoint {path}: not a valid safetensors file ({err})") from None
    return found


def originals_for(kind: str, location: str | None) -> Originals | None:
    """The store a saved run's `originals` entry names (already checked to lie inside the run, or
    to be its source checkpoint); read only."""
    if kind == "checkpoint" and location:
        return CheckpointOriginals(location)
    if kind == "spilled" and location:
        return SpilledOriginals(location, read_only=True)
    return None
