"""What a live job puts on its model beyond its patches (hooks, a method override): one seam per
model, shared by the model's live jobs, removed with the last of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

if TYPE_CHECKING:
    from surgeon.job import Job


class ModelSeam:
    attr: ClassVar[str]  # the model attribute (in __dict__) that holds the seam

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.live: list[Job] = []  # the model keeps its jobs, as a PeftModel keeps its adapters
        model.__dict__[self.attr] = self

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
