"""Train the weights of chosen modules in full (PEFT's `modules_to_save`), beside an adapter or alone.

    train weights in head                 # a classifier trained whole, beside LoRA on the body
    train weights in <embed,norm>         # LongLoRA: embeddings and norms train with the LoRA
    train weights tied=true in embed      # an embedding tied to the head (GPT-2): both change

The weight and bias of every matched module become trainable in place (they are the base model's
own parameters, `Patch.trained_base_parameters`), as BitFit does for biases: the model keeps its
classes and names, `job.trainable_parameters()` lists the tensors by their model names, the
original values are kept, and revert copies them back. PEFT instead trains a copy of the module
beside the original (`ModulesToSaveWrapper`); the outputs are the same, the memory is the one copy
either way. Patterns are lenient, as BitFit's are: of the modules a pattern matches and the
modules inside them, a statement keeps those that hold a weight or a bias (layers, embeddings,
norms), so `in classifier` trains every layer of a head made of several (RoBERTa's classifier:
dense, out_proj), as PEFT's `modules_to_save=["classifier"]` does, and `in head` does too, since
the `head` role names each of them. A module whose weight is shared with another one
(tied embeddings) is refused unless tied=true: training it in place trains it for both (PEFT's copy
would untie them, so such a statement does not export to PEFT). Merge leaves the trained weights as
they are (they are the weights); revert after it still gives the originals back. Exported to and
imported from PEFT as `modules_to_save` beside the adapter of the other statements.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import ExportError
from surgeon.methods.base import (ApplyContext, Method, MethodParams, Patch, Target, WordArgs, parameter_name,
                                  register)
from surgeon.spec import Word

_LOCALS = ("weight", "bias")  # what torch's and transformers' layers hold; the plan counts these


class WeightsParams(MethodParams):
    tied: bool = Field(False, description="accept modules whose weights are shared with other modules (training "
                                          "the tensor trains it for every module that holds it)")


def _bias_shape(target: Target) -> tuple[int, ...]:
    """One bias entry per output feature (per normalised element for a norm)."""
    if target.kind in ("linear", "conv1d"):
        return (target.out_features or 0,)
    shape = target.weight_shape or (0,)
    return tuple(shape) if target.kind == "norm" else (shape[0],)


class WeightsPatch(Patch):
    """Trains a module's own weight and bias in place. Nothing to undo structurally: the surgery
    restores the values and requires_grad flags of the trained base parameters."""

    mergeable = True

    def __init__(self, trained: dict[str, nn.Parameter]) -> None:
        self.trained = trained

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def trained_base_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.trained)

    def merge(self) -> None:
        """Nothing to fold: the trained tensors already are the model's weights."""

    def revert(self) -> None:
        """Nothing structural changed; the surgery copies the original values back."""


@register
class Weights(Method):
    verb = "train"
    name = "weights"
    Params = WeightsParams
    prepositions = frozenset({"in"})
    # containers are accepted so a pattern naming one that holds no weight anywhere inside is
    # "matched, but nothing to train", not "matches no module"; `keeps` drops them
    kinds = frozenset({"linear", "conv1d", "conv2d", "embedding", "norm", "other", "container"})
    mergeable = True
    peft_scope = "modules_to_save"
    summary = "train the weights of chosen modules in full (PEFT's modules_to_save; a head, embeddings, norms)"

    @classmethod
    def read_words(cls, words: tuple[Word, ...]) -> WordArgs:
        args = super().read_words(words)
        args.lenient = True  # `in layers.0.**`: the layers under it, not its containers
        return args

    @classmethod
    def keeps(cls, target: Target, params: MethodParams) -> bool:
        return target.kind != "container" and bool(cls.trained_shapes(target, params))

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        return {}

    @classmethod
    def trained_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        if target.weight_shape is not None:
            shapes["weight"] = tuple(target.weight_shape)
        if target.has_bias:
            shapes["bias"] = _bias_shape(target)
        return shapes

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        module = model.get_submodule(target.path)
        trained: dict[str, nn.Parameter] = {}
        for local in _LOCALS:
            param = module._parameters.get(local)
            if param is not None:
                param.requires_grad_(True)
                trained[parameter_name(model, param, f"{target.path}.{local}")] = param
        return WeightsPatch(trained)

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        return {}  # the exporter lists the modules in `modules_to_save`

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trained tensors (by model name) under the module's own names (`weight`, `bias`), as
        PEFT saves a module to save. A name outside the module is a weight tied to another one."""
        found = {}
        for name, tensor in tensors.items():
            owner, _, local = name.rpartition(".")
            if owner != target.path:
                raise ExportError(f"{target.path}.{local} is tied to {name}: PEFT's modules_to_save trains a copy of "
                                  f"{target.path}, which unties it, while surgeon trained the shared tensor")
            found[local] = tensor
        return found

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensors of a saved module (`weight`, `bias`) under their model names."""
        unknown = sorted(set(tensors) - set(_LOCALS))
        if unknown:
            raise ExportError(f"the PEFT adapter saves {target.path}.{unknown[0]}, which train weights does not train "
                              "(it trains a module's weight and bias)")
        return {f"{target.path}.{local}": tensor for local, tensor in tensors.items()}

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        """`train weights in <...>` for the modules PEFT saves (the layers inside them, full paths)."""
        pattern = f"<{','.join(sorted(targets))}>" if len(targets) > 1 else targets[0]
        return f"train weights in {pattern}"
