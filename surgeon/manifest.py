"""The manifest: everything needed to re-apply a run or to prove that revert gave the original back.

It is a pydantic model written as manifest.json beside the added weights (adapters.safetensors).
An `integrity` field holds the sha256 of the rest of the manifest, so an edited manifest is caught.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from surgeon.errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
ADAPTER_FILE = "adapters.safetensors"
TRAINED_BASE_PREFIX = "trained_base::"
STATE_PREFIX = "state::"  # state::<patch index>::<name>: a patch's saved_state()
ORIGINALS_DIR = "originals"


class TensorRecord(BaseModel):
    model_config = ConfigDict(frozen=True)
    dtype: str
    shape: tuple[int, ...]
    sha256: str | None = None  # None: not hashed (not touched, or on the meta device)


class SourceRef(BaseModel):
    """Where the base model came from, so revert and merge can read the originals again."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["hf", "factory", "memory"]
    location: str | None = None  # a directory, or package.module:factory
    checkpoint: str | None = None  # safetensors weights for a factory model


class OriginalsRef(BaseModel):
    """Where replaced originals can be read back (see surgeon/originals.py)."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["none", "checkpoint", "spilled"] = "none"
    location: str | None = None  # a checkpoint directory, or a folder (relative: inside the run)


class PatchRecord(BaseModel):
    method: str  # "inject lora"
    name: str | None = None  # the statement's `as NAME`
    target: str
    slices: dict[str, tuple[int, int]] = Field(default_factory=dict)
    params: dict[str, Any]
    original_class: str
    replacement_class: str | None = None
    added: dict[str, TensorRecord]
    trained_base: list[str] = Field(default_factory=list)
    folded: bool = False  # job.fold() replaced its reparameterisation by the tensors it produced
    merged: bool = False


class Manifest(BaseModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    spec_text: str
    spec_source: str
    spec_sha256: str
    versions: dict[str, str]
    source: SourceRef
    fingerprint: dict[str, TensorRecord]
    fingerprint_full: bool = False
    trainable_before: list[str]
    patches: list[PatchRecord]
    originals: OriginalsRef = Field(default_factory=OriginalsRef)
    adapter_sha256: str | None = None
    integrity: str | None = None

    def sealed(self) -> Manifest:
        return self.model_copy(update={"integrity": _digest(self)})

    def write(self, run_dir: Path) -> None:
        (run_dir / MANIFEST_FILE).write_text(self.sealed().model_dump_json(indent=2) + "\n")


def _digest(manifest: Manifest) -> str:
    body = manifest.model_dump(mode="json", exclude={"integrity"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sha256_tensor(tensor: torch.Tensor) -> str | None:
    if tensor.device.type == "meta":
        return None
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(data.numpy())).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_record(tensor: torch.Tensor, hashed: bool) -> TensorRecord:
    return TensorRecord(dtype=str(tensor.dtype).removeprefix("torch."), shape=tuple(tensor.shape),
                        sha256=sha256_tensor(tensor) if hashed else None)


def read_manifest(run_dir: Path) -> Manifest:
    """Read and verify a run's manifest; any problem is a one-line ManifestError."""
    path = Path(run_dir) / MANIFEST_FILE
    if not Path(run_dir).is_dir():
        raise ManifestError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise ManifestError(f"{run_dir} has no {MANIFEST_FILE}: not a surgeon run directory")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else {"loc": (), "msg": str(err)}
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestError(f"{path} is corrupt: {where + ': ' if where else ''}{first['msg']}") from None
    if manifest.integrity != _digest(manifest):
        raise ManifestError(f"{path} was edited after surgeon wrote it (integrity check failed)")
    if hashlib.sha256(manifest.spec_text.encode()).hexdigest() != manifest.spec_sha256:
        raise ManifestError(f"{path}: the spec text does not match its sha256")
    adapters = Path(run_dir) / ADAPTER_FILE
    if manifest.adapter_sha256 is not None:
        if not adapters.is_file():
            raise ManifestError(f"{adapters} is missing")
        if sha256_file(adapters) != manifest.adapter_sha256:
            raise ManifestError(f"{adapters} does not match the sha256 in the manifest (changed or corrupt)")
    return manifest
