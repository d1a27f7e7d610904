"""Surgery as a transaction: apply, merge, fold and revert either finish or leave everything as it was.

A `Snapshot` records, before a step that mutates a live model, the state of every object the step
can touch: each module's `__dict__` and the dicts inside it (parameters, buffers, submodules,
hooks), configs, the patches and the plain objects they hold (rank allocators, prefix state), and
each tensor's storage and `requires_grad`. `restore()` puts all of it back in place, so the very
same objects hold the very same data again. It is taken for any BaseException, KeyboardInterrupt
included: an interrupt at any point of a step is as if the step never ran.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Objects that carry no state a surgery changes (and may be shared process-wide): never walked.
_LEAVES = (str, bytes, int, float, complex, bool, type(None), type, types.FunctionType, types.BuiltinFunctionType,
           types.MethodType, types.ModuleType, torch.dtype, torch.device, torch.Size)


class _TensorState:
    __slots__ = ("tensor", "data", "requires_grad")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.data = tensor.data  # an alias of the storage: no copy
        self.requires_grad = tensor.requires_grad

    def restore(self) -> None:
        current = self.tensor.data
        same = (current.dtype, current.shape, current.device) == (self.data.dtype, self.data.shape, self.data.device)
        if not same or (current.device.type != "meta" and current.data_ptr() != self.data.data_ptr()):
            self.tensor.data = self.data  # a swap_tensors or .data assignment happened
        if self.tensor.is_leaf:
            self.tensor.requires_grad_(self.requires_grad)


class Snapshot:
    """The restorable state of everything reachable from `roots` (a model, its patches)."""

    def __init__(self, *roots: object, values: tuple[torch.Tensor, ...] = ()) -> None:
        self._objects: list[tuple[Any, dict[str, Any]]] = []
        self._dicts: list[tuple[dict, dict]] = []
        self._lists: list[tuple[list, list]] = []
        self._sets: list[tuple[set, set]] = []
        self._tensors: list[_TensorState] = []
        # tensors whose values a step overwrites in place (trained base parameters on revert)
        self._values = [(t, t.detach().clone()) for t in values]
        self._seen: set[int] = set()
        pending: list[object] = list(roots)
        while pending:
            pending.extend(self._record(pending.pop()))

    def _record(self, obj: object) -> Iterator[object]:
        if isinstance(obj, _LEAVES) or id(obj) in self._seen:
            return
        self._seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self._tensors.append(_TensorState(obj))
            return
        if isinstance(obj, dict):
            self._dicts.append((obj, dict(obj)))
            yield from obj.keys()
            yield from obj.values()
        elif isinstance(obj, list):
            self._lists.append((obj, list(obj)))
            yield from obj
        elif isinstance(obj, set):
            self._sets.append((obj, set(obj)))
            yield from obj
        elif isinstance(obj, tuple | frozenset):
            yield from obj
        elif isinstance(getattr(obj, "__dict__", None), dict):
            self._objects.append((obj, dict(obj.__dict__)))
            yield from obj.__dict__.values()

    def restore(self) -> None:
        for obj, saved in self._objects:
            obj.__dict__.clear()
            obj.__dict__.update(saved)
        for found, saved in self._dicts:
            found.clear()
            found.update(saved)
        for found_list, saved_list in self._lists:
            found_list[:] = saved_list
        for found_set, saved_set in self._sets:
            found_set.clear()
            found_set.update(saved_set)
        for state in self._tensors:
            state.restore()
        with torch.no_grad():
            for tensor, value in self._values:
                tensor.copy_(value)


@contextmanager
def transaction(*roots: object, values: tuple[torch.Tensor, ...] = ()) -> Iterator[None]:
    """Run the block; on any BaseException put every object reachable from `roots` back as it was."""
    snapshot = Snapshot(*roots, values=values)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
