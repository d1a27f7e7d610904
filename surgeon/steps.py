"""Per-step methods in any training loop, without extra calls (AdaLoRA's rank budget and
orthogonality term, ReLoRA's restarts).

Every stack people train with ends a step in `step()` of a torch optimizer: a plain loop,
Trainer and TRL (through accelerate, whose optimizer wrapper skips the inner step on gradient
accumulation micro-steps, so steps are counted as Trainer counts them), accelerate itself and
Lightning. So a job with such methods hooks every optimizer step (torch's global optimizer
hooks) and acts only for optimizers that hold its parameters:

- before the step, the methods' loss terms are differentiated into the gradients (the same
  gradient as adding the term to the loss of every micro-batch of the step), unless the user
  asked for `job.regularization()` and adds it to the loss themselves;
- after the step, `patch.step(n, optimizer)` runs with n the number of steps taken before it
  (0 for the first step, as `for n in range(steps)` counts; read from the optimizer's own step
  count where it keeps one, so a resumed run counts on), unless the user calls `job.step()`
  themselves (then surgeon leaves the stepping to them).

Training forwards with no optimizer step that surgeon can see (a custom optimizer that is no
torch optimizer, one that does not hold the job's parameters) end in a warning, never silence.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from surgeon.methods.base import Patch

if TYPE_CHECKING:
    from surgeon.job import Job

UNSEEN_FORWARDS_LIMIT = 512  # training forwards with no optimizer step seen before the warning


def has_per_step_methods(patches: list[Patch]) -> bool:
    return any(type(p).step is not Patch.step or type(p).regularization is not Patch.regularization
               for p in patches)


class StepDriver:
    """Drives one job's per-step methods from the optimizer steps that train it."""

    def __init__(self, job: Job) -> None:
        self.job = weakref.ref(job)
        self.steps_taken = 0
        self.last_automatic: int | None = None
        self.manual_steps = False
        self.manual_regularization = False
        self.unseen_forwards = 0
        self.warned = False
        self.handles = [register_optimizer_step_pre_hook(self._before_step),
                        register_optimizer_step_post_hook(self._after_step),
                        job.model.register_forward_pre_hook(self._count_forward)]
        weakref.finalize(job, _remove, list(self.handles))

    def remove(self) -> None:
        _remove(self.handles)

    def _trains_job(self, optimizer: torch.optim.Optimizer) -> Job | None:
        job = self.job()
        if job is None or job._reverted:
            return None
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return job if any(id(p) in held for p in job.trainable_parameters().values()) else None

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        job = None if self.manual_regularization else self._trains_job(optimizer)
        if job is None:
            return
        with torch.enable_grad():
            term = job._regularization_term()
        if term is not None and term.requires_grad:
            term.backward()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        job = self._trains_job(optimizer)
        if job is None:
            return
        self.unseen_forwards = 0
        taken = _steps_in_state(optimizer, job)
        self.steps_taken = taken - 1 if taken is not None else self.steps_taken
        if not self.manual_steps:
            job._step_patches(self.steps_taken, optimizer)
            self.last_automatic = self.steps_taken
        self.steps_taken += 1

    def _count_forward(self, module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or self.manual_steps or self.warned:
            return
        self.unseen_forwards += 1
        if self.unseen_forwards > UNSEEN_FORWARDS_LIMIT:
            self.warned = True
            job = self.job()
            names = sorted({r.method for r, p in job._surgery.patches if type(p).step is not Patch.step}) if job else []
            warnings.warn(f"{UNSEEN_FORWARDS_LIMIT} training forwards ran without an optimizer step that holds this "
                          f"job's parameters, so {', '.join(names) or 'its per-step methods'} did not act. Build the "
                          "optimizer from job.trainable_parameters() (a torch.optim optimizer), or call "
                          "job.step(global_step, optimizer) after each optimizer step", stacklevel=2)


def _steps_in_state(optimizer: torch.optim.Optimizer, job: Job) -> int | None:
    """The optimizer's own step count (Adam's `state[p]["step"]`), which a resumed run restores
    with the optimizer: so a job applied afresh before `resume_from_checkpoint` counts on from
    where the checkpoint was, not from 0. None for optimizers that keep no count."""
    for param in job.trainable_parameters().values():
        step = optimizer.state.get(param, {}).get("step")
        if step is not None:
            return int(step.item() if torch.is_tensor(step) else step)
    return None


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
