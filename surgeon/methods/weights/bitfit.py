"""BitFit (Ben Zaken et al. 2021): train only the biases, or a subset of them, and nothing else.

    train bias                            # every bias of the model
    train bias only=<q,v>                 # the attention query and value biases
    train bias in layers.[6-11].** only=<mlp,norm>
    train bias add=true                   # a model without biases (Llama): add zero biases first

The biases are the base model's own parameters, made trainable (`Patch.trained_base_parameters`),
so `job.trainable_parameters()` lists them and revert copies their original values back. Roles
pick biases by what the module does: q, k, v, o (attention projections; GPT-2's fused c_attn is
one bias and counts as q, k and v together), mlp (up, down, gate: BERT's intermediate and output
dense too) and norm (LayerNorm). Patterns are lenient, as a target-less statement is: they keep
the linear, Conv1D, conv and norm modules they match, and a module the `only` roles leave out is
left as it is. The output head (every module of the `head` role: lm_head, a classifier, BERT's
MLM `cls`) is left alone, even with add=true: it is trained whole, `train weights in head`.
A bias tied to another module's is one tensor: it trains once, under its model name. A chosen
linear layer without a bias is an error unless add=true, which registers a zero bias (so outputs
do not change at step 0) that revert removes again; a norm without a bias
(RMSNorm has none by design) is then left alone, unless only= names norm. The plan cannot drop a
module that has nothing to train, so such a module shows as a rewrite that adds nothing. PEFT has
no BitFit adapter type.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from surgeon.methods.base import (ApplyContext, Method, MethodParams, Patch, Target, WordArgs, parameter_name,
                                  register)
from surgeon.spec import Word

Role = Literal["q", "k", "v", "o", "mlp", "norm"]
# the graph's role of a module -> the `only` roles it answers to
_ROLES: dict[str, set[str]] = {
    "q": {"q"}, "k": {"k"}, "v": {"v"}, "o": {"o"}, "qkv": {"q", "k", "v"},
    "up": {"mlp"}, "down": {"mlp"}, "gate": {"mlp"}, "norm": {"norm"},
}
_CAN_ADD = ("linear", "conv2d")  # modules whose forward reads `self.bias` when it is None


class BitFitParams(MethodParams):
    tied: bool = Field(True, description="accept modules whose weights are tied elsewhere (BitFit never "
                                         "touches a weight)")
    only: list[Role] | None = Field(None, min_length=1, description="train only these biases: q, k, v, o, "
                                                                     "mlp, norm (default: every bias)")
    add: bool = Field(False, description="give chosen linear layers without a bias a zero bias to train")

    @field_validator("only", mode="before")
    @classmethod
    def _one_role_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # `only=q` means `only=<q>`


def _chosen(target: Target, params: BitFitParams) -> bool:
    return params.only is None or bool(_ROLES.get(target.role or "", set()) & set(params.only))


def _adds(target: Target, params: BitFitParams) -> bool:
    return (params.add and _chosen(target, params) and not target.has_bias and target.role != "head"
            and target.kind in _CAN_ADD)


def _bias_shape(target: Target) -> tuple[int, ...]:
    """A bias has one entry per output feature (channel; normalised element for a norm)."""
    if target.kind in ("linear", "conv1d"):
        return (target.out_features or 0,)
    shape = target.weight_shape or (0,)
    return tuple(shape) if target.kind == "norm" else (shape[0],)


def _bias_owner(module: nn.Module) -> nn.Module:
    """The module that holds the bias: under a LoRA wrapper (stacked statements), its base."""
    while "bias" not in module._parameters and "bias" not in vars(module) \
            and isinstance(getattr(module, "base", None), nn.Module):
        module = module.base
    return module


class BiasPatch(Patch):
    """Trains existing biases, or owns a zero bias it added; revert removes what it added (the
    surgery restores the values and requires_grad flags of the trained base parameters)."""

    mergeable = True

    def __init__(self, owner: nn.Module, trained: dict[str, nn.Parameter] | None = None) -> None:
        self.owner = owner
        self.trained = trained or {}
        self.added: nn.Parameter | None = None
        self.was_attribute = False  # a plain `bias = None` attribute (QuantizedLinear), not a None parameter

    def add_zero_bias(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.added = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
        if "bias" in self.owner._parameters:  # nn.Linear(bias=False) registers bias as None
            self.owner._parameters["bias"] = self.added
            return
        self.was_attribute = True
        del self.owner.__dict__["bias"]
        self.owner.register_parameter("bias", self.added)

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return {"bias": self.added} if self.added is not None else {}

    def trained_base_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.trained)

    def merge(self) -> None:
        """Nothing to fold: the biases already are the model's own parameters."""

    def revert(self) -> None:
        if self.added is None:
            return
        if self.was_attribute:
            del self.owner._parameters["bias"]
            self.owner.__dict__["bias"] = None
        else:
            self.owner._parameters["bias"] = None
        self.added = None


@register
class BitFit(Method):
    verb = "train"
    name = "bias"
    Params = BitFitParams
    prepositions = frozenset({"in"})
    kinds = frozenset({"linear", "conv1d", "conv2d", "norm"})
    # the weight-delta methods keep the original layer as `.base`, whose bias this trains
    stacks_on = frozenset({"quantize", "lora", "relora", "dora", "loha", "lokr", "ia3", "adalora"})
    mergeable = True
    default_target = "**"
    summary = "train only the biases, or the q/k/v/o/mlp/norm ones (Ben Zaken et al. 2021)"

    @classmethod
    def read_words(cls, words: tuple[Word, ...]) -> WordArgs:
        args = super().read_words(words)
        args.lenient = True  # `in layers.0.**`: the bias-owning modules under it, not its containers
        return args

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        reason = super().check(target, params)
        assert isinstance(params, BitFitParams)
        if reason or target.has_bias or not _chosen(target, params) or target.role == "head":
            return reason
        if target.kind == "norm":  # RMSNorm has no bias by design and its forward would not read one
            if params.add and not (params.only and "norm" in params.only):
                return None  # `train bias add=true`: the norms are left alone
            return (f"the model has no biases in {target.path} ({target.type_name}); add=true adds zero "
                    "biases to linear layers only, not to norms")
        if target.kind not in _CAN_ADD:
            return f"{target.path} ({target.type_name}) has no bias, and add=true adds biases to linear layers only"
        if not params.add:
            return (f"the model has no biases in {target.path} ({target.type_name}); add=true adds zero biases "
                    "(or choose modules that have them with 'in', 'except' or only=...)")
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, BitFitParams)
        return {"bias": (target.out_features or 0,)} if _adds(target, params) else {}

    @classmethod
    def keeps(cls, target: Target, params: MethodParams) -> bool:
        """The modules `only` names (all by default), but never the output head: its bias, if any,
        is part of the head, and GPT-2's tied head has none."""
        assert isinstance(params, BitFitParams)
        return _chosen(target, params) and target.role != "head"

    @classmethod
    def trained_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, BitFitParams)
        if not (target.has_bias and _chosen(target, params)):
            return {}
        return {"bias": _bias_shape(target)}

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, BitFitParams)
        owner = _bias_owner(model.get_submodule(target.path))
        bias = owner._parameters.get("bias")
        if not _chosen(target, params):
            return BiasPatch(owner)
        if bias is not None:
            bias.requires_grad_(True)
            # a tied bias (BERT's MLM decoder bias is cls.predictions.bias) under its model name,
            # the one revert and a saved run find it by, once however many modules hold it
            return BiasPatch(owner, {parameter_name(model, bias, f"{target.path}.bias"): bias})
        patch = BiasPatch(owner)
        if _adds(target, params):
            weight = owner.weight  # a quantized layer's `weight` is an empty tensor on its device
            dtype = getattr(owner, "original_dtype", weight.dtype)
            patch.add_zero_bias(target.out_features or 0, dtype, weight.device)
        return patch
