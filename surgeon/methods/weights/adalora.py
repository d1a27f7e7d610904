"""AdaLoRA (Zhang et al. 2023): an SVD-shaped update whose rank budget shrinks during training.

    h = W0 x + P diag(lambda) Q dropout(x) * alpha / (init_r + 1e-5)

PEFT's names and layouts: `lora_A` = Q (r x d_in), `lora_E` = lambda (r x 1), `lora_B` = P (d_out x r).
As in PEFT, E starts at zero and A, B are N(0, 0.02^2), so the output equals the original's at step 0,
and the scale divides by the initial rank (PEFT's `ranknum`, which masking never changes).

Training (PEFT's RankAllocator, one per statement: the budget is shared by every matrix the
statement adapts): `job.step(global_step, optimizer)` after each `optimizer.step()`, gradients still
present, updates each entry's importance |w * grad w| smoothed by an EMA (beta1) times its
uncertainty (beta2); the total budget falls cubically from init_r to target_r per matrix between
steps tinit and total_steps - tfinal, and every deltaT steps the least important triplets
(lambda_i, P[:, i], Q[i]) are masked (lambda_i = 0). From total_steps - tfinal on, the final mask is
re-applied every step. `job.regularization()` gives PEFT's orthogonality term:
orth_reg_weight * mean over all A and B of ||A A^T - I||_F and ||B^T B - I||_F (the norm, not its
square, exactly as PEFT computes it).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from surgeon.errors import ExportError, SurgeonError
from surgeon.methods._rng import draw
from surgeon.methods.base import ApplyContext, Method, MethodParams, Patch, Target, WrapPatch, locate, register
from surgeon.methods.weights.lora import compute_dtype_device, own_dtype

_INIT_STD = 0.02  # PEFT's reset_lora_parameters: normal(0, 0.02) for A and B


class AdaLoraParams(MethodParams):
    init_r: int = Field(12, ge=1, description="initial rank of every adapted matrix")
    target_r: int = Field(8, ge=1, description="average rank per matrix once the budget has fallen")
    tinit: int = Field(0, ge=0, description="warm-up steps before the budget starts to fall")
    tfinal: int = Field(0, ge=0, description="final steps trained with the final ranks fixed")
    total_steps: int | None = Field(None, ge=1, validate_default=True,
                                    description="training steps the budget schedule spans (PEFT's total_step)")
    deltaT: int = Field(1, ge=1, description="steps between two budget allocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonality regulariser")
    alpha: float = Field(8.0, gt=0, description="scale numerator (PEFT's lora_alpha); scale alpha/init_r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")

    @field_validator("target_r")
    @classmethod
    def _target_at_most_init(cls, value: int, info: ValidationInfo) -> int:
        init_r = info.data.get("init_r")
        if init_r is not None and value > init_r:
            raise ValueError(f"target_r={value} is above init_r={init_r}: AdaLoRA only lowers the rank; "
                             "make target_r <= init_r")
        return value

    @field_validator("total_steps")
    @classmethod
    def _schedule_has_room(cls, value: int | None, info: ValidationInfo) -> int:
        if value is None:
            raise ValueError("AdaLoRA needs total_steps=N, the number of training steps its rank schedule spans")
        tinit, tfinal = info.data.get("tinit"), info.data.get("tfinal")
        if tinit is not None and tfinal is not None and tinit + tfinal >= value:
            raise ValueError(f"tinit={tinit} + tfinal={tfinal} leaves no budgeting phase in total_steps={value} "
                             "(the rank falls between step tinit and total_steps - tfinal); "
                             "lower tinit or tfinal, or raise total_steps")
        return value


class AdaLoraLinear(nn.Module):
    """The SVD-shaped update beside nn.Linear or transformers' Conv1D, whole or on named slices of the
    output (GPT-2's fused c_attn): each slice is a matrix of its own in the budget."""

    def __init__(self, base: nn.Module, target: Target, params: AdaLoraParams, init: bool,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        self.alpha = params.alpha
        self.dropout = nn.Dropout(params.dropout) if params.dropout > 0 else nn.Identity()
        self.train(base.training)  # a wrapper made in eval mode stays in eval mode
        dtype, device = compute_dtype_device(base)
        self.transposed = target.kind == "conv1d"
        assert target.in_features is not None and target.out_features is not None
        self.in_features, self.out_features = target.in_features, target.out_features
        self.slices = dict(target.slices)
        r = params.init_r
        for suffix, width in _unit_widths(target).items():
            for name, shape in (("lora_A", (r, self.in_features)), ("lora_E", (r, 1)), ("lora_B", (width, r))):
                self.register_parameter(name + suffix, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))
            if init:
                draw(self.get_parameter("lora_A" + suffix).data, nn.init.normal_, generator, mean=0.0, std=_INIT_STD)
                draw(self.get_parameter("lora_B" + suffix).data, nn.init.normal_, generator, mean=0.0, std=_INIT_STD)
        # a loaded run's masked triplets arrive as lambda = 0; the first forward reads them (after the
        # weights are filled, before any optimizer step) so the final mask can be kept past the schedule
        self.loaded = not init and device.type != "meta"
        self.loaded_kept: dict[str, list[bool]] | None = None
        # PEFT divides by the tensor `ranknum + 1e-5`; the same tensor arithmetic gives the same bits
        self.register_buffer("ranknum", torch.full((1,), float(r), dtype=dtype, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """A's dtype (PEFT casts the input to it), read on every forward: a model cast after apply
        computes in its new dtype."""
        return own_dtype(self)

    def triplet(self, suffix: str) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """(A, E, B) of one matrix: "" for the whole layer, "_q" for the q slice."""
        return (self.get_parameter("lora_A" + suffix), self.get_parameter("lora_E" + suffix),
                self.get_parameter("lora_B" + suffix))

    @property
    def suffixes(self) -> list[str]:
        return [f"_{name}" for name in self.slices] or [""]

    def _update(self, h: torch.Tensor, suffix: str) -> torch.Tensor:
        a, e, b = self.triplet(suffix)
        return (h @ (a * e).T @ b.T) * self.alpha / (self.ranknum + 1e-5)  # PEFT's order of operations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.loaded and self.loaded_kept is None:
            self.loaded_kept = {s: (self.triplet(s)[1].view(-1) != 0).tolist() for s in self.suffixes}
        out = self.base(x)
        h = self.dropout(x).to(self.dtype)  # a quantized base computes in its own dtype, and so do we
        if not self.slices:
            return out + self._update(h, "").to(out.dtype)
        for name, (start, stop) in self.slices.items():
            out[..., start:stop] += self._update(h, f"_{name}").to(out.dtype)
        return out

    def delta_weights(self) -> dict[str, torch.Tensor]:
        dtype, device = compute_dtype_device(self.base)
        delta = torch.zeros((self.out_features, self.in_features), dtype=dtype, device=device)
        spans = {f"_{n}": span for n, span in self.slices.items()} or {"": (0, self.out_features)}
        for suffix, (start, stop) in spans.items():
            a, e, b = self.triplet(suffix)
            delta[start:stop] += (b @ (a * e)) * self.alpha / (self.ranknum + 1e-5)
        return {"weight": delta.T if self.transposed else delta}  # in the layout of the original module


def _unit_widths(target: Target) -> dict[str, int]:
    """Output width of each matrix a target holds, by parameter-name suffix."""
    if not target.slices:
        return {"": target.out_features or 0}
    return {f"_{name}": stop - start for name, (start, stop) in target.slices.items()}


class RankAllocator:
    """PEFT's RankAllocator and AdaLoraModel.update_and_allocate, over the matrices of one statement.

    Matrices ("units") are named by module path, plus `.q` for a slice; state is keyed (unit, letter)."""

    def __init__(self, params: AdaLoraParams) -> None:
        self.params = params
        self.units: dict[str, tuple[AdaLoraLinear, str]] = {}
        self.patches: list[AdaLoraPatch] = []
        self.paths: set[str] = set()
        self.started = False  # once training has begun, no later apply joins this budget
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def join(self, patch: AdaLoraPatch, path: str) -> None:
        self.patches.append(patch)
        self.paths.add(path)
        for suffix in patch.wrapper.suffixes:
            self.units[path + suffix.replace("_", ".", 1)] = (patch.wrapper, suffix)

    def leave(self, patch: AdaLoraPatch) -> None:
        self.patches = [p for p in self.patches if p is not patch]
        self.paths.discard(patch.path)
        self.units = {n: u for n, u in self.units.items() if u[0] is not patch.wrapper}

    @property
    def leader(self) -> AdaLoraPatch | None:
        """The patch whose `step` runs the allocation: job.step calls every patch, the budget acts once."""
        return self.patches[0] if self.patches else None

    @property
    def init_budget(self) -> int:
        return self.params.init_r * len(self.units)

    @property
    def target_budget(self) -> int:
        return self.params.target_r * len(self.units)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to mask now): PEFT's cubic schedule."""
        p = self.params
        assert p.total_steps is not None
        if step <= p.tinit:
            return self.init_budget, False
        if step > p.total_steps - p.tfinal:
            return self.target_budget, True
        mul_coeff = 1 - (step - p.tinit) / (p.total_steps - p.tfinal - p.tinit)
        budget = int((self.init_budget - self.target_budget) * (mul_coeff**3) + self.target_budget)
        return budget, step % p.deltaT == 0

    def update_ipt(self) -> None:
        """Sensitivity |w * grad w| of every entry, smoothed (beta1), and its uncertainty (beta2)."""
        b1, b2 = self.params.beta1, self.params.beta2
        with torch.no_grad():
            for name, (wrapper, suffix) in self.units.items():
                for letter, param in zip("AEB", wrapper.triplet(suffix)):
                    if param.grad is None:
                        raise SurgeonError(f"AdaLoRA: {name} has no gradient; call job.step(step, optimizer) "
                                           "after optimizer.step() and before optimizer.zero_grad()")
                    key = (name, letter)
                    if key not in self.ipt:
                        self.exp_avg_ipt[key] = torch.zeros_like(param)
                        self.exp_avg_unc[key] = torch.zeros_like(param)
                    ipt = (param * param.grad).abs().detach()
                    self.ipt[key] = ipt
                    self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * ipt
                    self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()

    def triplet_score(self, name: str) -> torch.Tensor:
        """Importance of each of a matrix's r triplets: E's score plus the mean scores of A's row
        and B's column (PEFT's _combine_ipt)."""
        if (name, "E") not in self.exp_avg_ipt:
            raise SurgeonError(f"AdaLoRA: no importance scores for {name} yet; call job.step(step, optimizer) "
                               "after every optimizer step from the first one")
        score = {k: self.exp_avg_ipt[(name, k)] * self.exp_avg_unc[(name, k)] for k in "AEB"}
        a = torch.mean(score["A"], dim=1, keepdim=True)
        b = torch.mean(score["B"], dim=0, keepdim=False).view(-1, 1)
        return score["E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1, keepdim=False).view(-1)

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero lambda of every triplet at or below the (init - budget)-th smallest score."""
        scores = {name: self.triplet_score(name) for name in self.units}
        drop = self.init_budget - budget
        if drop <= 0:  # target_r == init_r: nothing to drop (PEFT's kthvalue would fail here)
            return {name: [True] * len(s) for name, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=drop)[0].item()
        pattern = {}
        with torch.no_grad():
            for name, score in scores.items():
                masked = score.view(-1, 1) <= threshold
                wrapper, suffix = self.units[name]
                wrapper.triplet(suffix)[1].masked_fill_(masked, 0.0)
                pattern[name] = (~masked).view(-1).tolist()
        return pattern

    def mask_with_pattern(self, pattern: dict[str, list[bool]]) -> None:
        with torch.no_grad():
            for name, (wrapper, suffix) in self.units.items():
                e = wrapper.triplet(suffix)[1]
                keep = torch.tensor(pattern[name], dtype=torch.bool, device=e.device).unsqueeze(-1)
                e.masked_fill_(~keep, 0.0)

    def pattern_from_weights(self) -> dict[str, list[bool]]:
        """A run loaded past the schedule has no stored pattern: the lambdas it was saved with, zero
        where masked, are the final mask."""
        pattern = {}
        for name, (wrapper, suffix) in self.units.items():
            if wrapper.loaded_kept is None:
                raise SurgeonError(f"AdaLoRA: step is past total_steps - tfinal but {name} was never allocated; "
                                   "call job.step(step, optimizer) after every optimizer step from step 0")
            pattern[name] = wrapper.loaded_kept[suffix]
        return pattern

    def update_and_allocate(self, step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate(global_step), branch for branch."""
        self.started = True
        _seal(self)
        assert self.params.total_steps is not None
        final = self.params.total_steps - self.params.tfinal
        if step < final:
            self.update_ipt()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self.rank_pattern = self.mask_to_budget(budget)
        elif step == final:
            self.rank_pattern = self.mask_to_budget(self.budget_schedule(step)[0])
            self.reset_ipt()
        else:
            if self.rank_pattern is None:
                self.rank_pattern = self.pattern_from_weights()
            self.mask_with_pattern(self.rank_pattern)

    def kept(self, name: str) -> list[bool]:
        """Which triplets of a matrix are kept now (all of them before the first allocation)."""
        if self.rank_pattern is not None and name in self.rank_pattern:
            return list(self.rank_pattern[name])
        wrapper, suffix = self.units[name]
        if wrapper.loaded_kept is not None:  # a loaded run, as it was saved
            return list(wrapper.loaded_kept[suffix])
        return [True] * self.params.init_r

    def orthogonality(self, wrapper: AdaLoraLinear) -> torch.Tensor:
        """This wrapper's share of PEFT's term: weight * sum of its norms / (2 * matrices in the budget)."""
        norms = []
        for suffix in wrapper.suffixes:
            a, _, b = wrapper.triplet(suffix)
            for cov in (a @ a.T, b.T @ b):
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                norms.append(torch.norm(cov - eye, p="fro"))
        return torch.stack(norms).sum() / (2 * len(self.units)) * self.params.orth_reg_weight


# Allocators still taking members, per model: the planner applies the targets of one statement one
# after another, so every target with equal parameters joins the open budget until training starts.
_OPEN: weakref.WeakKeyDictionary[nn.Module, list[RankAllocator]] = weakref.WeakKeyDictionary()


def _allocator_for(model: nn.Module, params: AdaLoraParams, path: str) -> RankAllocator:
    for allocator in _OPEN.get(model, []):
        if allocator.params == params and not allocator.started and path not in allocator.paths:
            return allocator
    allocator = RankAllocator(params)
    _OPEN.setdefault(model, []).append(allocator)
    return allocator


def _seal(allocator: RankAllocator) -> None:
    """Training has begun (or the budget emptied): later applies start a budget of their own."""
    for model, allocators in list(_OPEN.items()):
        if allocator in allocators:
            allocators.remove(allocator)
            if not allocators:
                del _OPEN[model]


class AdaLoraPatch(WrapPatch):
    mergeable = True

    def __init__(self, parent: nn.Module, attr: str, original: nn.Module, wrapper: AdaLoraLinear,
                 allocator: RankAllocator, path: str) -> None:
        super().__init__(parent, attr, original, wrapper)
        self.wrapper: AdaLoraLinear = wrapper
        self.allocator, self.path = allocator, path
        wrapper.allocator = allocator  # type: ignore[assignment]  (how `rank_pattern(model)` finds it)
        allocator.join(self, path)

    def step(self, global_step: int, optimizer: torch.optim.Optimizer | None) -> None:
        if self.merged_into is None and self.allocator.leader is self:
            self.allocator.update_and_allocate(global_step)

    def regularization(self) -> torch.Tensor | None:
        if self.merged_into is not None or self.allocator.params.orth_reg_weight == 0:
            return None
        return self.allocator.orthogonality(self.wrapper)

    def revert(self) -> None:
        super().revert()
        self.allocator.leave(self)
        if not self.allocator.patches:
            _seal(self.allocator)


def rank_pattern(model: nn.Module) -> dict[str, list[bool]]:
    """Which singular triplets each adapted matrix keeps now (PEFT's rank_pattern, keyed by module
    path, `path.q` for a slice), over every AdaLoRA budget in `model`."""
    found: dict[str, list[bool]] = {}
    for module in model.modules():
        allocator = getattr(module, "allocator", None) if isinstance(module, AdaLoraLinear) else None
        if allocator is not None:
            for name, (wrapper, _) in allocator.units.items():
                if wrapper is module:
                    found[name] = allocator.kept(name)
    return found


def ranks(model: nn.Module) -> dict[str, int]:
    """The rank each adapted matrix keeps now."""
    return {name: sum(kept) for name, kept in rank_pattern(model).items()}


@register
class AdaLora(Method):
    verb = "inject"
    name = "adalora"
    Params = AdaLoraParams
    kinds = frozenset({"linear", "conv1d"})
    takes_slices = True
    stacks_on = frozenset({"quantize"})
    mergeable = True
    summary = "SVD-shaped update whose rank budget shrinks by importance during training (Zhang et al. 2023)"

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        reason = super().check(target, params)
        if reason:
            return reason
        assert isinstance(params, AdaLoraParams)
        limit = min([target.in_features or 0, *_unit_widths(target).values()])
        if params.init_r > limit:
            return f"init_r={params.init_r} is larger than {target.path} allows (at most {limit})"
        return None

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, AdaLoraParams)
        r, d_in = params.init_r, target.in_features or 0
        shapes: dict[str, tuple[int, ...]] = {}
        for suffix, width in _unit_widths(target).items():
            shapes.update({f"lora_A{suffix}": (r, d_in), f"lora_E{suffix}": (r, 1), f"lora_B{suffix}": (width, r)})
        return shapes

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, AdaLoraParams)
        parent, attr, original = locate(model, target.path)
        init = ctx.init and compute_dtype_device(original)[1].type != "meta"  # nothing to draw on meta
        wrapper = AdaLoraLinear(original, target, params, init, ctx.generator)
        return AdaLoraPatch(parent, attr, original, wrapper, _allocator_for(model, params, target.path), target.path)

    # PEFT interchange: AdaLoraConfig; PEFT saves lora_A, lora_E, lora_B (no `.weight`: ParameterDicts)

    peft_type = "ADALORA"

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, AdaLoraParams)
        # rank_pattern stays None: the exported tensors keep all init_r triplets, the masked ones with
        # lambda = 0, so PEFT computes the same update without resizing anything
        return {"init_r": params.init_r, "target_r": params.target_r, "tinit": params.tinit,
                "tfinal": params.tfinal, "total_step": params.total_steps, "deltaT": params.deltaT,
                "beta1": params.beta1, "beta2": params.beta2, "orth_reg_weight": params.orth_reg_weight,
                "lora_alpha": params.alpha, "lora_dropout": params.dropout, "bias": "none",
                "init_lora_weights": True, "use_dora": False, "rank_pattern": None}

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if target.slices:
            raise ExportError(f"AdaLoRA on the {'/'.join(target.slices)} slice of the fused {target.path} has no "
                              "PEFT equivalent: PEFT adapts whole modules; target the whole module "
                              f"('into {target.path.rsplit('.', 1)[-1]}') to export")
        unknown = sorted(set(tensors) - set(_LETTERS))
        if unknown:
            raise ExportError(f"tensors {unknown} of {target.path} are not AdaLoRA's")
        return dict(tensors)  # same names, same layouts

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT saves a trained adapter cut to its rank_pattern (fewer rows than init_r); the kept
        triplets go first and the rest are zero (lambda = 0 and P, Q = 0, so they stay dead)."""
        assert isinstance(params, AdaLoraParams)
        if set(tensors) != set(_LETTERS):
            raise ExportError(f"PEFT tensors {sorted(tensors)} of {target.path} are not AdaLoRA's lora_A, lora_E, "
                              "lora_B")
        a, e, b = tensors["lora_A"], tensors["lora_E"], tensors["lora_B"]
        kept, r = a.shape[0], params.init_r
        if e.shape != (kept, 1) or b.shape[1] != kept or kept > r:
            raise ExportError(f"PEFT's AdaLoRA tensors of {target.path} disagree: lora_A {tuple(a.shape)}, "
                              f"lora_E {tuple(e.shape)}, lora_B {tuple(b.shape)}, init_r={r}")
        return {"lora_A": _pad(a, r, 0), "lora_E": _pad(e, r, 0), "lora_B": _pad(b, r, 1)}

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        if config.get("use_dora"):
            raise ExportError("a DoRA adapter (use_dora=true) is not AdaLoRA")
        if config.get("bias", "none") != "none":
            raise ExportError(f"PEFT bias={config['bias']!r} has no surgeon AdaLoRA equivalent")
        if config.get("alpha_pattern"):
            raise ExportError("PEFT alpha_pattern (a different alpha per module) has no surgeon AdaLoRA equivalent")
        if not config.get("total_step"):
            raise ExportError("the AdaLoRA config has no total_step")
        init_r = int(config.get("init_r", 12))
        alpha = config.get("lora_alpha", 8)
        words = [f"inject adalora init_r={init_r} target_r={int(config.get('target_r', 8))}",
                 f"tinit={int(config.get('tinit', 0))} tfinal={int(config.get('tfinal', 0))}",
                 f"total_steps={int(config['total_step'])} deltaT={int(config.get('deltaT', 1))}",
                 f"beta1={float(config.get('beta1', 0.85))!r} beta2={float(config.get('beta2', 0.85))!r}",
                 f"orth_reg_weight={float(config.get('orth_reg_weight', 0.5))!r}",
                 f"alpha={float(alpha if alpha > 0 else init_r)!r}"]  # PEFT: lora_alpha 0 means r
        if config.get("lora_dropout"):
            words.append(f"dropout={float(config['lora_dropout'])!r}")
        words.append(f"into <{','.join(targets)}>")
        return " ".join(words)


_LETTERS = ("lora_A", "lora_E", "lora_B")


def _pad(tensor: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros appended along `dim` up to `size`."""
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
