"""The rows of a mixed batch each named adapter computes on (`adapter_names=`, surgeon/mixed_batch.py
sets them for a call; the methods that serve mixed batches read them here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from surgeon.errors import SurgeonError

KEYWORD = "adapter_names"


@dataclass
class RowNames:
    """The adapter each row of the batch goes through (None: no named adapter)."""

    names: tuple[str | None, ...]
    expands: bool = False  # inside `generate`: a forward may hold k rows per name
    _rows: dict[tuple[str, int, torch.device], torch.Tensor | None] = field(default_factory=dict)

    def rows(self, label: str, batch: int, device: torch.device) -> torch.Tensor | None:
        """Indices of the rows `label` computes on, of a batch of `batch` rows; None: all of them."""
        key = (label, batch, device)
        if key not in self._rows:
            count = len(self.names)
            if batch != count and not (self.expands and batch % count == 0):
                raise SurgeonError(f"{KEYWORD} names {count} rows, but a layer sees a batch of {batch}")
            mine = torch.tensor([i for i, name in enumerate(self.names) if name == label], dtype=torch.long)
            if batch != count:
                factor = batch // count
                mine = (mine[:, None] * factor + torch.arange(factor)).flatten()
            self._rows[key] = None if len(mine) == batch else mine.to(device)
        return self._rows[key]


# the current call's rows: a plain module global (not a ContextVar) so torch.compile traces the
# adapters without a graph break; a call sets it and puts back what it found, as a stack would
_current: RowNames | None = None


def routed_rows(label: str | None, x: torch.Tensor) -> torch.Tensor | None:
    """For an adapter named `label` seeing batch `x`: the rows it computes on, or None for every row
    (no mixed batch, or an unnamed statement)."""
    names = _current
    if names is None or label is None:
        return None
    return names.rows(label, x.shape[0], x.device)


def add_on_rows(out: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor, alpha: float = 1.0,
                span: tuple[int, int] | None = None) -> torch.Tensor:
    """out + alpha * delta, where `delta` holds only `rows` of the batch (None: every row); with
    `span`, only on those output columns, in place (a slice of a fused projection)."""
    if span is not None:
        columns = out[..., span[0]:span[1]]
        if rows is None:
            columns.add_(delta, alpha=alpha)
        else:
            columns.index_add_(0, rows, delta, alpha=alpha)
        return out
    if rows is None:
        return torch.add(out, delta, alpha=alpha)
    return out.index_add(0, rows, delta, alpha=alpha)


@contextmanager
def rows_named(names: RowNames) -> Iterator[None]:
    before = swap(names)
    try:
        yield
    finally:
        swap(before)


def swap(names: RowNames | None) -> RowNames | None:
    """Make `names` the current rows; what was current before."""
    global _current
    before, _current = _current, names
    return before


