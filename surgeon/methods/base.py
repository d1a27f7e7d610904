"""The protocol every method follows, and the registry the planner resolves statements against.

A method is a class with:
- `verb`, `name`: how a statement names it (`inject lora ...`),
- `Params`: a pydantic model of its parameters (unknown keys are rejected with suggestions),
- `prepositions`: the clauses it takes (`into`, `after`, ...; `except` is always allowed),
- `kinds`: the module kinds it accepts (`linear`, `conv1d`, `embedding`, `conv2d`, `model`, ...),
- `check(target, params)`: a reason to reject a target, from shapes alone (no tensor is read),
- `added_shapes(target, params)`: the parameters it will add, for the plan and the totals,
- `read_words(words)`: what the bare words after the method name mean (`quantize base nf4 double`),
- `memory(target, params)`: bytes of the target's own tensors before and after (quantization),
- `apply(model, target, params, ctx)`: patch and return a `Patch`, which knows how to undo itself.

Three seams cover the catalogue (DESIGN.md): wrap a layer (`WrapPatch` below: the original module
object is kept inside the wrapper and put back on revert), add a module in the data path (hooks or a
wrapper around the parent), and change what attention or the embedding sees (patched functions and
buffers). All three hand back a `Patch`; the surgery stage only ever calls its methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from surgeon.errors import ExportError, PlanError
from surgeon.graph import unwrap, wrapped
from surgeon.manifest import TensorRecord
from surgeon.originals import Originals
from surgeon.spec import Word


class WordError(PlanError):
    """A statement's bare word that the method cannot read; the planner points at it."""

    def __init__(self, message: str, word: Word, hint: str | None = None) -> None:
        super().__init__(message)
        self.word, self.hint = word, hint


class MethodParams(BaseModel):
    """Parameters common to every method."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tied: bool = Field(False, description="accept targets whose weights are tied to other modules")


class Target(BaseModel):
    """One module a rewrite applies to, as the planner saw it (shapes only, no tensors)."""

    model_config = ConfigDict(frozen=True)
    path: str
    type_name: str
    kind: str
    role: str | None = None
    slices: dict[str, tuple[int, int]] = Field(default_factory=dict)  # empty: the whole module
    weight_shape: tuple[int, ...] | None = None
    in_features: int | None = None
    out_features: int | None = None
    dtype: str | None = None
    has_bias: bool = False
    merged: bool = False  # its weight already holds a merged delta
    kv_dim: int | None = None  # an attention module's key (= value) width: its k projection's outputs
    hidden_size: int | None = None  # the model's hidden width (what a module in the data path maps)
    max_positions: int | None = None  # the model's trained context length (config.max_position_embeddings)
    preposition: str | None = None  # the clause that named it: `after *.mlp` places an adapter after the FFN
    label: str | None = None  # the named adapter (`... as NAME`) the rewrite belongs to


@dataclass
class ApplyContext:
    """What the surgery hands every `apply`: whether to draw initial weights, where replaced
    originals are kept readable, and the generator to draw them from (a seeded apply's own;
    None: torch's global RNG, as torch's initialisers use)."""

    init: bool = True
    originals: Originals | None = None
    generator: torch.Generator | None = None


@dataclass
class WordArgs:
    """What a statement's bare words said: parameters, and target patterns with their locations.
    `lenient` targets keep only the modules the method accepts (`base` = every linear layer)."""

    params: dict[str, Any] = field(default_factory=dict)
    patterns: list[tuple[str, Word]] = field(default_factory=list)
    excepts: list[str] = field(default_factory=list)
    lenient: bool = False
    adapters: list[Word] = field(default_factory=list)  # named adapters the statement composes (fuse <a,b>)


class Patch(ABC):
    """A change made to a live model; knows its added parameters and how to undo itself exactly."""

    mergeable: ClassVar[bool] = False
    # False for a patch that changes the base itself rather than adding to it (quantization):
    # `job.disabled()` sets the others aside and keeps it, as PEFT's disable_adapter keeps a 4-bit base
    adapts: ClassVar[bool] = True

    @abstractmethod
    def added_parameters(self) -> dict[str, nn.Parameter]:
        """Local name -> parameter this patch added (what the user trains)."""

    def trained_base_parameters(self) -> dict[str, nn.Parameter]:
        """Model parameter name -> base parameter this patch made trainable (its original is kept)."""
        return {}

    @abstractmethod
    def revert(self) -> None:
        """Undo the patch: the model holds exactly the objects it held before `apply`."""

    def merge(self) -> None:
        raise PlanError(f"{type(self).__name__} cannot be merged into the weights")

    def set_active(self, active: bool) -> None:
        """Switch this patch's change off (the model computes what it computed without it, bit for
        bit) or on again, keeping every tensor where it is: named adapters (`job.activate`).
        A patch that changes base tensors in place cannot be switched."""
        raise PlanError(f"{type(self).__name__} changes the base itself and cannot be switched off; "
                        "leave its statement unnamed (unnamed statements are always on)")

    def set_weight(self, weight: float) -> None:
        """Scale this patch's change by `weight` (`job.activate({name: weight})`: a weighted average
        of the adapters' outputs); weight 1 computes exactly what the unweighted patch computes.
        Only a change linear in its scale can be weighted."""
        raise PlanError("it cannot be weighted: weighted activation scales weight deltas (LoRA, LoHa, LoKr)")

    def requantize(self) -> None:
        """After every patch has merged: store the merged weights in this patch's lossy format
        again (quantizing methods; the others have nothing to do)."""

    def step(self, global_step: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Called by `job.step(global_step, optimizer)` after each optimizer step, for methods whose
        structure changes during training (AdaLoRA's rank budget, ReLoRA's restarts)."""

    def fold(self) -> bool:
        """Replace a training-time reparameterisation by the plain tensors it produces, keeping the
        outputs equal (prefix tuning's MLP -> the prefix). True when something was folded; after it,
        `added_parameters()` are the folded tensors. `job.fold()` calls it; a saved run records it."""
        return False

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the added and trained parameters that a saved run needs to rebuild this
        patch as it is now (ReLoRA's base weight after restarts). Saved by `job.save`, handed back
        to `load_saved_state` by `surgeon.load`."""
        return {}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise PlanError(f"{type(self).__name__} keeps no saved state, but the run holds {sorted(state)}")

    def regularization(self) -> torch.Tensor | None:
        """A term this patch adds to the loss (AdaLoRA's orthogonality); `job.regularization()` sums them."""
        return None

    def check_revertible(self, fingerprint: dict[str, TensorRecord]) -> None:
        """Raise RevertError if revert could not be completed (originals gone or changed).
        Called for every patch before any of them is reverted, so a failure changes nothing."""


class Method(ABC):
    verb: ClassVar[str]
    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    prepositions: ClassVar[frozenset[str]] = frozenset({"into"})
    kinds: ClassVar[frozenset[str]] = frozenset()
    takes_slices: ClassVar[bool] = False  # can it act on a q/k/v slice of a fused projection?
    stacks_on: ClassVar[frozenset[str]] = frozenset()  # methods that may precede it on one module
    # placed by role (an adapter after `*.mlp`): of matched modules sharing one role path, the
    # planner keeps the last (BERT's FFN output, not its `intermediate` half)
    places_by_role: ClassVar[bool] = False
    # several named adapters of such methods may sit on one module (`inject lora ... as a` and `... as b`
    # on the same q): each only calls what it wraps, or hooks the module, so they stack in spec order
    shares_modules: ClassVar[bool] = False
    # a named adapter of it computes on the rows of a mixed batch that name it alone (adapter_names=)
    routes_rows: ClassVar[bool] = False
    refuses_stack: ClassVar[dict[str, str]] = {}  # method -> why this one cannot share a module with it
    # model-wide things this method takes over ("inputs": what the model sees before the first layer;
    # "attention": the attention function). Two statements that claim the same thing are rejected.
    claims: ClassVar[frozenset[str]] = frozenset()
    mergeable: ClassVar[bool] = False
    # why not, for `merge`'s refusal (a method that is not mergeable says what it is instead)
    unmergeable_because: ClassVar[str] = "it changes what the model computes in a way no weight holds"
    streams: ClassVar[bool] = False  # may be applied tensor by tensor while a checkpoint loads
    summary: ClassVar[str] = ""
    # the pattern a statement without a target clause means (`train bias` = "**": every module the
    # method accepts); None: a target is required
    default_target: ClassVar[str | None] = None
    # what the model lacks when a statement without a target finds nothing the method acts on
    # (`scale rope` on GPT-2): the planner's message then
    absent: ClassVar[str | None] = None
    # PEFT interchange (surgeon/peft_format.py): PEFT's `peft_type` for this method, None when PEFT
    # has no equivalent; the hooks below translate parameters and tensors both ways.
    peft_type: ClassVar[str | None] = None
    # "module": PEFT keys its tensors per adapted module (LoRA's `...q_proj.lora_A.weight`);
    # "model": PEFT's prompt learning keeps one top-level tensor (`prompt_embeddings`). For "model"
    # methods the tensor hooks see every patch of the statement at once, keyed "module.path.local",
    # and name PEFT's tensors without a module path. "modules_to_save": no adapter type of its own,
    # but PEFT's `modules_to_save` beside one (`train weights`): the tensor hooks see the target's
    # trained base parameters, keyed by their model names, and name them as the module holds them.
    peft_scope: ClassVar[str] = "module"

    @classmethod
    def read_words(cls, words: tuple[Word, ...]) -> WordArgs:
        """Bare words after the method name. Most methods take none."""
        if words:
            raise WordError(f"unexpected word '{words[0].text}' after '{cls.verb} {cls.name}'", words[0],
                            "parameters are written key=value")
        return WordArgs()

    @classmethod
    def claims_of(cls, params: MethodParams) -> frozenset[str]:
        """What a statement with these parameters takes over (`attend alibi rope=off` takes RoPE too)."""
        return cls.claims

    @classmethod
    def place_over(cls, named: dict[str, list[tuple[Target, str, dict[str, Any]]]],
                   params: MethodParams) -> list[Target]:
        """For a statement over named adapters (`fuse adapters <a,b>`, its words name them in
        `WordArgs.adapters`): its targets, from the (target, method as said, params) of each named
        adapter's rewrites; a PlanError says why they do not compose."""
        raise PlanError(f"{cls.verb} {cls.name} does not compose named adapters")

    @classmethod
    def describe(cls, target: Target, params: MethodParams) -> str | None:
        """A line for `surgeon check` saying what changes beyond added tensors ("positions: 4096 ->
        16384 (linear x4)"), or None."""
        return None

    @classmethod
    def memory(cls, target: Target, params: MethodParams) -> tuple[int, int]:
        """Bytes of the target's own tensors before and after the rewrite (added ones apart)."""
        return 0, 0

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        """A reason this target cannot take the method with these parameters, or None."""
        if target.kind not in cls.kinds:
            accepted = ", ".join(sorted(cls.kinds))
            return f"{target.path} is a {target.type_name} ({target.kind}); {cls.name} accepts {accepted}"
        return None

    @classmethod
    @abstractmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        """Local parameter name -> shape of what `apply` will add."""

    @classmethod
    def keeps(cls, target: Target, params: MethodParams) -> bool:
        """For a lenient pattern (`quantize base`, `train bias`): whether a matched module of an
        accepted kind is one this statement means (BitFit's only=<q,v> keeps q and v)."""
        return True

    @classmethod
    def trained_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        """Local name -> shape of the target's own parameters `apply` will make trainable (BitFit's
        biases, LoRA's bias=lora_only), for the plan's trainable count."""
        return {}

    @classmethod
    @abstractmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        """Patch the module at target.path of `model` and return the patch. `ctx.init` False: the
        caller will load the added weights, so skip random initialisation."""


    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        """adapter_config.json entries for one statement's parameters (peft_type and
        target_modules are filled in by the exporter). Raise ExportError for what PEFT cannot say."""
        raise ExportError(f"{cls.verb} {cls.name} has no PEFT equivalent")

    @classmethod
    def peft_target_config(cls, params: MethodParams, targets: list[Target]) -> dict[str, Any]:
        """adapter_config.json entries that depend on which modules one statement targets
        (IA3's feedforward_modules); most methods have none."""
        return {}

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This patch's added tensors (local names, as `added_shapes` names them) under PEFT's
        names relative to the target module (`lora_A.weight`), in PEFT's layout. Raise ExportError
        for a target PEFT cannot hold (a slice of a fused projection)."""
        raise ExportError(f"{cls.verb} {cls.name} has no PEFT equivalent")

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of `to_peft_tensors`."""
        raise ExportError(f"{cls.verb} {cls.name} has no PEFT equivalent")

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        """The spec statement that says what a PEFT adapter_config.json says, for the module
        names in `targets` (their full paths). Raise ExportError for options surgeon lacks."""
        raise ExportError(f"{cls.verb} {cls.name} has no PEFT equivalent")


@dataclass
class DropSwitch:
    """The handle on one adapter-family module (a bottleneck adapter, a layer's prefix): while it
    is `off` the module adds nothing on its own and the layer computes what the base computes.
    AdapterDrop sets `dropped` (per forward); `job.activate` sets `inactive` (named adapters)."""

    dropped: bool = False
    inactive: bool = False
    fused: bool = False  # an AdapterFusion layer computes with the module instead (fusion.py)

    @property
    def off(self) -> bool:
        return self.dropped or self.inactive or self.fused


DROP_SWITCH = "_surgeon_drop_switch"  # the module attribute (in __dict__) holding its DropSwitch
# UniPELT's gate on an adapter's module (a LoRA wrapper, a bottleneck): its child of this name,
# whose tensors are the gate statement's (data_path/gate.py), not the adapter's
GATE = "gate"


def gate_of(module: nn.Module, child: str = GATE) -> nn.Module | None:
    """The module's gate, when a gate statement gave it one and it is on."""
    gate = module._modules.get(child)
    return gate if gate is not None and getattr(gate, "active", False) else None


def own_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """An adapter module's parameters, without its gate's (and without what it wraps)."""
    for name, param in module.named_parameters():
        if not name.startswith(("base.", GATE + ".")):
            yield name, param


def drop_switches(module: nn.Module) -> list[DropSwitch]:
    """The switches of every adapter-family module in `module`'s subtree (`drop adapters` turns them)."""
    return [m.__dict__[DROP_SWITCH] for m in module.modules() if DROP_SWITCH in m.__dict__]


def locate(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute name, module) of the module at `path`."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, attr, getattr(parent, attr)


def parameter_name(model: nn.Module, param: nn.Parameter, default: str) -> str:
    """The name `model.named_parameters()` gives `param` once every patch is reverted: its first
    owner in module order, seen through surgeon's wrappers (a wrapper's `.base` stands at the
    wrapper's path). A tied tensor has one such name whichever owner a statement reached it by,
    so two statements that train it name it once (in `trainable_parameters()` and in a saved
    run). `default` when the model does not hold it."""
    for name, found in _original_parameters(model, ""):
        if found is param:
            return name
    return default


def _original_parameters(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Parameter]]:
    if (base := wrapped(module)) is not None:  # its original
        yield from _original_parameters(base, prefix)
        return
    for local, param in module._parameters.items():
        if param is not None:
            yield prefix + local, param
    for name, child in module._modules.items():
        if child is not None:
            yield from _original_parameters(child, f"{prefix}{name}.")


_REGISTRY: dict[tuple[str, str], type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    _REGISTRY[(method.verb, method.name)] = method
    return method


def registry() -> dict[tuple[str, str], type[Method]]:
    from surgeon import methods  # noqa: F401  (importing the package registers every method)

    return _REGISTRY


class WrapsLayer:
    """For a wrapper module: the wrapped layer's `weight`, which model code reads off the module it
    calls (T5's feed-forward checks `wo.weight.dtype`), as PEFT's layers let it."""

    @property
    def weight(self) -> torch.Tensor:
        return unwrap(self.base).weight  # type: ignore[attr-defined]


class WrapPatch(Patch):
    """The wrap seam: `wrapper` stands where `original` stood; revert puts the very object back.

    Wrappers provide `delta_weights()` (parameter name of the original -> delta) to be mergeable.
    A merge replaces the original's parameters with new ones and keeps the old objects, so revert
    after merge is still exact (no subtraction, no rounding).

    Named adapters on one module nest (the later wraps the earlier), so a patch finds its wrapper
    where it stands now (`slot`), and merges into the module under every wrapper (`unwrap`).
    Patches are reverted in reverse order, so each finds its wrapper back where it put it.
    """

    def __init__(self, parent: nn.Module, attr: str, original: nn.Module, wrapper: nn.Module) -> None:
        self.parent, self.attr, self.original, self.wrapper = parent, attr, original, wrapper
        self.replaced: dict[str, nn.Parameter] = {}
        self.merged_into: nn.Module | None = None
        self.merged_slot: tuple[nn.Module, str] | None = None
        self.replaced_in: nn.Module | None = None  # the module whose parameters `replaced` held
        self.mergeable = hasattr(wrapper, "delta_weights")
        setattr(parent, attr, wrapper)

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return dict(own_parameters(self.wrapper))

    def slot(self) -> tuple[nn.Module, str] | None:
        """(module, attribute) holding this patch's wrapper now: the parent's attribute, or the
        `base` of a wrapper stacked on it later; None once a merge took it out."""
        holder, attr = self.parent, self.attr
        while (current := getattr(holder, attr)) is not self.wrapper:
            if wrapped(current) is None:
                return None
            holder, attr = current, "base"
        return holder, attr

    def merge(self) -> None:
        if not self.mergeable:
            super().merge()
        if self.merged_into is not None:
            return
        slot = self.slot()
        if slot is None:
            raise PlanError(f"the wrapper of {self.attr} is no longer in the model")
        with torch.no_grad():
            deltas = self.wrapper.delta_weights()
            below = self.wrapper._modules["base"]
            target = unwrap(below)
            if hasattr(target, "merged_with"):  # a patched base (quantized) folds it itself
                if target is not below:
                    raise PlanError(f"{self.attr}: a quantized layer under several named adapters cannot be merged")
                self.merged_into = target.merged_with(deltas)
            else:
                for name, delta in deltas.items():
                    old = target._parameters[name]
                    self.replaced[name] = old
                    merged = nn.Parameter((old + delta.to(old.dtype)), requires_grad=old.requires_grad)
                    merged._surgeon_merged = True  # type: ignore[attr-defined]
                    target._parameters[name] = merged
                self.merged_into, self.replaced_in = below, target
        self.merged_slot = slot
        setattr(*slot, self.merged_into)

    def set_active(self, active: bool) -> None:
        """Off: the wrapper stays where it is (its tensors stay in the model's state_dict, so every
        checkpoint holds them) but forwards to the original alone, which computes what it computed
        before apply."""
        if self.merged_into is not None:
            raise PlanError(f"{self.attr} is merged into the weights and cannot be switched off; revert to switch")
        if active:
            self.wrapper.__dict__.pop("forward", None)
        else:
            self.wrapper.__dict__["forward"] = self.wrapper._modules["base"].__call__

    def set_weight(self, weight: float) -> None:
        """The wrapper's delta scaled: its `scale` times `weight` (wrappers that declare `weighable`)."""
        if not getattr(self.wrapper, "weighable", False):
            super().set_weight(weight)
        if self.merged_into is not None:
            raise PlanError(f"{self.attr} is merged into the weights and cannot be weighted; revert to weight it")
        unweighted = self.wrapper.__dict__.setdefault("_surgeon_unweighted_scale", self.wrapper.scale)
        self.wrapper.scale = unweighted if weight == 1 else unweighted * weight

    def revert(self) -> None:
        target = self.replaced_in or unwrap(self.original)  # (ReLoRA's restarts keep W0 in `replaced` too)
        for name, old in self.replaced.items():
            target._parameters[name] = old
        self.replaced, self.replaced_in = {}, None
        slot = self.slot() or self.merged_slot  # merged: where the merged module stands
        self.merged_into, self.merged_slot = None, None
        if slot is not None:
            setattr(*slot, self.original)
