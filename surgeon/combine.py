"""Weighted combinations of named LoRA adapters into a new one, as PEFT's `add_weighted_adapter`
computes them (peft 0.21, `tuners/lora/model.py` and `utils/merge_utils.py`), module by module:

- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: A and B are combined apart, each
  adapter's A weighted by sign(w s) sqrt(|w s|) and its B by sqrt(|w s|) (s = its alpha/r), so
  B' A' approximates sum w s B A; the adapters must share one rank, which the new one keeps.
- `cat`: A' stacks w s A, B' stacks B: B' A' = sum w s B A exactly, at the sum of the ranks.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the deltas w s B A are
  combined (summed, or TIES / DARE / magnitude-pruned), and the top `svd_rank` singular directions
  kept (default: the largest rank), optionally clamped at the `svd_clamp` quantile.

TIES keeps the `density` share of largest entries of each tensor, elects a sign per entry (by the
total, or by the count of signs: `majority_sign_method`) and averages the agreeing entries. DARE
keeps each entry with probability `density` and divides by it; its draws come from `generator`
(None: torch's global RNG) in PEFT's order (modules in model order; per module A then B, adapter
by adapter), so one stream of draws gives PEFT's masks. (PEFT draws from the global RNG after
initialising the new adapter, which takes draws of its own; the tests hand both one generator.)
The new adapter's scale is 1 (alpha = r), as PEFT sets it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from surgeon.errors import SurgeonError

Combination = Literal["svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                      "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"]
COMBINATIONS: tuple[str, ...] = Combination.__args__  # type: ignore[attr-defined]
_NEED_DENSITY = {"ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                 "magnitude_prune", "magnitude_prune_svd"}


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's LoRA on one module: B A scaled by `scale` (A is r x d_in, B d_out x r)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class Settings:
    combination: str
    density: float | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None


def check_settings(settings: Settings, ranks: list[int]) -> int:
    """The rank of the combined adapter, or a SurgeonError saying what does not apply."""
    if settings.combination not in COMBINATIONS:
        raise SurgeonError(f"unknown combination '{settings.combination}': one of {', '.join(COMBINATIONS)}")
    if settings.combination in _NEED_DENSITY and (settings.density is None or not 0 <= settings.density <= 1):
        raise SurgeonError(f"combination '{settings.combination}' needs density=... between 0 and 1 "
                           "(the share of each tensor's entries kept)")
    if settings.majority_sign_method not in ("total", "frequency"):
        raise SurgeonError(f"majority_sign_method is 'total' or 'frequency', not {settings.majority_sign_method!r}")
    kind = settings.combination
    if kind == "cat":
        return sum(ranks)
    if kind.endswith("svd"):
        return settings.svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise SurgeonError(f"combination '{kind}' combines A and B apart, so the adapters need one rank; theirs are "
                           f"{ranks}: use 'cat' (exact, at the sum of the ranks) or 'svd'")
    return ranks[0]


def effective(combination: str, adapters: int) -> str:
    """The combination PEFT applies: one adapter can only be scaled (`linear`), whatever was asked."""
    return "linear" if adapters == 1 and combination in COMBINATIONS else combination


def combine_module(factors: list[tuple[LoraFactors, float]], rank: int, settings: Settings,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of the combined adapter on one module, from the (factors, weight) of the adapters
    that sit there, at `rank` rows of A' (cat leaves the rows of absent adapters zero). The
    settings' combination is the `effective` one."""
    kind = settings.combination
    dtype = factors[0][0].a.dtype
    if kind == "cat":
        a = torch.cat([f.a * w * f.scale for f, w in factors], dim=0)
        b = torch.cat([f.b for f, _ in factors], dim=1)
        pad = rank - a.shape[0]
        return (torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1))
    if kind.endswith("svd"):
        deltas = [(f.b @ f.a) * f.scale for f, _ in factors]
        delta = _merge(kind.removesuffix("_svd") if kind != "svd" else "linear", deltas,
                       torch.tensor([w for _, w in factors]), settings, generator)
        return _svd(delta, rank, settings.svd_clamp)
    signed = [math.copysign(math.sqrt(abs(w * f.scale)), w * f.scale) for f, w in factors]
    plain = [math.sqrt(abs(w * f.scale)) for f, w in factors]
    a = _merge(kind, [f.a for f, _ in factors], torch.tensor(signed), settings, generator)
    b = _merge(kind, [f.b for f, _ in factors], torch.tensor(plain), settings, generator)
    return a.to(dtype), b.to(dtype)


def _svd(delta: torch.Tensor, rank: int, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


def _merge(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, settings: Settings,
           generator: torch.Generator | None) -> torch.Tensor:
    """sum of w_i t_i after the kind's pruning (and TIES' sign election)."""
    density = settings.density if settings.density is not None else 1.0
    if kind in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_keep_at_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.to(stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    votes = stacked.sum(dim=0) if settings.majority_sign_method == "total" else stacked.sign().sum(dim=0)
    agree = stacked.sign() == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _keep_at_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator) / density
