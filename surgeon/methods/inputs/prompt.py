"""Prompt tuning (Lester et al. 2021): P trainable virtual-token embeddings in front of the input.

`inject prompt tokens=20 [init=random|vocab|"some text"] [tokenizer=NAME] into embed`

The P x d tensor `prompt_embeddings` is registered on the target embedding; the input-side seam
(surgeon/methods/inputs/_prompt_inputs.py) puts it in front of the embedded ids, grows the attention
mask and labels, and leaves the model's own class and forward alone. Init as PEFT's
`PromptTuningConfig`: `random` N(0, 1) (nn.Embedding's init, off the embedding manifold), `vocab`
rows of randomly sampled vocabulary tokens, or any other string: the embeddings of that text's
tokens (with the tokenizer's special tokens, as PEFT), repeated or truncated to P. The tokenizer is
`tokenizer=` or the model's own `name_or_path`.

Trainable parameters: P*d (PEFT's seq2seq variant also trains P*d decoder-side rows that no
forward uses; surgeon does not: the prompt goes in front of the encoder input only).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import ExportError, SurgeonError
from surgeon.methods.inputs._prompt_inputs import (InputPromptMethod, PromptInputs, PromptParams, PromptPatch,
                                            embedding_size, local_names, new_parameter, prefix_layout, scoped_names)
from surgeon.methods._rng import randint, randn
from surgeon.methods.base import ApplyContext, MethodParams, Patch, Target, locate, register

_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}


class PromptTuningParams(PromptParams):
    init: str = Field("random", min_length=1,
                      description='initial prompt: random (N(0,1)), vocab (sampled tokens\' embeddings) or "some text"')
    tokenizer: str | None = Field(None, description="tokenizer for a text init; default: the model's name_or_path")


def init_ids(init: str, rows: int, vocab: int, model: nn.Module, tokenizer: str | None,
             generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The token ids whose embeddings start the prompt (None: random)."""
    if init == "random":
        return None
    if init == "vocab":
        return randint(vocab, (rows,), generator)
    source = tokenizer or getattr(getattr(model, "config", None), "name_or_path", None)
    if not source:
        raise SurgeonError(f"init={init!r} is a text init, which needs a tokenizer: add tokenizer=NAME_OR_PATH")
    from transformers import AutoTokenizer

    ids = list(AutoTokenizer.from_pretrained(source)(init)["input_ids"])
    if not ids:
        raise SurgeonError(f"init text {init!r} gives no tokens")
    ids = (ids * math.ceil(rows / len(ids)))[:rows]  # repeat or truncate to P, as PEFT
    return torch.tensor(ids, dtype=torch.long)


def initial_prompt(embedding: nn.Module, params: PromptTuningParams, model: nn.Module,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    vocab, d = embedding.weight.shape
    ids = init_ids(params.init, params.tokens, vocab, model, params.tokenizer, generator)
    if ids is None:
        return randn(params.tokens, d, generator=generator)
    with torch.no_grad():
        return embedding(ids.to(embedding.weight.device)).detach().float()


@register
class PromptTuning(InputPromptMethod):
    verb = "inject"
    name = "prompt"
    Params = PromptTuningParams
    summary = "trainable virtual tokens in front of the input (Lester et al. 2021)"
    peft_type = "PROMPT_TUNING"

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, PromptTuningParams)
        return {"prompt_embeddings": (params.tokens, embedding_size(target)[1])}

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, PromptTuningParams)
        _, _, embedding = locate(model, target.path)
        prompt = new_parameter(cls.added_shapes(target, params)["prompt_embeddings"], embedding.weight)
        if ctx.init and prompt.device.type != "meta":
            prompt.data.copy_(initial_prompt(embedding, params, model, ctx.generator))

        def source(batch: int, task_ids: torch.Tensor | None) -> torch.Tensor:
            return prompt.unsqueeze(0).expand(batch, -1, -1)

        inputs = PromptInputs(model, embedding, source, prefix_layout(params.tokens))
        return PromptPatch(embedding, {"prompt_embeddings": prompt}, inputs)

    # PEFT: PromptTuningConfig; its checkpoint holds `prompt_embeddings` (P x d), the same tensor

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, PromptTuningParams)
        init = _PEFT_INIT.get(params.init, "TEXT")
        config: dict[str, Any] = {"num_virtual_tokens": params.tokens, "prompt_tuning_init": init,
                                  "num_transformer_submodules": 1}  # 1 on seq2seq too: the encoder prompt only
        if init == "TEXT":
            config |= {"prompt_tuning_init_text": params.init, "tokenizer_name_or_path": params.tokenizer}
        return config

    @classmethod
    def peft_target_config(cls, params: MethodParams, targets: list[Target]) -> dict[str, Any]:
        return {"token_dim": embedding_size(targets[0])[1]}

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": local_names(target, tensors)["prompt_embeddings"]}

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return scoped_names(target, {"prompt_embeddings": prompt_rows(tensors, params)})

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        return prompt_statement(config)


def prompt_rows(tensors: dict[str, torch.Tensor], params: MethodParams) -> torch.Tensor:
    """PEFT's `prompt_embeddings`; a seq2seq checkpoint's unused decoder half is dropped."""
    if set(tensors) != {"prompt_embeddings"}:
        raise ExportError(f"a PEFT prompt checkpoint holds prompt_embeddings, this one holds {sorted(tensors)}")
    assert isinstance(params, PromptParams)
    rows = tensors["prompt_embeddings"]
    if rows.shape[0] not in (params.tokens, 2 * params.tokens):
        raise ExportError(f"PEFT's prompt_embeddings has {rows.shape[0]} rows for {params.tokens} virtual tokens")
    return rows[:params.tokens]


def prompt_statement(config: dict[str, Any]) -> str:
    """The statement for a PEFT checkpoint that holds the prompt itself (the init no longer
    matters: the weights are loaded)."""
    tokens = config.get("num_virtual_tokens")
    if not isinstance(tokens, int) or tokens < 1:
        raise ExportError(f"num_virtual_tokens={tokens!r} is not a number of virtual tokens")
    return f"inject prompt tokens={tokens} into embed"
