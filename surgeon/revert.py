"""Stage 4: undo a surgery in reverse order, then prove it against the manifest's fingerprint."""

from __future__ import annotations

import torch
from torch import nn

from surgeon.errors import RevertError
from surgeon.manifest import Manifest, TensorRecord, sha256_tensor
from surgeon.surgery import Surgery, rollback


def check_tensors(model: nn.Module, fingerprint: dict[str, TensorRecord]) -> str | None:
    """The first difference between the model's tensors and a fingerprint, or None."""
    tensors = model.state_dict(keep_vars=True)
    missing = sorted(set(fingerprint) - set(tensors))
    extra = sorted(set(tensors) - set(fingerprint))
    if missing or extra:
        return f"tensors differ: missing {missing[:3]}, extra {extra[:3]}"
    for name, record in fingerprint.items():
        tensor = tensors[name]
        if str(tensor.dtype).removeprefix("torch.") != record.dtype or tuple(tensor.shape) != record.shape:
            return f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, expected {record.dtype} {record.shape}"
        if record.sha256 is not None and tensor.device.type != "meta" and sha256_tensor(tensor) != record.sha256:
            return f"tensor {name} differs from the original (sha256 mismatch)"
    return None


def verify(model: nn.Module, manifest: Manifest) -> None:
    """Raise RevertError naming the first tensor, class or flag that differs from the original."""
    problem = check_tensors(model, manifest.fingerprint)
    if problem:
        raise RevertError(problem)
    first_class: dict[str, str] = {}
    for patch in manifest.patches:  # stacked patches: the first one saw the original class
        first_class.setdefault(patch.target, patch.original_class)
    for target, original_class in first_class.items():
        module = model.get_submodule(target)
        found = f"{type(module).__module__}.{type(module).__qualname__}"
        if found != original_class:
            raise RevertError(f"{target} is a {found}, the original was a {original_class}")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if trainable != set(manifest.trainable_before):
        changed = sorted(trainable ^ set(manifest.trainable_before))
        raise RevertError(f"requires_grad differs from the original for {changed[:3]}")


def revert_surgery(surgery: Surgery) -> nn.Module:
    """Stage entry: undo every patch (merged ones too), restore trained base tensors, verify.
    Every patch first proves it can be undone (its originals are readable and unchanged), so a
    revert that cannot complete changes nothing."""
    for _, patch in surgery.patches:
        patch.check_revertible(surgery.manifest.fingerprint)
    rollback(surgery.model, surgery.patches, set(surgery.manifest.trainable_before))
    params = dict(surgery.model.named_parameters())
    with torch.no_grad():
        for name, original in surgery.base_originals.items():
            params[name].copy_(original)
    verify(surgery.model, surgery.manifest)
    return surgery.model
