"""Multitask prompt tuning (Wang et al. 2023): a shared prompt adapted per task by a low-rank
multiplicative update, prompt_t = P* ⊙ (u_t v_t), u_t: P x r, v_t: r x d.

`inject mpt tokens=20 tasks=T [rank=1] [init=random|vocab|"some text"] [tokenizer=NAME] into embed`

Registered on the target embedding: `prompt_embeddings` (P x d, the shared prompt P*, initialised as
prompt tuning's), `prefix_task_cols` (T x P x r) and `prefix_task_rows` (T x r x d), both N(0, 0.02)
as PEFT's `MultitaskPromptEmbedding`, whose names and layouts these are.

Task ids come at forward time, one per row (or one for the whole batch):
- `model(input_ids, attention_mask, task_ids=torch.tensor([0, 2]))`: the pre-hook takes `task_ids`
  out of the call before the model sees it;
- `use_task(model_or_job, task_ids)` sets the ids used when a call passes none, which is how
  `generate` gets them (transformers' generate refuses arguments its forward does not name):
  `with use_task(model, [0, 2]): model.generate(...)`; `use_task(model, None)` clears them.
With tasks=1 and no ids, task 0 is used; otherwise a call without ids is an error.

Trainable parameters: P*d + T*(P*r + r*d).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from surgeon.errors import ExportError, SurgeonError
from surgeon.methods.inputs._prompt_inputs import (InputPromptMethod, PromptInputs, PromptPatch, embedding_size,
                                            local_names, new_parameter, prefix_layout, scoped_names)
from surgeon.methods._rng import draw
from surgeon.methods.base import ApplyContext, MethodParams, Patch, Target, locate, register
from surgeon.methods.inputs.prompt import PromptTuningParams, initial_prompt


class MptParams(PromptTuningParams):
    tasks: int = Field(..., ge=1, description="number of tasks T (task ids 0..T-1)")
    rank: int = Field(1, ge=1, description="rank r of each task's multiplicative update")


class _MultitaskSource:
    """The (B, P, d) prompts of a batch's tasks; a checked task id per row."""

    def __init__(self, prompt: nn.Parameter, cols: nn.Parameter, rows: nn.Parameter) -> None:
        self.prompt, self.cols, self.rows = prompt, cols, rows

    def __call__(self, batch: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        tasks = self.cols.shape[0]
        if task_ids is None:
            if tasks > 1:
                raise SurgeonError(f"multitask prompt tuning ({tasks} tasks) needs task ids: model(..., task_ids=...) "
                                   "or surgeon.methods.inputs.mpt.use_task(model, task_ids)")
            task_ids = torch.zeros(batch, dtype=torch.long, device=self.prompt.device)
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= tasks):
            raise SurgeonError(f"task ids must lie in 0..{tasks - 1}, got {task_ids.tolist()}")
        task_ids = task_ids.to(self.prompt.device)
        update = torch.matmul(self.cols.index_select(0, task_ids), self.rows.index_select(0, task_ids))
        return self.prompt.unsqueeze(0) * update


class use_task:  # noqa: N801  (used like a function: `use_task(model, ids)` or `with use_task(model, ids):`)
    """Task ids for the calls that pass none (`generate`, pipelines); None clears them. Takes the
    patched model or its job. As a context manager, the previous ids come back on exit."""

    def __init__(self, model: Any, task_ids: torch.Tensor | int | list[int] | None) -> None:
        self.inputs = _multitask_inputs(model if isinstance(model, nn.Module) else model.model)
        self.previous = self.inputs.default_task_ids
        self.inputs.default_task_ids = None if task_ids is None else torch.as_tensor(task_ids).long().reshape(-1)

    def __enter__(self) -> "use_task":
        return self

    def __exit__(self, *exc: object) -> None:
        self.inputs.default_task_ids = self.previous


def _multitask_inputs(model: nn.Module) -> PromptInputs:
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, PromptInputs) and isinstance(owner.source, _MultitaskSource):
            return owner
    raise SurgeonError("this model has no multitask prompt ('inject mpt ...') to set task ids for")


@register
class MultitaskPromptTuning(InputPromptMethod):
    verb = "inject"
    name = "mpt"
    Params = MptParams
    summary = "a shared prompt times a per-task low-rank update, task ids at forward time (Wang et al. 2023)"
    peft_type = "MULTITASK_PROMPT_TUNING"

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, MptParams)
        d, p, t, r = embedding_size(target)[1], params.tokens, params.tasks, params.rank
        return {"prompt_embeddings": (p, d), "prefix_task_cols": (t, p, r), "prefix_task_rows": (t, r, d)}

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, MptParams)
        _, _, embedding = locate(model, target.path)
        added = {name: new_parameter(shape, embedding.weight) for name, shape in cls.added_shapes(target, params).items()}
        if ctx.init and embedding.weight.device.type != "meta":
            with torch.no_grad():
                added["prompt_embeddings"].copy_(initial_prompt(embedding, params, model, ctx.generator))
                draw(added["prefix_task_cols"], nn.init.normal_, ctx.generator, 0.0, 0.02)
                draw(added["prefix_task_rows"], nn.init.normal_, ctx.generator, 0.0, 0.02)
        source = _MultitaskSource(added["prompt_embeddings"], added["prefix_task_cols"], added["prefix_task_rows"])
        inputs = PromptInputs(model, embedding, source, prefix_layout(params.tokens))
        return PromptPatch(embedding, dict(added), inputs)

    # PEFT: MultitaskPromptTuningConfig; its checkpoint holds these three tensors under these names

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, MptParams)
        config: dict[str, Any] = {"num_virtual_tokens": params.tokens, "num_tasks": params.tasks,
                                  "num_ranks": params.rank, "num_transformer_submodules": 1,
                                  "prompt_tuning_init": "TEXT" if params.init not in ("random", "vocab") else "RANDOM"}
        if config["prompt_tuning_init"] == "TEXT":
            config |= {"prompt_tuning_init_text": params.init, "tokenizer_name_or_path": params.tokenizer}
        return config

    @classmethod
    def peft_target_config(cls, params: MethodParams, targets: list[Target]) -> dict[str, Any]:
        return {"token_dim": embedding_size(targets[0])[1]}

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return local_names(target, tensors)  # same names, same layouts

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert isinstance(params, MptParams)
        expected = set(cls.added_shapes(target, params))
        if set(tensors) != expected:
            raise ExportError(f"a PEFT multitask prompt checkpoint holds {sorted(expected)}, this one {sorted(tensors)}")
        p = params.tokens  # a seq2seq checkpoint's decoder half (rows P..2P) is never used: drop it
        return scoped_names(target, {"prompt_embeddings": tensors["prompt_embeddings"][:p],
                                     "prefix_task_cols": tensors["prefix_task_cols"][:, :p],
                                     "prefix_task_rows": tensors["prefix_task_rows"]})

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        values = [config.get(key) for key in ("num_virtual_tokens", "num_tasks", "num_ranks")]
        if not all(isinstance(v, int) and v >= 1 for v in values):
            raise ExportError(f"num_virtual_tokens, num_tasks and num_ranks must be positive numbers, got {values}")
        return f"inject mpt tokens={values[0]} tasks={values[1]} rank={values[2]} into embed"
