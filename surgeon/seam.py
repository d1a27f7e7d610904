"""What a live job puts on its model beyond its patches (hooks, a method override): one seam per
model, shared by the model's live jobs, removed with the last of them."""

from __future__ import annotations

import copy as copy_module
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

if TYPE_CHECKING:
    from surgeon.job import Job


class ModelSeam:
    attr: ClassVar[str]  # the model attribute (in __dict__) that holds the seam

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.live: list[Job] = []  # the model keeps its jobs, as a PeftModel keeps its adapters
        model.__dict__[self.attr] = self

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelSeam:
        """A deep copy of a patched model (TRL's reference model) carries no live job: its seam
        holds no job and no hooks of its own, only `fresh_state()`."""
        copy = object.__new__(type(self))
        memo[id(self)] = copy
        copy.__dict__.update(self.fresh_state(), model=copy_module.deepcopy(self.model, memo), live=[], handles=[])
        return copy

    def fresh_state(self) -> dict[str, Any]:
        """The subclass's own attributes as a seam without jobs has them."""
        return {}

    def remove(self) -> None:
        """Take the hooks and overrides off the model."""
        self.model.__dict__.pop(self.attr, None)

    @classmethod
    def enlist(cls, job: Job) -> None:
        """Put the seam on the job's model (unless an earlier live job did) and enlist the job."""
        seam = job.model.__dict__.get(cls.attr)
        if not isinstance(seam, cls) or seam.model is not job.model:
            seam = cls(job.model)
        seam.live.append(job)

    @classmethod
    def leave(cls, job: Job) -> None:
        """The job was reverted: it leaves the seam, and the seam leaves the model with its last job."""
        seam = job.model.__dict__.get(cls.attr)
        if isinstance(seam, cls):
            seam.live[:] = [j for j in seam.live if j is not job]
            if not seam.live:
                seam.remove()
