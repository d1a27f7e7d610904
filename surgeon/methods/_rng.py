"""Where methods draw their initial weights: `ApplyContext.generator` when the apply is seeded,
torch's global RNG otherwise (as torch's own initialisers do).

A seeded apply draws only from its own generator, so a seed gives the same weights in any thread
and leaves the caller's global RNG alone. A generator belongs to one device: a tensor elsewhere
(CUDA) is drawn on the generator's device in its own dtype and copied over, so a seed also gives
the same weights on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def draw(tensor: torch.Tensor, init: Callable[..., Any], generator: torch.Generator | None,
         *args: Any, **kwargs: Any) -> torch.Tensor:
    """`init(tensor, *args, **kwargs)` (an `nn.init` function) drawing from `generator`; with
    None, exactly `init(tensor, *args, **kwargs)` on the global RNG."""
    if generator is None:
        return init(tensor, *args, **kwargs)
    if tensor.device.type == "meta":
        return tensor  # nothing to draw: no values
    if tensor.device == generator.device:
        return init(tensor, *args, generator=generator, **kwargs)
    scratch = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
    init(scratch, *args, generator=generator, **kwargs)
    with torch.no_grad():
        return tensor.copy_(scratch)


def randn(*shape: int, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, 1) on the generator's device (the CPU for torch's global RNG)."""
    device = generator.device if generator is not None else None
    return torch.randn(*shape, generator=generator, device=device)


def randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else None
    return torch.randint(0, high, shape, dtype=torch.long, generator=generator, device=device)


def reset_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Draw every parameter of `module`'s nn.Linear, nn.Embedding and nn.LSTM/GRU/RNN submodules
    again from `generator`, with the laws of torch's own `reset_parameters` and in its order
    (Linear: weight Kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in)); Embedding: N(0, 1), the
    padding row zero; RNNs: every tensor U(+-1/sqrt(hidden_size))), modules in registration order.
    A module with parameters of another kind is a programming error."""
    with torch.no_grad():
        for sub in module.modules():
            if not any(True for _ in sub.parameters(recurse=False)):
                continue
            if isinstance(sub, nn.Linear):
                draw(sub.weight, nn.init.kaiming_uniform_, generator, a=math.sqrt(5))
                if sub.bias is not None:
                    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(sub.weight)
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    draw(sub.bias, nn.init.uniform_, generator, -bound, bound)
            elif isinstance(sub, nn.Embedding):
                draw(sub.weight, nn.init.normal_, generator)
                if sub.padding_idx is not None:
                    sub.weight[sub.padding_idx].fill_(0)
            elif isinstance(sub, nn.RNNBase):
                stdv = 1.0 / math.sqrt(sub.hidden_size) if sub.hidden_size > 0 else 0
                for weight in sub.parameters():
                    draw(weight, nn.init.uniform_, generator, -stdv, stdv)
            else:
                raise TypeError(f"cannot draw the parameters of a {type(sub).__name__} from a generator")
