"""A KV cache layer that keeps the first `sinks` keys and the last `window - 1` (`attend window`:
no sinks; `attend sinks`: StreamingLLM's start and recent tokens), so generation runs in memory that
stays flat however long it goes (transformers removed `SinkCache` in v5: PR #41107).

Keys stay as the model rotated them, at their absolute positions. The layer tells the attention
seam where the keys it returns sit (an attribute on the attention module, read once by the next
call), so masks and per-pair positions index the kept keys, not slots. `get_seq_length` counts
every token seen, so position ids stay absolute; `get_mask_sizes` reports the keys returned.

`bound_cache` turns the plain `DynamicLayer`s of a cache handed to the model into bounded ones
(carrying what they hold), for every layer at once: the model builds one mask from layer 0's
sizes, so a cache is bounded only when every attention layer asks for the same bounds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from surgeon.methods.attention._seam import KEY_POSITIONS_ATTR


class BoundedLayer(DynamicLayer):
    is_sliding = False

    def __init__(self, sinks: int, window: int, attention: nn.Module) -> None:
        super().__init__()
        self.sinks, self.window, self.attention = sinks, window, attention
        self.seen = 0
        self.positions = torch.zeros(0, dtype=torch.long)

    @classmethod
    def holding(cls, layer: DynamicLayer, sinks: int, window: int, attention: nn.Module) -> BoundedLayer:
        bounded = cls(sinks, window, attention)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            bounded.lazy_initialization(layer.keys, layer.values)
            bounded.keys, bounded.values = layer.keys, layer.values
            bounded.seen = layer.keys.shape[-2]
            bounded.positions = torch.arange(bounded.seen, device=layer.keys.device)
        return bounded

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        device = key_states.device
        positions = torch.cat([self.positions.to(device),
                               torch.arange(self.seen, self.seen + key_states.shape[-2], device=device)])
        keys, values = torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        # the next query sees the sinks and keys after seen - window: the dropped ones are one run
        sinks = min(self.sinks, positions.numel())
        start = max(sinks, positions.numel() - (self.window - 1))
        if start == sinks:  # nothing to drop
            self.keys, self.values, self.positions = keys, values, positions
        elif sinks == 0:  # views: no copy
            self.keys, self.values, self.positions = keys[..., start:, :], values[..., start:, :], positions[start:]
        else:
            self.keys = torch.cat([keys[..., :sinks, :], keys[..., start:, :]], dim=-2)
            self.values = torch.cat([values[..., :sinks, :], values[..., start:, :]], dim=-2)
            self.positions = torch.cat([positions[:sinks], positions[start:]])
        self.attention.__dict__[KEY_POSITIONS_ATTR] = positions
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.keys.shape[-2] if self.is_initialized and self.keys is not None else 0
        return stored + query_length, 0

    def get_max_length(self) -> int:
        return self.sinks + self.window

    def reset(self) -> None:
        super().reset()
        self.seen, self.positions = 0, torch.zeros(0, dtype=torch.long)

    def crop(self, tokens_to_remove: int) -> None:
        if self.seen != self.positions.numel():
            raise RuntimeError("a bounded KV cache that has dropped keys cannot be cropped")
        super().crop(tokens_to_remove)
        self.seen = self.keys.shape[-2]
        self.positions = self.positions[:self.seen]


def bound_cache(cache: Any, bounds: dict[int, tuple[int, int, nn.Module]]) -> None:
    """Make the layers of `cache` (layer index -> (sinks, window, attention module)) bounded."""
    if not isinstance(cache, Cache) or not hasattr(cache, "layers"):
        return
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(cache.layers) <= max(bounds):
            cache.layers.append(cache.layer_class_to_replicate())
    for index, (sinks, window, attention) in bounds.items():
        if index >= len(cache.layers):
            return
        layer = cache.layers[index]
        # a model's own sliding layer (Mistral's sliding_window) too, while it holds every key it saw
        whole = type(layer) is DynamicLayer or (type(layer) is DynamicSlidingWindowLayer
                                                 and layer.cumulative_length == layer.get_mask_sizes(0)[0])
        if whole:
            cache.layers[index] = BoundedLayer.holding(layer, sinks, window, attention)
