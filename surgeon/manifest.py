"""The manifest: everything needed to re-apply a run or to prove that revert gave the original back.

It is a pydantic model written as manifest.json beside the added weights (adapters.safetensors).
A run directory is untrusted input (it travels: shared adapters, CI artifacts), so reading one is
strict: unknown fields are refused, every path it names must lie inside the run, and nothing it
names is ever executed (a factory source is a hint the user must repeat on the command line).

`checksum` is the sha256 of the rest of the manifest. It catches accidental edits and corruption,
not tampering: anyone can recompute it. For runs that must come from a trusted writer, set
SURGEON_RUN_KEY: surgeon then signs what it writes with HMAC-SHA256 under that key, and refuses to
read any run that is not signed with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError

from surgeon.errors import ManifestError

SCHEMA_VERSION = 2
RUN_KEY_VARIABLE = "SURGEON_RUN_KEY"
MAX_MANIFEST_BYTES = 64 << 20  # a 70B model's fingerprint is well under 1 MiB
MANIFEST_FILE = "manifest.json"
ADAPTER_FILE = "adapters.safetensors"
TRAINED_BASE_PREFIX = "trained_base::"
STATE_PREFIX = "state::"  # state::<patch index>::<name>: a patch's saved_state()
ORIGINALS_DIR = "originals"


class TensorRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    dtype: str
    shape: tuple[int, ...]
    sha256: str | None = None  # None: not hashed (not touched, or on the meta device)


class FileStamp(BaseModel):
    """A source file as it was at apply: cheap to take, and a changed tensor byte changes the mtime."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    size: int
    mtime_ns: int
    header_sha256: str  # of a safetensors file's header (names, dtypes, shapes, offsets); of a JSON file whole


class SourceRef(BaseModel):
    """Where the base model came from, so revert and merge can read the originals again. For a
    factory this is a hint only: surgeon runs a factory only when the user names it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["hf", "factory", "memory"]
    location: str | None = None  # a directory, or package.module:factory
    checkpoint: str | None = None  # safetensors weights for a factory model
    files: dict[str, FileStamp] = Field(default_factory=dict)  # the directory's weight and config files


class OriginalsRef(BaseModel):
    """Where replaced originals can be read back (see surgeon/originals.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # "base": a training checkpoint leaves them out; they are spilled again from the base model
    # that `surgeon.load` is given (its tensors are checked against the fingerprint first)
    kind: Literal["none", "checkpoint", "spilled", "base"] = "none"
    location: str | None = None  # a checkpoint directory, or a folder (relative: inside the run)


class PatchRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[2] = SCHEMA_VERSION
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
    inactive: list[str] = Field(default_factory=list)  # named adapters switched off (job.activate)
    # named adapters that act weighted (job.activate({name: weight})); absent: weight 1
    weights: dict[str, FiniteFloat] = Field(default_factory=dict)
    frozen: list[str] = Field(default_factory=list)  # named adapters whose tensors do not train (load adapters)
    checksum_kind: Literal["sha256", "hmac-sha256"] = "sha256"
    checksum: str | None = None

    def sealed(self) -> Manifest:
        key = _run_key()
        kind = "hmac-sha256" if key else "sha256"
        unsealed = self.model_copy(update={"checksum_kind": kind})
        return unsealed.model_copy(update={"checksum": _digest(unsealed, key)})

    def sealed_json(self, indent: int | None = None) -> str:
        """The sealed manifest as written: an empty `inactive`, `weights` or `frozen` is left out, as the
        checksum leaves it out, so runs written before they existed read and check as before."""
        return self.sealed().model_dump_json(indent=indent, exclude=_left_out(self))

    def write(self, run_dir: Path) -> None:
        (run_dir / MANIFEST_FILE).write_text(self.sealed_json(indent=2) + "\n")


def _left_out(manifest: Manifest) -> set[str]:
    return {name for name in ("inactive", "weights", "frozen") if not getattr(manifest, name)}


def _run_key() -> bytes | None:
    key = os.environ.get(RUN_KEY_VARIABLE)
    return key.encode() if key else None


def _digest(manifest: Manifest, key: bytes | None) -> str:
    body = json.dumps(manifest.model_dump(mode="json", exclude={"checksum"} | _left_out(manifest)),
                      sort_keys=True).encode()
    if key is not None:
        return hmac.new(key, body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


def _check_checksum(manifest: Manifest, path: Path) -> None:
    key = _run_key()
    if key is None and manifest.checksum_kind == "hmac-sha256":
        raise ManifestError(f"{path} is signed with a key: set {RUN_KEY_VARIABLE} to the key it was written with")
    if key is not None and manifest.checksum_kind != "hmac-sha256":
        raise ManifestError(f"{path} is not signed, and {RUN_KEY_VARIABLE} is set, so only runs signed with "
                            "that key are read")
    if not hmac.compare_digest(manifest.checksum or "", _digest(manifest, key)):
        if key is not None:
            raise ManifestError(f"{path} is not signed with this {RUN_KEY_VARIABLE} (wrong key, or edited)")
        raise ManifestError(f"{path} was edited or corrupted after surgeon wrote it (checksum mismatch)")


def _inside(run_dir: Path, location: str, what: str) -> Path:
    """`location` as a path inside the run directory, or ManifestError: a run names no path outside
    itself (no absolute paths, no '..', no symlink that leads out)."""
    relative = Path(location)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ManifestError(f"{run_dir / MANIFEST_FILE}: {what} '{location}' is not a path inside the run directory")
    root = run_dir.resolve()
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise ManifestError(f"{run_dir / MANIFEST_FILE}: {what} '{location}' leads outside the run directory "
                            "(a symlink)")
    return resolved


def _check_originals(run_dir: Path, manifest: Manifest) -> None:
    ref = manifest.originals
    if ref.kind == "spilled":
        originals_folder(run_dir, manifest)
    elif ref.kind == "checkpoint" and (manifest.source.kind != "hf" or ref.location != manifest.source.location):
        raise ManifestError(f"{run_dir / MANIFEST_FILE}: the originals of a run are read from its source "
                            f"checkpoint, but it names '{ref.location}', which is not that checkpoint")
    elif ref.kind in ("base", "none") and ref.location is not None:
        raise ManifestError(f"{run_dir / MANIFEST_FILE}: originals of kind '{ref.kind}' name no location")


def originals_folder(run_dir: Path, manifest: Manifest) -> Path:
    """The run's folder of spilled originals, which must lie inside the run directory."""
    return _inside(run_dir, manifest.originals.location or "", "the originals folder")


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


def parse_manifest(text: str, path: Path) -> Manifest:
    """A manifest from its JSON text (read from `path`, named in errors), checksum and spec hash checked."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} holds a manifest of {len(text):,} characters, more than a manifest can be")
    try:
        manifest = Manifest.model_validate_json(text)
    except (ValidationError, ValueError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else {"loc": (), "msg": str(err)}
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestError(f"{path} is corrupt: {where + ': ' if where else ''}{first['msg']}") from None
    _check_checksum(manifest, path)
    if hashlib.sha256(manifest.spec_text.encode()).hexdigest() != manifest.spec_sha256:
        raise ManifestError(f"{path}: the spec text does not match its sha256")
    return manifest


def read_manifest(run_dir: Path) -> Manifest:
    """Read and verify a run's manifest; any problem is a one-line ManifestError."""
    path = Path(run_dir) / MANIFEST_FILE
    if not Path(run_dir).is_dir():
        raise ManifestError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise ManifestError(f"{run_dir} has no {MANIFEST_FILE}: not a surgeon run directory")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is {path.stat().st_size:,} bytes, more than a manifest can be "
                            f"({MAX_MANIFEST_BYTES:,}): not a surgeon manifest")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise ManifestError(f"cannot read {path}: {err}") from None
    manifest = parse_manifest(text, path)
    _check_originals(Path(run_dir), manifest)
    adapters = Path(run_dir) / ADAPTER_FILE
    if manifest.adapter_sha256 is not None:
        if not adapters.is_file():
            raise ManifestError(f"{adapters} is missing")
        if sha256_file(adapters) != manifest.adapter_sha256:
            raise ManifestError(f"{adapters} does not match the sha256 in the manifest (changed or corrupt)")
    return manifest
