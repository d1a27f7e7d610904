"""Multitask prompt tuning patched in place, against PEFT's MultitaskPromptTuningConfig; task ids
at forward time (a call argument taken out by the pre-hook) and for generate (`use_task`)."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from conftest import BUILDERS, batch
from torch import nn
from test_prompt import (apply, assert_forward_parity, assert_generate_parity, assert_reverts, outputs,
                         peft_config_of, peft_tensors, peft_twin, randomize, train_steps)

import surgeon
from surgeon.errors import SpecError, SurgeonError
from surgeon.methods.inputs.mpt import use_task
from surgeon.planner import method_of, params_of

TASKS = torch.tensor([2, 0])
STATEMENT = "inject mpt tokens=4 tasks=3 rank=2 into TARGET"


class _DecoderIdsAsLabels:
    """PEFT 0.21's seq2seq MPT forward (num_transformer_submodules=1) drops decoder_input_ids and only
    builds decoder inputs from labels: hand it labels whose right shift is the decoder ids."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, decoder_input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if decoder_input_ids is not None and kwargs.get("labels") is None:
            kwargs["labels"] = torch.cat([decoder_input_ids[:, 1:], decoder_input_ids[:, :1]], 1)
            assert torch.all(decoder_input_ids[:, 0] == 0)  # shift_tokens_right puts the start token back
        return self.model(**kwargs)


def peft_mpt(job: surgeon.Job, before: nn.Module, name: str) -> Any:
    theirs = peft_twin(job, before, name)
    return _DecoderIdsAsLabels(theirs) if name == "t5" else theirs


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_forward_matches_peft(name: str) -> None:
    model, before, job = apply(name, STATEMENT)
    randomize(job)
    theirs = peft_mpt(job, before, name)
    assert_forward_parity(model, theirs, name, virtual=4, ours_kwargs={"task_ids": TASKS},
                          theirs_kwargs={"task_ids": TASKS})
    # the task matters: another task's prompt gives other outputs
    ids = batch()
    a, _ = outputs(model, name, ids, torch.ones_like(ids), task_ids=TASKS)
    b, _ = outputs(model, name, ids, torch.ones_like(ids), task_ids=TASKS.flip(0))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "qwen2", "t5"])
def test_generate_matches_peft_with_use_task(name: str) -> None:
    model, before, job = apply(name, STATEMENT)
    randomize(job)
    theirs = peft_mpt(job, before, name)
    with use_task(job, TASKS):  # job-level
        assert_generate_parity(model, theirs, name, theirs_kwargs={"task_ids": TASKS})
    use_task(model, TASKS)  # model-level, until cleared
    assert_generate_parity(model, theirs, name, theirs_kwargs={"task_ids": TASKS})
    use_task(model, None)
    with pytest.raises(SurgeonError, match="needs task ids"):
        outputs(model, name, batch(), torch.ones_like(batch()))


def test_bert_matches_the_formula_by_hand() -> None:
    """PEFT's feature-extraction model cannot pass task ids to MPT: the reference is the unpatched
    BERT fed prompt_t = P* * (cols_t @ rows_t) in front of the embedded ids."""
    model, before, job = apply("bert", STATEMENT)
    randomize(job)
    added = job.trainable_parameters()
    prompt, cols, rows = (added[f"embeddings.word_embeddings.{n}"] for n in
                          ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"))
    ids = batch()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with torch.no_grad():
        prompts = torch.stack([prompt * (cols[t] @ rows[t]) for t in TASKS.tolist()])
        embeds = torch.cat([prompts, before.embeddings.word_embeddings(ids)], 1)
        expected = before(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1))
    ours, _ = outputs(model, "bert", ids, mask, task_ids=TASKS)
    keep = torch.cat([torch.ones(2, 4), mask], 1) == 1
    torch.testing.assert_close(ours[keep], expected.last_hidden_state[keep], atol=1e-5, rtol=0)


def test_task_ids_per_call_win_and_are_checked() -> None:
    model, _, job = apply("llama", STATEMENT)
    randomize(job)
    ids = batch()
    with use_task(model, [1, 1]):
        a, _ = outputs(model, "llama", ids, torch.ones_like(ids), task_ids=TASKS)
    b, _ = outputs(model, "llama", ids, torch.ones_like(ids), task_ids=TASKS)
    assert torch.equal(a, b)
    one, _ = outputs(model, "llama", ids, torch.ones_like(ids), task_ids=torch.tensor(1))  # one id for the batch
    both, _ = outputs(model, "llama", ids, torch.ones_like(ids), task_ids=torch.tensor([1, 1]))
    assert torch.equal(one, both)
    with pytest.raises(SurgeonError, match="0..2"):
        outputs(model, "llama", ids, torch.ones_like(ids), task_ids=torch.tensor([0, 3]))
    with pytest.raises(SurgeonError, match="no multitask prompt"):
        use_task(BUILDERS["llama"](0), 0)
    single, _, _ = apply("llama", "inject mpt tokens=4 tasks=1 into TARGET")
    outputs(single, "llama", ids, torch.ones_like(ids))  # one task: no ids needed


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_check_counts_the_formula(name: str) -> None:
    target = "shared" if name == "t5" else "embed"
    for p, t, r in [(4, 3, 1), (7, 5, 3)]:
        plan = surgeon.check(f"inject mpt tokens={p} tasks={t} rank={r} into {target}\n", BUILDERS[name](0))
        assert plan.added_parameters == p * 64 + t * (p * r + r * 64)  # P*d + T*(P*r + r*d)
    peft_model = peft.get_peft_model(BUILDERS[name](0), peft.MultitaskPromptTuningConfig(
        task_type="SEQ_2_SEQ_LM" if name == "t5" else "CAUSAL_LM", num_virtual_tokens=7, num_tasks=5, num_ranks=3,
        num_transformer_submodules=1))
    assert peft_model.get_nb_trainable_parameters()[0] == 7 * 64 + 5 * (7 * 3 + 3 * 64)


def test_only_the_prompt_trains_and_the_loss_falls() -> None:
    model, before, job = apply("llama", STATEMENT)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trained) == sorted(job.trainable_parameters()) == [
        f"model.embed_tokens.{n}" for n in ("prefix_task_cols", "prefix_task_rows", "prompt_embeddings")]
    losses = train_steps(model, job, "llama", task_ids=torch.tensor([1, 1, 2, 2]))
    assert losses[-1] < losses[0] - 0.05
    assert_reverts(model, before, job)


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
def test_revert_is_exact(name: str) -> None:
    model, before, job = apply(name, STATEMENT)
    outputs(model, name, batch(), torch.ones_like(batch()), task_ids=TASKS)
    assert_reverts(model, before, job)


def test_peft_hooks_round_trip_and_import() -> None:
    model, _, job = apply("gpt2", STATEMENT)
    randomize(job)
    rewrite = job.plan.rewrites[0]
    method, params = method_of(rewrite), params_of(rewrite)
    exported = peft_tensors(job)
    assert set(exported) == {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
    back = method.from_peft_tensors(rewrite.target, params, exported)
    added = {f"{rewrite.target.path}.{k}": v for k, v in job._surgery.patches[0][1].added_parameters().items()}
    assert all(torch.equal(back[k], added[k]) for k in added) and back.keys() == added.keys()
    statement = method.statement_from_peft(peft_config_of(job, "gpt2").to_dict(), [rewrite.target.path])
    twin = BUILDERS["gpt2"](0)
    imported = surgeon.apply(surgeon.parse_spec(statement + "\n", "peft"), twin)
    with torch.no_grad():
        for name, tensor in back.items():
            imported.trainable_parameters()[name].copy_(tensor)
    ids = batch()
    torch.testing.assert_close(outputs(twin, "gpt2", ids, torch.ones_like(ids), task_ids=TASKS)[0],
                               outputs(model, "gpt2", ids, torch.ones_like(ids), task_ids=TASKS)[0], atol=1e-6, rtol=0)


def test_bad_values_and_composition() -> None:
    model = BUILDERS["llama"](0)
    with pytest.raises(SpecError, match="needs parameter 'tasks'"):
        surgeon.check("inject mpt tokens=4 into embed\n", model)
    with pytest.raises(SpecError, match="rank"):
        surgeon.check("inject mpt tokens=4 tasks=2 rank=0 into embed\n", model)
    with pytest.raises(SpecError, match="cannot compose"):
        surgeon.check("inject mpt tokens=4 tasks=2 into embed\ninject ptuning tokens=3 into embed\n", model)
