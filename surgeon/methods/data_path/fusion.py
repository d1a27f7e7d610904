"""AdapterFusion (Pfeiffer et al. 2021): a learned, per-token attention over named bottleneck
adapters that sit at the same places, as AdapterHub `adapters` 1.3 computes it (`BertFusion`,
methods/modeling.py; `compose_fuse`, methods/bottleneck.py; ../shared/notes/adapters.md):

    inject adapter config=pfeiffer as sentiment       # or: load adapters "runs/sentiment" as sentiment
    inject adapter config=pfeiffer as nli
    fuse adapters <sentiment,nli> [temperature=true] [config=static]

Where the fused adapters act (pfeiffer's place: after the FFN block), with z their input (post-norm:
LN(h + r); pre-norm: r + h) and u_i = A_i(z) each adapter's up-projection before its residual:

    q = W_q z + b_q,  k_i = W_k u_i + b_k,  v_i = W_v u_i  (no bias; `static`: v_i = u_i)
    p = softmax(dropout(q . k_i) / T)       (no 1/sqrt(d); dropout on the scores, in training)
    y = LN(sum_i p_i v_i + h + r)  (post-norm),  y = z + sum_i p_i v_i  (pre-norm)

W_q, W_k start N(0, 0.02) with zero biases; W_v starts at the identity with 1e-6 off the diagonal.
T = 1, or with temperature=true 50, lowered by 0.05 after every forward (training or not, as the
library does) down to 1; a saved run keeps it. The regulariser 0.01 ||I - W_v||^2 per layer is
the method's loss term (`job.regularization()`). While the fusion acts, the fused adapters add
nothing on their own (the fusion computes with them); switched off (a named fusion), they act
again as they were. A fused adapter switched off (`job.activate`) is left out of the fusion. Only the fusion's tensors are its own: the adapters keep theirs.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import PlanError, SurgeryError
from surgeon.methods._rng import draw
from surgeon.methods.base import (DROP_SWITCH, ApplyContext, DropSwitch, Method, MethodParams, Patch, Target, WordArgs,
                                  WordError, register)
from surgeon.methods.data_path.adapter import _PLACEMENTS, AdapterPatch, wire_pfeiffer
from surgeon.spec import Word


class FuseParams(MethodParams):
    adapters: list[str] = Field(description="the named adapters fused (from the words: fuse adapters <a,b>)")
    config: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: query, key and value matrices; static: no value matrix (AdapterHub's static)")
    temperature: bool = Field(False, description="start the softmax at temperature 50, lowered by 0.05 per forward to 1")
    dropout: float | None = Field(None, ge=0, lt=1, description="dropout on the fusion scores in training "
                                  "(default: the model's attention_probs_dropout_prob, else 0)")
    regularization: float = Field(0.01, ge=0, description="weight of ||I - W_v||^2 in the loss (AdapterHub's 0.01)")


class Fusion(nn.Module):
    """One layer's fusion over `adapters` (held, not owned: their tensors stay theirs)."""

    def __init__(self, hidden: int, adapters: list[nn.Module], params: FuseParams, dropout: float,
                 like: torch.Tensor) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden, bias=False) if params.config == "dynamic" else None
        self.dropout = nn.Dropout(dropout)
        self.__dict__["adapters"] = adapters  # plain attribute: not submodules, so not its parameters
        self.temperature = 50.0 if params.temperature else 1.0
        self.reduction = self.temperature / 1000.0  # the library's schedule: T0 / 1000 per forward
        self.record = False  # keep the last forward's probabilities in `probabilities` (for inspection)
        self.probabilities: torch.Tensor | None = None
        self.__dict__[DROP_SWITCH] = DropSwitch()
        self.to(dtype=like.dtype, device=like.device)

    @property
    def dropped(self) -> bool:
        return self.__dict__[DROP_SWITCH].off

    def initialise(self, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            for linear in (self.query, self.key):
                draw(linear.weight, nn.init.normal_, generator, std=0.02)
                linear.bias.zero_()
            if self.value is not None:
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """sum_i p_i v_i, what the fusion adds to the adapters' residual."""
        adapters = [a for a in self.__dict__["adapters"] if not a.__dict__[DROP_SWITCH].inactive]
        if not adapters:
            return torch.zeros_like(z)
        ups = torch.stack([adapter(z) for adapter in adapters], dim=2)  # (..., n, d)
        keys = self.key(ups)
        values = self.value(ups) if self.value is not None else ups
        scores = torch.matmul(self.query(z).unsqueeze(-2), keys.transpose(-2, -1)).squeeze(-2)
        probabilities = torch.softmax(self.dropout(scores) / self.temperature, dim=-1)
        self.temperature = max(self.temperature - self.reduction, 1.0)
        if self.record:
            self.probabilities = probabilities.detach()
        return torch.matmul(probabilities.unsqueeze(-2), values).squeeze(-2)

    def regularization(self) -> torch.Tensor | None:
        if self.value is None:
            return None
        eye = torch.eye(self.value.weight.shape[0], dtype=self.value.weight.dtype, device=self.value.weight.device)
        return ((eye - self.value.weight) ** 2).sum()


class FusionPatch(AdapterPatch):
    def __init__(self, layer: nn.Module, name: str, fusion: Fusion, adapters: list[nn.Module], weight: float) -> None:
        super().__init__(layer, layer, {name: fusion})
        self.fusion, self.adapters, self.weight = fusion, adapters, weight
        self.set_active(True)

    def set_active(self, active: bool) -> None:
        super().set_active(active)
        for adapter in self.adapters:
            adapter.__dict__[DROP_SWITCH].fused = active

    def revert(self) -> None:
        for adapter in self.adapters:
            adapter.__dict__[DROP_SWITCH].fused = False
        super().revert()

    def regularization(self) -> torch.Tensor | None:
        term = self.fusion.regularization()
        return None if term is None or self.weight == 0 or self.fusion.dropped else term * self.weight

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {"temperature": torch.tensor([self.fusion.temperature], dtype=torch.float64)}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        value = state.get("temperature")
        if set(state) != {"temperature"} or value is None or value.shape != (1,) or value.dtype != torch.float64:
            raise PlanError(f"a fusion's saved state is one float64 temperature, not {sorted(state)}")
        temperature = float(value[0])
        if not 1.0 <= temperature <= 50.0:
            raise PlanError(f"a fusion's temperature lies in [1, 50], not {temperature}")
        self.fusion.temperature = temperature


def fusion_name(params: FuseParams) -> str:
    """The fusion module's name on the layer (AdapterHub names a fusion by its adapters, 'a,b')."""
    return f"adapter_fusion[{','.join(params.adapters)}]"


@register
class Fuse(Method):
    verb = "fuse"
    name = "fuse"  # registered under its verb: `fuse adapters <a,b>` reads "adapters" as a word
    Params = FuseParams
    prepositions = frozenset()
    kinds = frozenset({"container"})
    stacks_on = frozenset({"adapter"})
    unmergeable_because = "an AdapterFusion layer attends over adapters per token, which no weight matrix holds"
    summary = "AdapterFusion: attention over named pfeiffer adapters at the same places (AdapterHub's math)"
    _form: ClassVar[str] = "fuse adapters <NAME,NAME,...> [temperature=true] [config=static]"

    @classmethod
    def read_words(cls, words: tuple[Word, ...]) -> WordArgs:
        if len(words) != 2 or words[0].text != "adapters":
            where = words[0] if words else None
            if where is None:
                raise PlanError(f"fuse names the adapters it fuses: {cls._form}")
            raise WordError("fuse takes 'adapters <a,b,...>'", where, cls._form)
        text = words[1].text
        if not (text.startswith("<") and text.endswith(">")) or words[1].quoted:
            raise WordError(f"'{text}' is no list of adapter names", words[1], cls._form)
        names = [name.strip() for name in text[1:-1].split(",")]
        if len(names) < 2 or not all(names):
            raise WordError("a fusion fuses at least two named adapters", words[1], cls._form)
        return WordArgs(params={"adapters": names}, adapters=[words[1].model_copy(update={"text": n}) for n in names])

    @classmethod
    def place_over(cls, named: dict[str, list[tuple[Target, str, dict[str, Any]]]],
                   params: MethodParams) -> list[Target]:
        places: dict[str, tuple[str, ...]] = {}
        for name, rewrites in named.items():
            for target, method, adapter in rewrites:
                if method != "inject adapter" or target.preposition in ("after", "beside") \
                        or adapter.get("config") != "pfeiffer":
                    what = method if method != "inject adapter" else (
                        f"inject adapter {target.preposition} ..." if target.preposition in ("after", "beside")
                        else f"inject adapter config={adapter.get('config')}")
                    raise PlanError(f"'{name}' is '{what}': fuse adapters fuses pfeiffer bottleneck adapters "
                                    "(inject adapter config=pfeiffer), AdapterFusion's own")
            places[name] = tuple(t.path for t, _, _ in rewrites)
        first, *rest = named
        for name in rest:
            if places[name] != places[first]:
                only = sorted(set(places[first]) ^ set(places[name]))
                raise PlanError(f"'{first}' and '{name}' sit at different places ({len(places[first])} and "
                                f"{len(places[name])} layers; not both in {', '.join(only[:3])}): a fusion needs "
                                "its adapters in the same layers")
        return [target.model_copy(update={"preposition": None, "label": None}) for target, _, _ in named[first]]

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        if target.type_name not in _PLACEMENTS:
            return f"{target.path} is a {target.type_name}: fusion placement is known for {', '.join(sorted(_PLACEMENTS))}"
        return None if target.hidden_size else f"{target.path}: the model's config gives no hidden_size"

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, FuseParams)
        d, site = target.hidden_size or 0, fusion_name(params)
        shapes = {f"{site}.query.weight": (d, d), f"{site}.query.bias": (d,),
                  f"{site}.key.weight": (d, d), f"{site}.key.bias": (d,)}
        return shapes | ({f"{site}.value.weight": (d, d)} if params.config == "dynamic" else {})

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, FuseParams) and target.hidden_size
        layer = model.get_submodule(target.path)
        adapters = []
        for name in params.adapters:
            adapter = layer._modules.get(f"adapter_output[{name}]")
            if adapter is None:
                raise SurgeryError(f"{target.path} holds no adapter '{name}' to fuse")
            adapters.append(adapter)
        dropout = params.dropout if params.dropout is not None else \
            float(getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0)
        fusion = Fusion(target.hidden_size, adapters, params, dropout, next(adapters[0].parameters()))
        fusion.train(layer.training)
        if ctx.init:
            fusion.initialise(ctx.generator)
        patch = FusionPatch(layer, fusion_name(params), fusion, adapters, params.regularization)
        wire_pfeiffer(patch, _PLACEMENTS[type(layer).__name__].at(layer), fusion)
        return patch
