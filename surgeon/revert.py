"""Stage 4: undo a surgery in reverse order, then prove it against the manifest's fingerprint."""

from __future__ import annotations

import torch
from torch import nn

from surgeon.errors import RevertError
from surgeon.graph import unwrap, wrapped
from surgeon.progress import track
from surgeon.manifest import Manifest, TensorRecord, sha256_tensor
from surgeon.surgery import Surgery, rollback
from surgeon.transaction import transaction


def check_tensors(model: nn.Module, fingerprint: dict[str, TensorRecord]) -> str | None:
    """The first difference between the model's tensors and a fingerprint, or None."""
    tensors = model.state_dict(keep_vars=True)
    missing = sorted(set(fingerprint) - set(tensors))
    extra = sorted(set(tensors) - set(fingerprint))
    if missing or extra:
        return f"tensors differ: missing {missing[:3]}, extra {extra[:3]}"
    had_data = any(record.sha256 is not None for record in fingerprint.values())
    for name, record in track(fingerprint.items(), "verifying tensors", total=len(fingerprint)):
        tensor = tensors[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype != record.dtype:
            return (f"tensor {name} is {dtype}, the original was {record.dtype}: the model was cast after "
                    f"apply; cast it back (model.to(torch.{record.dtype})) and revert again")
        if tuple(tensor.shape) != record.shape:
            return f"tensor {name} has shape {tuple(tensor.shape)}, the original had {record.shape}"
        if tensor.device.type == "meta" and had_data:
            return (f"tensor {name} is on the meta device and holds no data, so the model cannot be the "
                    "original; move it back to a real device with its weights first")
        if record.sha256 is not None and sha256_tensor(tensor) != record.sha256:
            return f"tensor {name} differs from the original (sha256 mismatch){_rounding_hint(tensor)}"
    return None


def _rounding_hint(tensor: torch.Tensor) -> str:
    """Why a float32 tensor may differ: all its values fit a narrower dtype, as after a cast there
    and back (`model.to(torch.bfloat16)`, then `.to(torch.float32)`), which rounded the weights."""
    if tensor.dtype != torch.float32 or tensor.device.type == "meta":
        return ""
    values = tensor.detach()
    for narrow in (torch.bfloat16, torch.float16):
        if torch.equal(values.to(narrow).to(torch.float32), values):
            name = str(narrow).removeprefix("torch.")
            return (f"; every value fits in {name}: the model was probably cast to {name} and back after "
                    "apply, which rounded its weights, so it cannot give the original back exactly "
                    "(load the original model again)")
    return ""


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
    Every patch first proves it can be undone (its originals are readable and unchanged); then the
    whole revert runs as one transaction, so a revert that fails (verification included) or is
    interrupted leaves the model patched exactly as it was."""
    for _, patch in surgery.patches:
        patch.check_revertible(surgery.manifest.fingerprint)
    trained = tuple(p for _, patch in surgery.patches for p in patch.trained_base_parameters().values())
    with transaction(surgery.model, surgery.patches, values=trained):
        rollback(surgery.model, surgery.patches, set(surgery.manifest.trainable_before))
        _restore_trained(surgery.model, surgery.base_originals)
        verify(surgery.model, surgery.manifest)
    return surgery.model


def _restore_trained(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Copy the kept originals back into the trained base parameters. A tied tensor answers to
    each of its names (BERT's MLM decoder bias is also `cls.predictions.bias`, which alone
    `named_parameters()` lists); every name is resolved before the first copy."""
    params = _parameters_by_name(model)
    missing = sorted(set(originals) - set(params))
    if missing:
        raise RevertError(f"the model has no parameter {missing[0]} to restore; was it replaced after apply?")
    with torch.no_grad():
        for name, original in originals.items():
            params[name].copy_(original)


def _parameters_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter by each of its names, and the originals inside a live job's wrappers by the
    path the wrapper stands at too (a second job trained `q_proj.bias`, which is `q_proj.base.bias`
    while the first job is live)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for path, module in model.named_modules():
        if wrapped(module) is not None:
            for local, param in unwrap(module)._parameters.items():
                if param is not None:
                    params.setdefault(f"{path}.{local}" if path else local, param)
    return params
