"""An independent full-sequence reference for attention rewrites: the unpatched model, run with a
test-only attention function that recomputes every pair from the pre-RoPE queries and keys (caught
off the q/k projections), rotated by transformers' own rotary module and `apply_rotary_pos_emb` to
whatever positions the technique says each pair has, with an explicit mask, bias and query scale.
Slow (one row at a time) and written from the papers' definitions, not from surgeon's seam."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface


@dataclass
class Pairs:
    """For a sequence of T tokens: where each query sits (T,), where each key sits as row t sees it
    (T, T), which pairs may attend (T, T), an additive bias (H or 1, T, T) and a query scale (T,)."""

    query_position: torch.Tensor
    key_position: torch.Tensor
    allowed: torch.Tensor
    bias: torch.Tensor | None = None
    query_scale: torch.Tensor | None = None


def absolute(length: int) -> Pairs:
    """Plain causal RoPE: every pair at its true positions."""
    t = torch.arange(length, dtype=torch.float64)
    return Pairs(t, t[None, :].expand(length, -1), torch.ones(length, length, dtype=torch.bool).tril())


def _rotary(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "layer_idx")]


def _capture(module: nn.Module, store: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> list:
    """Hooks that keep the pre-RoPE (B, H, T, D) queries and keys of `module`'s call."""
    head = getattr(module, "head_dim", None) or module.head_size
    if hasattr(module, "query_key_value"):  # GPT-NeoX: fused, per head [q | k | v]
        def fused(_, __, out):
            qkv = out.view(*out.shape[:2], -1, 3 * head).transpose(1, 2)
            q, k, _v = qkv.chunk(3, dim=-1)
            store[id(module)] = (q, k)
        return [module.query_key_value.register_forward_hook(fused)]
    parts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_, __, out):
            parts[name] = out.view(*out.shape[:2], -1, head).transpose(1, 2)
            if len(parts) == 2:
                store[id(module)] = (parts.pop("q"), parts.pop("k"))
        return hook
    return [module.q_proj.register_forward_hook(keep("q")), module.k_proj.register_forward_hook(keep("k"))]


@contextmanager
def oracle(model: nn.Module, pairs_for: Callable[[int], Pairs]) -> Iterator[None]:
    """Within: `model(ids)` (no cache) computes attention as `pairs_for(T)` defines it."""
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [h for m in _attention_modules(model) for h in _capture(m, store)]
    rotary = _rotary(model)
    rotate = sys.modules[type(_attention_modules(model)[0]).__module__].apply_rotary_pos_emb

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q_pre, k_pre = store[id(module)]
        batch, heads, length, dim = query.shape
        pairs = pairs_for(length)
        groups = heads // k_pre.shape[1]
        values = value.repeat_interleave(groups, dim=1)
        rows = []
        for t in range(length):
            cos, sin = rotary(value, pairs.query_position[t].view(1, 1).to(torch.float32))
            q_t, _ = rotate(q_pre[:, :, t:t + 1], q_pre[:, :, t:t + 1], cos, sin)
            if pairs.query_scale is not None:
                q_t = q_t * pairs.query_scale[t].to(q_t.dtype)
            cos, sin = rotary(value, pairs.key_position[t].view(1, -1).to(torch.float32))
            _, k_t = rotate(k_pre, k_pre, cos, sin)
            k_t = k_t.repeat_interleave(groups, dim=1)
            scores = torch.matmul(q_t, k_t.transpose(2, 3)) * scaling
            if pairs.bias is not None:
                scores = scores + pairs.bias[:, t][None, :, None, :].to(scores.dtype)
            scores = scores.masked_fill(~pairs.allowed[t], float("-inf"))
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            rows.append(torch.matmul(weights, values))
        return torch.cat(rows, dim=2).transpose(1, 2).contiguous(), None

    name = "test_pair_oracle"
    AttentionInterface.register(name, attend)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved = [(c, c.__dict__["_attn_implementation_internal"]) for c in configs.values()]
    for config, _ in saved:
        config._attn_implementation = name
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for config, value in saved:
            config.__dict__["_attn_implementation_internal"] = value


def logits_of(model: nn.Module, ids: torch.Tensor, pairs_for: Callable[[int], Pairs]) -> torch.Tensor:
    with oracle(model, pairs_for), torch.no_grad():
        return model(ids, use_cache=False).logits
