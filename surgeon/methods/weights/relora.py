"""ReLoRA (Lialin et al. 2023): high-rank training from low-rank updates, by restarting a LoRA.

    inject relora r=8 alpha=16 restart_every=500 warmup=50 into *.attn.<q,v>

rank(A + B) <= rank(A) + rank(B): every `restart_every` optimizer steps the LoRA's B A is folded
into the base weight, A is drawn again, B is zeroed and the optimizer's state of A and B is reset
(zeroed, or magnitude-pruned as the paper's 99% pruning), so the next cycle learns a new rank-r
direction; after k restarts the base has moved by up to k*r ranks. A restart runs in
`Patch.step(global_step, optimizer)`, which `job.step(global_step, optimizer)` calls after
`optimizer.step()`; `global_step` counts optimizer steps (1, 2, ...) and a restart happens when it
is a multiple of `restart_every`. The jagged cosine schedule (a cosine decay with a short linear
re-warm-up after each restart, which the paper finds essential after a reset) is
`jagged_cosine_schedule` (or `schedule_for(job, ...)`, which reads the statement's parameters).

Revert gives back the original W0 bit for bit: the first restart keeps the very W0 Parameter
aside and folds into a new one, as a merge does. A restarted base is not saved by `job.save`
(which stores added and trained tensors only): merge and save the merged model instead. A
quantized base would have to be requantized at every restart, so ReLoRA does not stack on
`quantize`. PEFT has no ReLoRA adapter type (the base weight itself changes during training).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from surgeon.errors import ManifestError, SurgeonError
from surgeon.methods.base import ApplyContext, Method, MethodParams, Patch, Target, locate, register
from surgeon.methods.weights.lora import Lora, LoraLinear, LoraParams, compute_dtype_device, init_lora_a, LoraPatch


class ReLoraParams(LoraParams):
    restart_every: int = Field(..., ge=1, description="optimizer steps between restarts (merge, re-init, reset)")
    warmup: int | None = Field(None, ge=0, description="linear re-warm-up steps of the jagged schedule after "
                                                        "each restart; default: restart_every // 10")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="the schedule's floor, as a fraction of the peak")
    optimizer_reset: Literal["zero", "magnitude"] = Field(
        "zero", description="at a restart, zero the optimizer state of A and B, or prune it by magnitude")
    prune_ratio: float = Field(0.99, gt=0.0, lt=1.0, description="fraction of the state that magnitude pruning zeroes")

    @field_validator("warmup")
    @classmethod
    def _fits_in_a_cycle(cls, value: int | None, info: ValidationInfo) -> int | None:
        every = info.data.get("restart_every")
        if value is not None and every is not None and value >= every:
            raise ValueError(f"warmup={value} must be shorter than restart_every={every} "
                             "(the re-warm-up happens inside each cycle)")
        return value

    @property
    def rewarmup(self) -> int:
        return self.warmup if self.warmup is not None else self.restart_every // 10


def _prune_by_magnitude_(state: torch.Tensor, ratio: float) -> None:
    """Zero the `ratio` smallest-magnitude entries in place (ReLoRA's optimizer pruning)."""
    magnitude = state.detach().abs().flatten().float()
    k = min(max(int(ratio * magnitude.numel()), 1), magnitude.numel())
    threshold = magnitude.kthvalue(k).values  # kthvalue, not quantile: quantile stops at 16M elements
    state.mul_((state.abs().float() > threshold).to(state.dtype))


class ReLoraPatch(LoraPatch):
    """A LoRA patch that merges and restarts itself; `replaced` holds W0 from the first restart on."""

    def __init__(self, parent: nn.Module, attr: str, original: nn.Module, wrapper: LoraLinear,
                 params: ReLoraParams, path: str) -> None:
        super().__init__(parent, attr, original, wrapper, params, path)
        self.params = params
        self.restarts = 0
        self.last_restart: int | None = None

    def step(self, global_step: int, optimizer: torch.optim.Optimizer | None) -> None:
        due = global_step > 0 and global_step % self.params.restart_every == 0
        if not due or self.merged_into is not None or global_step == self.last_restart:
            return
        if optimizer is None:
            raise SurgeonError(f"ReLoRA restarts at step {global_step} and must reset the optimizer's state of "
                               "A and B: call job.step(global_step, optimizer)")
        self.restart(optimizer)
        self.last_restart = global_step

    @torch.no_grad()
    def restart(self, optimizer: torch.optim.Optimizer) -> None:
        """Fold B A into the base, draw A again, zero B, reset their optimizer state."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in held for p in self.added_parameters().values()):  # checked before any change
            raise SurgeonError("the optimizer given to job.step() does not hold this ReLoRA's A and B: "
                               "build it from job.trainable_parameters()")
        self._fold(self.wrapper.delta_weights())
        for name, param in self.added_parameters().items():
            if name.startswith("lora_A"):
                init_lora_a(param.data, self.params)
            else:
                param.zero_()
        self._reset(optimizer)
        self.restarts += 1

    def _fold(self, deltas: dict[str, torch.Tensor]) -> None:
        for name, delta in deltas.items():
            current = self.original._parameters[name]
            if name in self.replaced:  # W0 is already kept aside; this weight is ours to change
                current.add_(delta.to(current.dtype))
                continue
            self.replaced[name] = current  # W0 itself: revert puts this very object back
            folded = nn.Parameter(current + delta.to(current.dtype), requires_grad=current.requires_grad)
            folded._surgeon_merged = True  # type: ignore[attr-defined]
            self.original._parameters[name] = folded

    def _reset(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero (or prune) every per-element state tensor of A and B (Adam's exp_avg and exp_avg_sq,
        SGD's momentum); the step count stays, as in ReLoRA's code."""
        for param in self.added_parameters().values():
            for key, value in optimizer.state.get(param, {}).items():
                if key == "step" or not torch.is_tensor(value) or not value.is_floating_point() \
                        or value.shape != param.shape:
                    continue
                if self.params.optimizer_reset == "zero":
                    value.zero_()
                else:
                    _prune_by_magnitude_(value, self.params.prune_ratio)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """After a restart the base weight holds the folded cycles: a saved run keeps it whole
        (adding W - W0 back onto W0 would not give the same bits)."""
        if not self.replaced:
            return {}
        state = {f"base.{name}": self.original._parameters[name].detach() for name in self.replaced}
        return state | {"restarts": torch.tensor([self.restarts, self.last_restart or 0])}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {name: p for name, p in self.original._parameters.items() if p is not None}
        for key, tensor in state.items():  # a saved run is untrusted: only this patch's own state fits
            name = key.removeprefix("base.")
            shape = (2,) if key == "restarts" else tuple(own[name].shape) if key.startswith("base.") and name in own else None
            if shape is None or tuple(tensor.shape) != shape:
                raise ManifestError(f"the run's saved state '{key}' {tuple(tensor.shape)} does not fit this ReLoRA patch")
        with torch.no_grad():
            for key, tensor in state.items():
                if not key.startswith("base."):
                    continue
                name = key.removeprefix("base.")
                current = self.original._parameters[name]
                self.replaced[name] = current
                folded = nn.Parameter(tensor.to(current.dtype).to(current.device).clone(),
                                      requires_grad=current.requires_grad)
                folded._surgeon_merged = True  # type: ignore[attr-defined]
                self.original._parameters[name] = folded
        if "restarts" in state:
            self.restarts, last = (int(v) for v in state["restarts"])
            self.last_restart = last or None

    def merge(self) -> None:
        """Fold the current B A on top of the restarted weight; W0 stays the one revert restores."""
        if self.merged_into is not None:
            return
        kept = dict(self.replaced)
        super().merge()
        self.replaced.update(kept)


@register
class ReLora(Method):
    verb = "inject"
    name = "relora"
    refuses_stack = {"quantize": "a restart merges B A into the base weight, which a quantized base would have "
                                 "to requantize at every restart (use LoRA on the quantized base instead)"}
    Params = ReLoraParams
    kinds = frozenset({"linear", "conv1d"})
    takes_slices = True
    stacks_on = frozenset()  # not quantize: every restart would have to requantize the base
    mergeable = True
    summary = "LoRA merged into the base and restarted every k steps: high-rank updates (Lialin et al. 2023)"

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        return super().check(target, params) or Lora.check(target, params)

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        return Lora.added_shapes(target, params)

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, ReLoraParams)
        parent, attr, original = locate(model, target.path)
        init = ctx.init and compute_dtype_device(original)[1].type != "meta"
        wrapper = LoraLinear(original, target, params, init, ctx.generator)
        patch = ReLoraPatch(parent, attr, original, wrapper, params, target.path)
        if patch.bias_name:
            original.bias.requires_grad_(True)
        return patch


def jagged_cosine_multiplier(step: int, *, total_steps: int, restart_every: int, warmup: int,
                             min_lr_ratio: float, first_warmup: int) -> float:
    """The learning-rate multiplier for the optimizer step after `step` steps (LambdaLR's index):
    a linear warm-up over `first_warmup` steps, then a cosine from 1 to `min_lr_ratio` over the
    rest of `total_steps`; after each restart (step a multiple of `restart_every`) the rate
    climbs again from 0 to where the cosine is at the end of the `warmup` steps (ReLoRA's code)."""
    if step < first_warmup:
        return step / first_warmup
    in_cycle = step % restart_every
    if step >= restart_every and in_cycle < warmup:
        return in_cycle / warmup * _cosine(step - in_cycle + warmup, total_steps, first_warmup, min_lr_ratio)
    return _cosine(step, total_steps, first_warmup, min_lr_ratio)


def _cosine(step: int, total_steps: int, first_warmup: int, min_lr_ratio: float) -> float:
    progress = min(1.0, (step - first_warmup) / max(1, total_steps - first_warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def jagged_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, restart_every: int,
                           warmup: int, min_lr_ratio: float = 0.1, first_warmup: int | None = None,
                           last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """ReLoRA's jagged cosine schedule; call `scheduler.step()` after each optimizer step.
    `first_warmup` (default: `warmup`) is the warm-up at the very start."""
    first = warmup if first_warmup is None else first_warmup
    problems = [text for bad, text in (
        (total_steps < 1, f"total_steps={total_steps} must be at least 1"),
        (restart_every < 1, f"restart_every={restart_every} must be at least 1"),
        (warmup < 0 or first < 0, "warm-ups cannot be negative"),
        (warmup >= restart_every, f"warmup={warmup} must be shorter than restart_every={restart_every}"),
        (not 0.0 <= min_lr_ratio <= 1.0, f"min_lr_ratio={min_lr_ratio} must be in [0, 1]"),
    ) if bad]
    if problems:
        raise SurgeonError("jagged cosine schedule: " + "; ".join(problems))
    multiplier = partial(jagged_cosine_multiplier, total_steps=total_steps, restart_every=restart_every,
                         warmup=warmup, min_lr_ratio=min_lr_ratio, first_warmup=first)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier, last_epoch=last_epoch)


def schedule_for(job: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The jagged schedule that a job's ReLoRA statements ask for (restart_every, warmup, min_lr_ratio)."""
    found = {(p["restart_every"], ReLoraParams(**p).rewarmup, p["min_lr_ratio"])
             for p in (r.params for r in job.plan.rewrites if (r.verb, r.method) == ("inject", "relora"))}
    if len(found) != 1:
        raise SurgeonError("schedule_for needs a job with ReLoRA statements that agree on restart_every, "
                           f"warmup and min_lr_ratio (found {sorted(found) or 'none'})")
    restart_every, warmup, min_lr_ratio = found.pop()
    return jagged_cosine_schedule(optimizer, total_steps, restart_every, warmup, min_lr_ratio)
