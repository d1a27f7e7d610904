"""Mixed batches: one named adapter per row, as PEFT's `adapter_names=`.

    model(**batch, adapter_names=["sentiment", "nli", None, "nli"])
    model.generate(**batch, adapter_names=["sentiment", None])

Row i goes through the adapter `adapter_names[i]` names and no other named adapter (None: none of
them), as if it ran alone under `job.active(name)`; unnamed statements act on every row. Each
adapter computes only on its own rows (LoRA adds B A x to those rows alone), so the batch costs
one base forward plus each adapter's share of it.

A seam on the model (shared by its live jobs, undone with the last of them) takes the keyword
off the call, checks it against the batch and the jobs' adapters, and holds the rows in a context
global for the call's duration; the adapters read it (`routed_rows`). In `generate` a row may
stand for several (beams, returned sequences), which transformers lays out row after row
(`repeat_interleave`): a forward of k times as many rows gives each name k rows in turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from surgeon.errors import SurgeonError, did_you_mean
from surgeon.methods.rows import KEYWORD, RowNames, rows_named, swap
from surgeon.planner import method_of
from surgeon.seam import ModelSeam

SEAM_ATTR = "_surgeon_mixed_batch_seam"


class MixedBatchSeam(ModelSeam):
    """The hooks that take `adapter_names` off the model's forward and `generate`."""

    attr = SEAM_ATTR

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.calls: list[tuple[RowNames | None] | None] = []  # per call in progress: the rows it replaced
        self.handles = [
            model.register_forward_pre_hook(partial(MixedBatchSeam._enter, self), with_kwargs=True),
            model.register_forward_hook(partial(MixedBatchSeam._leave, self), always_call=True),
        ]
        if callable(getattr(model, "generate", None)):
            model.__dict__["generate"] = self.generate

    def fresh_state(self) -> dict[str, Any]:
        return {"calls": []}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.model.__dict__.pop("generate", None)
        super().remove()

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        self.calls.append(None)  # first: the forward hook runs (and pops) even when this one raises
        if KEYWORD not in kwargs:
            return None
        given = kwargs.pop(KEYWORD)
        if given is not None:
            names = RowNames(self.check(given, batch_size(args, kwargs)))
            self.calls[-1] = (swap(names),)
        return args, kwargs

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        call = self.calls.pop() if self.calls else None
        if call is not None:
            swap(call[0])

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        names = kwargs.pop(KEYWORD, None)
        generate = type(self.model).generate
        if names is None:
            return generate(self.model, *args, **kwargs)
        with rows_named(RowNames(self.check(names, batch_size(args, kwargs)), expands=True)):
            return generate(self.model, *args, **kwargs)

    def check(self, names: Any, batch: int | None) -> tuple[str | None, ...]:
        """`adapter_names` as given, checked: one per row, each an active adapter that can split a
        batch, or None."""
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise SurgeonError(f"{KEYWORD} takes one adapter name (or None) per row of the batch, not {names!r}")
        names = tuple(names)
        if batch is not None and len(names) != batch:
            raise SurgeonError(f"{KEYWORD} names {len(names)} rows, but the batch has {batch}: one name (or None) per row")
        known: dict[str, list[Any]] = {}
        active: set[str] = set()
        for job in self.live:
            active.update(job.active_adapters())
            for rewrite, _ in job._live().patches:
                if rewrite.label:
                    known.setdefault(rewrite.label, []).append(rewrite)
                elif "adapters" in rewrite.params and not method_of(rewrite).routes_rows:  # fuse <a,b>, unnamed
                    raise SurgeonError(f"'{rewrite.verb} {rewrite.method}' over {rewrite.params['adapters']} mixes "
                                       f"named adapters in every row; {KEYWORD} cannot split its batch")
        for name in names:
            if name is not None and not isinstance(name, str):
                raise SurgeonError(f"{KEYWORD} holds {name!r}: each entry is an adapter name or None")
            if name is not None and name not in known:
                raise SurgeonError(f"{KEYWORD} names '{name}', which is no adapter of this model; "
                                   f"{did_you_mean(name, known) or 'its adapters: ' + (', '.join(known) or 'none')}")
        for label, rewrites in known.items():
            refusing = [r for r in rewrites if not method_of(r).routes_rows]
            if refusing and label in active:
                raise SurgeonError(f"adapter '{label}' has '{refusing[0].verb} {refusing[0].method}', which cannot "
                                   f"split a batch by rows; {KEYWORD} serves LoRA, LoHa, LoKr and bottleneck "
                                   f"adapters: switch '{label}' off (job.activate) to mix the others")
        off = sorted({name for name in names if name is not None and name not in active})
        if off:
            raise SurgeonError(f"{KEYWORD} names {off}, switched off: job.activate them first")
        return names


def batch_size(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The batch size of a model call: its input ids or embeddings, else its first tensor argument."""
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return tensors[0].shape[0] if tensors else None
