"""The input-side seam shared by prompt tuning, P-tuning and multitask prompt tuning.

The user's model stays an instance of its own class: a forward pre-hook (`with_kwargs=True`) on
the top-level model embeds the ids, puts the virtual tokens in, grows the 2-D attention mask (ones
for the virtual tokens, whatever the padding side), pads `labels` with -100 and `token_type_ids`
with 0, and shifts `position_ids` (virtual tokens take positions 0..a-1, real tokens keep theirs
plus the number of inserted tokens). It injects only while the KV cache is empty, so `generate`
with the cache works: the prompt sits in the cache and later steps only get their mask and
positions shifted. As PEFT does, the model's output holds the virtual positions too (the real
tokens' outputs are the last n for the prefix form).

Encoder-decoder models (T5): the prompt goes in front of the encoder input, as PEFT does for
seq2seq: a pre-hook on the encoder stack injects it (generate calls the encoder directly), and the
top-level hook grows the encoder attention mask that cross-attention sees; decoder labels are
untouched.

Absolute-position models (BERT, GPT-2): the virtual tokens use position slots, so an input that
no longer fits gets a SurgeonError naming the numbers instead of an index error.

A layout says where the virtual tokens go (`parse_template`, P-tuning's `template=`): the prefix
form is `[P:n] [INPUT]`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from surgeon.errors import SurgeonError
from surgeon.patterns import compile_pattern
from surgeon.methods.base import Method, MethodParams, Patch, Target, WordArgs
from surgeon.spec import Word

Source = Callable[[int, "torch.Tensor | None"], torch.Tensor]  # (batch size, task ids) -> (B, P, d)


class InputPromptMethod(Method):
    """What the three input-side prompt methods share: they target the word embedding, take over
    the model's inputs (two of them cannot compose), and take no bare words."""

    kinds = frozenset({"embedding"})
    claims = frozenset({"inputs"})
    unmergeable_because = "virtual tokens are inputs the model reads, not a change of any weight"
    peft_scope = "model"  # PEFT's prompt learning: top-level `prompt_embeddings`, not per module

    @classmethod
    def read_words(cls, words: tuple[Word, ...]) -> WordArgs:
        args = super().read_words(words)
        # an encoder-decoder's stacks hold the very embedding the model holds at the top (T5's
        # `shared`), so `into embed` matches it three times: keep the top-level one (effective once
        # the planner applies a method's own exclusions after the statement's clauses)
        args.excepts.append(_STACK_EMBEDDINGS)
        return args

    @classmethod
    def check(cls, target: Target, params: MethodParams) -> str | None:
        reason = super().check(target, params)
        if reason is None and _STACK_PATTERN.matches(target.path):
            stack = target.path.rsplit(".", 2)[-2]
            return (f"{target.path} is the {stack}'s view of the model's input embedding; a prompt goes in front "
                    "of the model's input: target the top-level embedding (T5: 'into shared')")
        return reason


def local_names(target: Target, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The statement's tensors ("module.path.local", as the PEFT exporter hands them) by local name."""
    prefix = target.path + "."
    return {name.removeprefix(prefix): tensor for name, tensor in tensors.items() if name.startswith(prefix)}


def scoped_names(target: Target, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `local_names`, for what `from_peft_tensors` returns."""
    return {f"{target.path}.{name}": tensor for name, tensor in tensors.items()}


_STACK_EMBEDDINGS = "<encoder,decoder>.embed_tokens"
_STACK_PATTERN = compile_pattern(_STACK_EMBEDDINGS)


class PromptParams(MethodParams):
    """What every input-side prompt method takes."""

    tokens: int = Field(20, ge=1, le=4096, description="number of virtual tokens P")
    # the embedding is only read, never written, so sharing it with a tied head is harmless
    tied: bool = Field(True, description="accept an embedding tied to the output head (it is only read)")


@dataclass(frozen=True)
class Segment:
    """One piece of the sequence the model sees: `count` virtual tokens from prompt row `start`,
    the input, or one fixed vocabulary token (an anchor)."""

    kind: str  # "virtual" | "input" | "token"
    start: int = 0
    count: int = 0
    token: int = 0

    @property
    def width(self) -> int:
        return {"virtual": self.count, "input": 0, "token": 1}[self.kind]


Layout = tuple[Segment, ...]
_ITEM = re.compile(r"\[(P)(?::(\d+))?\]|\[(INPUT)\]|\[(\d+)\]")


def prefix_layout(tokens: int) -> Layout:
    return (Segment("virtual", 0, tokens), Segment("input"))


def parse_template(text: str) -> Layout:
    """`[P]` one virtual token, `[P:k]` k of them, `[INPUT]` the input (exactly once), `[123]` the
    fixed vocabulary token 123 (an anchor, embedded by the model's own frozen embedding). Items are
    separated by spaces; virtual tokens are numbered left to right."""
    segments: list[Segment] = []
    start = 0
    for item in text.split():
        found = _ITEM.fullmatch(item)
        if found is None:
            raise ValueError(f"template item {item!r} is not [P], [P:k], [INPUT] or [token id]")
        if found.group(1):
            count = int(found.group(2) or 1)
            if count < 1:
                raise ValueError(f"template item {item!r} asks for no virtual token")
            segments.append(Segment("virtual", start, count))
            start += count
        elif found.group(3):
            segments.append(Segment("input"))
        else:
            segments.append(Segment("token", token=int(found.group(4))))
    if sum(s.kind == "input" for s in segments) != 1:
        raise ValueError("a template holds [INPUT] exactly once")
    if start == 0:
        raise ValueError("a template holds at least one virtual token [P]")
    return tuple(segments)


def layout_tokens(layout: Layout) -> int:
    return sum(s.count for s in layout if s.kind == "virtual")


def _split(layout: Layout) -> tuple[int, int]:
    """Positions inserted before and after the input."""
    at = next(i for i, s in enumerate(layout) if s.kind == "input")
    return sum(s.width for s in layout[:at]), sum(s.width for s in layout[at + 1:])


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # a legacy tuple cache


def _position_limit(model: nn.Module) -> int | None:
    """The number of learned absolute positions (BERT, GPT-2), None for relative/rotary models."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and (leaf == "wpe" or leaf == "position_embeddings"):
            return module.num_embeddings
    return None


def _named(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments by their parameter names, so one dict holds every input."""
    if not args:
        return dict(kwargs)
    names = list(inspect.signature(module.forward).parameters)
    return {**dict(zip(names, args)), **kwargs}


class PromptInputs:
    """The installed hooks of one prompt statement; `remove()` takes them all out."""

    def __init__(self, model: nn.Module, embedding: nn.Module, source: Source, layout: Layout) -> None:
        self.model, self.embedding, self.source, self.layout = model, embedding, source, layout
        self.before, self.after = _split(layout)
        self.width = self.before + self.after
        self.limit = _position_limit(model)
        self.default_task_ids: torch.Tensor | None = None  # MPT: used when a call passes none
        self._pending_task: torch.Tensor | None = None  # seq2seq: from the top-level call to the encoder
        self._input_length = 0  # n of the last injection: later masks get the suffix put back after it
        self.active = True  # job.activate: an inactive prompt's hooks change nothing
        self.handles: list[RemovableHandle] = []
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            self.handles.append(model.register_forward_pre_hook(self._seq2seq_hook, with_kwargs=True))
            encoder = model.get_encoder()
            self.handles.append(encoder.register_forward_pre_hook(self._encoder_hook, with_kwargs=True))
        else:
            self.handles.append(model.register_forward_pre_hook(self._decoder_hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # the hooks

    def _decoder_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if not self.active:
            return None
        kwargs = _named(module, args, kwargs)
        task_ids = kwargs.pop("task_ids", None)
        past = _cache_length(kwargs.get("cache", kwargs.get("past_key_values")))
        if past == 0:
            self._inject(kwargs, task_ids, pad_labels=True)
        else:
            self._continue(kwargs, past)
        self._check_positions(kwargs, past)
        return (), kwargs

    def _seq2seq_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if not self.active:
            return None
        kwargs = _named(module, args, kwargs)
        self._pending_task = kwargs.pop("task_ids", None)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            encoded = kwargs.get("encoder_outputs")
            if encoded is None or mask.shape[1] + self.width == _first(encoded).shape[1]:
                kwargs["attention_mask"] = self._around(mask, mask.shape[1], 1, 1)  # cross-attention sees the prompt
        return (), kwargs

    def _encoder_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if not self.active:
            return None
        kwargs = _named(module, args, kwargs)
        task_ids = kwargs.pop("task_ids", None)
        task_ids = task_ids if task_ids is not None else self._pending_task
        self._pending_task = None
        self._inject(kwargs, task_ids, pad_labels=False)
        return (), kwargs

    # what the hooks do

    def _inject(self, kwargs: dict[str, Any], task_ids: torch.Tensor | None, pad_labels: bool) -> None:
        ids, embeds = kwargs.pop("input_ids", None), kwargs.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise SurgeonError("the prompt needs input_ids or inputs_embeds")
            embeds = self.embedding(ids)
        batch, n = embeds.shape[:2]
        self._input_length = n
        prompts = self.source(batch, self._task_ids(task_ids, batch, embeds.device)).to(embeds.dtype)
        parts = []
        for segment in self.layout:
            if segment.kind == "virtual":
                parts.append(prompts[:, segment.start:segment.start + segment.count])
            elif segment.kind == "input":
                parts.append(embeds)
            else:
                token = torch.full((batch, 1), segment.token, dtype=torch.long, device=embeds.device)
                parts.append(self.embedding(token).to(embeds.dtype))
        kwargs["inputs_embeds"] = torch.cat(parts, dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] == n:  # a seq2seq mask may be grown already
            kwargs["attention_mask"] = self._around(mask, n, 1, 1)
        if pad_labels and kwargs.get("labels") is not None:
            kwargs["labels"] = self._around(kwargs["labels"], n, -100, -100)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = self._around(kwargs["token_type_ids"], n, 0, 0)
        positions = kwargs.get("position_ids")
        if positions is not None and positions.dim() == 2:
            kwargs["position_ids"] = self._inject_positions(positions)
        if kwargs.get("cache_position") is not None:  # older transformers: count the virtual tokens
            kwargs["cache_position"] = torch.arange(n + self.width, device=embeds.device)

    def _continue(self, kwargs: dict[str, Any], past: int) -> None:
        """A step with the prompt already in the cache: the mask and positions the caller tracks
        for its own tokens get the inserted ones added."""
        current = _length(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] + self.width == past + current:
            n = min(self._input_length, mask.shape[1])  # the suffix goes back after the input, before new tokens
            head = self._around(mask[:, :n], n, 1, 1)
            kwargs["attention_mask"] = torch.cat([head, mask[:, n:]], dim=1) if mask.shape[1] > n else head
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.width
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = kwargs["cache_position"] + self.width

    def _around(self, tensor: torch.Tensor, n: int, before: int | float, after: int | float) -> torch.Tensor:
        """`tensor` (B, n) with the fill values at the inserted positions."""
        batch = tensor.shape[0]
        parts = [torch.full((batch, self.before), before, dtype=tensor.dtype, device=tensor.device), tensor]
        if self.after:
            parts.append(torch.full((batch, self.after), after, dtype=tensor.dtype, device=tensor.device))
        return torch.cat(parts, dim=1)

    def _inject_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Inserted tokens before the input take 0..a-1, the input keeps its positions shifted by a,
        those after it follow its last position."""
        batch, device = positions.shape[0], positions.device
        head = torch.arange(self.before, dtype=positions.dtype, device=device).expand(batch, -1)
        parts = [head, positions + self.before]
        if self.after:
            tail = torch.arange(1, self.after + 1, dtype=positions.dtype, device=device)
            parts.append(positions[:, -1:] + self.before + tail)
        return torch.cat(parts, dim=1)

    def _task_ids(self, task_ids: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        task_ids = task_ids if task_ids is not None else self.default_task_ids
        if task_ids is None:
            return None
        task_ids = torch.as_tensor(task_ids, device=device).long().reshape(-1)
        if task_ids.numel() == 1 and batch > 1:
            task_ids = task_ids.expand(batch)
        if task_ids.numel() != batch:
            raise SurgeonError(f"task_ids holds {task_ids.numel()} ids for a batch of {batch}")
        return task_ids

    def _check_positions(self, kwargs: dict[str, Any], past: int) -> None:
        if self.limit is None:
            return
        total = past + _length(kwargs)
        if total > self.limit:
            raise SurgeonError(
                f"the input needs {total} positions ({self.width} virtual tokens + {total - self.width} of input "
                f"and cache), but the model has {self.limit} absolute positions; shorten the input or use fewer "
                "virtual tokens")


def _first(encoded: Any) -> torch.Tensor:
    return encoded[0] if isinstance(encoded, (tuple, list)) else encoded.last_hidden_state


def _length(kwargs: dict[str, Any]) -> int:
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return int(embeds.shape[1])
    ids = kwargs.get("input_ids")
    return int(ids.shape[1]) if ids is not None else 0


def embedding_size(target: Target) -> tuple[int, int]:
    """(vocabulary size, hidden size d) of the target embedding, from its weight's shape."""
    assert target.weight_shape is not None
    return int(target.weight_shape[0]), int(target.weight_shape[1])


class PromptPatch(Patch):
    """Tensors and modules registered on the target embedding, plus the installed hooks. Revert
    removes the hooks and deletes what was registered, leaving the module as it was."""

    def __init__(self, owner: nn.Module, added: dict[str, nn.Parameter | nn.Module], inputs: PromptInputs) -> None:
        self.owner, self.names, self.inputs = owner, list(added), inputs
        for name, value in added.items():
            if isinstance(value, nn.Parameter):
                owner.register_parameter(name, value)
            else:
                owner.add_module(name, value)

    def added_parameters(self) -> dict[str, nn.Parameter]:
        found: dict[str, nn.Parameter] = {}
        for name in self.names:
            value = getattr(self.owner, name)
            if isinstance(value, nn.Parameter):
                found[name] = value
            else:
                found.update({f"{name}.{n}": p for n, p in value.named_parameters()})
        return found

    def set_active(self, active: bool) -> None:
        self.inputs.active = active

    def revert(self) -> None:
        self.inputs.remove()
        for name in self.names:
            self.owner._parameters.pop(name, None)
            self.owner._modules.pop(name, None)


def new_parameter(shape: tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    """A trainable fp32 tensor (PEFT keeps prompt weights in fp32) on the embedding's device."""
    return nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=like.device))
