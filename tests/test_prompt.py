"""Prompt tuning patched in place, checked against PEFT's PromptTuningConfig (the independent reference).

The helpers here (PEFT model from surgeon's own peft_config, forward and greedy comparisons) are
shared with test_ptuning.py and test_mpt.py.
"""

from __future__ import annotations

import warnings
from typing import Any

import peft
import pytest
import torch
from conftest import BUILDERS, assert_same_model, batch, clone
from torch import nn

import surgeon
from surgeon.errors import SpecError, SurgeonError
from surgeon.methods.base import registry
from surgeon.planner import method_of, params_of

warnings.filterwarnings("ignore", message=".*(Position ids|Token type ids) are not supported.*")

DECODERS = ["llama", "qwen2", "gpt2"]
TASK = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM",
        "bert": "FEATURE_EXTRACTION"}
EMBED = {"t5": "shared"}  # T5's `embed` also names its stacks' views of `shared`
STEPS = 5


def target_of(name: str) -> str:
    return EMBED.get(name, "embed")


def masks(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """No padding, row 0 padded on the left, row 0 padded on the right (3 tokens each)."""
    left, right = torch.ones_like(ids), torch.ones_like(ids)
    left[0, :3] = 0
    right[0, -3:] = 0
    return {"none": torch.ones_like(ids), "left": left, "right": right}


def randomize(job: surgeon.Job, seed: int = 5, std: float = 1.0) -> None:
    """Random, non-zero prompt weights (so a wrong wiring cannot pass by accident)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def peft_config_of(job: surgeon.Job, name: str, **extra: Any) -> peft.PeftConfig:
    """The PEFT config surgeon's own hooks write for the job's one statement."""
    rewrite = job.plan.rewrites[0]
    method, params = method_of(rewrite), params_of(rewrite)
    config = method.peft_config(params) | method.peft_target_config(params, [rewrite.target])
    return peft.get_peft_config({**config, **extra, "peft_type": method.peft_type, "task_type": TASK[name]})


def peft_tensors(job: surgeon.Job) -> dict[str, torch.Tensor]:
    rewrite, patch = job._surgery.patches[0]
    added = {f"{rewrite.target.path}.{n}": p.detach().clone() for n, p in patch.added_parameters().items()}
    return method_of(rewrite).to_peft_tensors(rewrite.target, params_of(rewrite), added)  # the exporter's naming


def peft_twin(job: surgeon.Job, base: nn.Module, name: str, **extra: Any) -> nn.Module:
    """A PEFT model over an untouched copy of the base, loaded with surgeon's exported tensors."""
    model = peft.get_peft_model(base, peft_config_of(job, name, **extra))
    peft.set_peft_model_state_dict(model, peft_tensors(job))
    return model.eval()


def decoder_ids(ids: torch.Tensor) -> torch.Tensor:
    """T5 decoder input: the start token (0), then five tokens."""
    return torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :5]], dim=1)


def outputs(model: nn.Module, name: str, ids: torch.Tensor, mask: torch.Tensor, labels: bool = False,
            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main output, loss) for one batch; causal labels are the ids with padding ignored."""
    with torch.no_grad():
        if name == "t5":
            out = model(input_ids=ids, attention_mask=mask, labels=ids[:, :6].contiguous() if labels else None,
                        decoder_input_ids=None if labels else decoder_ids(ids), **kwargs)
            return out.logits, out.loss
        if name == "bert":
            return model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state, None
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100) if labels else None,
                    **kwargs)
        return out.logits, out.loss


def assert_forward_parity(ours: nn.Module, theirs: nn.Module, name: str, virtual: int, seed: int = 1,
                          ours_kwargs: dict[str, Any] | None = None, theirs_kwargs: dict[str, Any] | None = None) -> None:
    """Outputs on the real tokens within 1e-5, and the same loss, for every padding side."""
    ids = batch(seed)
    for side, mask in masks(ids).items():
        a, loss_a = outputs(ours, name, ids, mask, labels=name != "bert", **(ours_kwargs or {}))
        b, loss_b = outputs(theirs, name, ids, mask, labels=name != "bert", **(theirs_kwargs or {}))
        assert a.shape == b.shape, side
        if name != "t5":  # decoder-only and BERT outputs hold the virtual positions first
            a, b = a[:, virtual:][mask == 1], b[:, virtual:][mask == 1]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"{name}, {side} padding")
        if loss_a is not None:
            torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=0)
        a, _ = outputs(ours, name, ids, mask, labels=False, **(ours_kwargs or {}))
        b, _ = outputs(theirs, name, ids, mask, labels=False, **(theirs_kwargs or {}))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
def greedy_reference(model: nn.Module, name: str, ids: torch.Tensor, steps: int = STEPS,
                     **kwargs: Any) -> torch.Tensor:
    """Greedy decoding by full forwards without a cache (PEFT 0.21's own generate re-injects the prompt
    at every step under transformers 5, so its forward is the reference)."""
    mask = torch.ones_like(ids)
    if name == "t5":
        out = torch.zeros((ids.shape[0], 1), dtype=torch.long)  # decoder_start_token_id
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out, **kwargs).logits
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out
    seq = ids
    for _ in range(steps):
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), **kwargs).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    options = {"max_new_tokens": STEPS, "do_sample": False, "eos_token_id": -1, "pad_token_id": 0} | kwargs
    return model.generate(input_ids=ids, attention_mask=mask, **options)


def assert_generate_parity(ours: nn.Module, theirs: nn.Module, name: str, seed: int = 2,
                           ours_kwargs: dict[str, Any] | None = None, theirs_kwargs: dict[str, Any] | None = None) -> None:
    """Greedy generate with the KV cache == PEFT's greedy decoding; sampling with top_k=1 is greedy
    too; a left-padded row generates what it generates unpadded."""
    ids = batch(seed, (2, 8))
    expected = greedy_reference(theirs, name, ids, **(theirs_kwargs or {}))
    assert torch.equal(generate(ours, ids, **(ours_kwargs or {})), expected)
    torch.manual_seed(0)
    sampled = generate(ours, ids, do_sample=True, top_k=1, **(ours_kwargs or {}))
    assert torch.equal(sampled, expected)
    torch.manual_seed(0)
    free = generate(ours, ids, do_sample=True, top_k=50, **(ours_kwargs or {}))  # sampling runs with the cache
    assert free.shape == expected.shape
    if name != "t5":  # left padding: same row, three pad tokens in front
        padded = torch.cat([torch.zeros((2, 3), dtype=torch.long), ids], dim=1)
        mask = torch.cat([torch.zeros((2, 3), dtype=torch.long), torch.ones_like(ids)], dim=1)
        task = {k: v for k, v in (ours_kwargs or {}).items()}
        assert torch.equal(generate(ours, padded, mask, **task)[:, 3:], expected)


def apply(name: str, statement: str, seed: int = 0) -> tuple[nn.Module, nn.Module, surgeon.Job]:
    """(patched model, untouched copy taken before apply, job)."""
    model = BUILDERS[name](seed)
    before = clone(model)
    job = surgeon.apply(statement.replace("TARGET", target_of(name)) + "\n", model)
    return model, before, job


def assert_reverts(model: nn.Module, before: nn.Module, job: surgeon.Job) -> None:
    config = model.config.to_dict()
    job.revert()
    assert_same_model(model, before)
    assert model.config.to_dict() == config == before.config.to_dict()
    assert model.config._attn_implementation == before.config._attn_implementation
    for module in model.modules():  # every hook this method installed is gone
        assert not module._forward_pre_hooks and not module._forward_hooks


def train_steps(model: nn.Module, job: surgeon.Job, name: str, steps: int = 8, **kwargs: Any) -> list[float]:
    """Loss per step of AdamW on the job's trainable parameters; the base must not move."""
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n not in job.trainable_parameters()}
    model.train()
    optimizer = job.optimizer(lr=0.3)
    ids = batch(3, (4, 10))
    losses = []
    for _ in range(steps):
        if name == "t5":
            loss = model(input_ids=ids, labels=ids[:, :5].contiguous(), **kwargs).loss
        else:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, **kwargs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]) and not p.requires_grad, n
    return losses


# prompt tuning


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert", "t5"])
def test_forward_matches_peft(name: str) -> None:
    model, before, job = apply(name, "inject prompt tokens=4 into TARGET")
    randomize(job)
    theirs = peft_twin(job, before, name)
    assert_forward_parity(model, theirs, name, virtual=4)
    # the prompt matters: the real tokens' outputs differ from the unpatched model's
    plain = BUILDERS[name](0)
    ids = batch(1)
    a, _ = outputs(model, name, ids, torch.ones_like(ids))
    b, _ = outputs(plain, name, ids, torch.ones_like(ids))
    assert (a[:, -b.shape[1]:] - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "t5"])
def test_generate_matches_peft(name: str) -> None:
    model, before, job = apply(name, "inject prompt tokens=4 into TARGET")
    randomize(job)
    assert_generate_parity(model, peft_twin(job, before, name), name)
    if name != "t5":  # (the tiny T5 repeats one token whatever its input: the forward test shows the prompt acts)
        assert not torch.equal(generate(model, batch(2, (2, 8))), generate(BUILDERS[name](0), batch(2, (2, 8))))


def test_position_ids_and_token_types_are_shifted() -> None:
    """Given position ids move past the prompt (it takes 0..P-1): equal to not giving them."""
    model, _, job = apply("llama", "inject prompt tokens=4 into TARGET")
    randomize(job)
    ids = batch(1)
    positions = torch.arange(12).expand(2, -1)
    a, _ = outputs(model, "llama", ids, torch.ones_like(ids), position_ids=positions)
    b, _ = outputs(model, "llama", ids, torch.ones_like(ids))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    bert, _, job = apply("bert", "inject prompt tokens=4 into TARGET")
    a, _ = outputs(bert, "bert", ids, torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    b, _ = outputs(bert, "bert", ids, torch.ones_like(ids))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_only_the_prompt_trains_and_the_loss_falls(name: str) -> None:
    model, _, job = apply(name, "inject prompt tokens=4 into TARGET")
    assert list(job.trainable_parameters()) == [f"{target_of(name) if name == 't5' else 'model.embed_tokens'}.prompt_embeddings"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(job.trainable_parameters())
    losses = train_steps(model, job, name)
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5", "qwen2"])
def test_revert_is_exact(name: str) -> None:
    model, before, job = apply(name, "inject prompt tokens=4 into TARGET")
    randomize(job)
    outputs(model, name, batch(), torch.ones_like(batch()))
    assert_reverts(model, before, job)
    a, _ = outputs(model, name, batch(), torch.ones_like(batch()))
    b, _ = outputs(before, name, batch(), torch.ones_like(batch()))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5"])
def test_check_counts_p_times_d(name: str) -> None:
    model = BUILDERS[name](0)
    plan = surgeon.check(f"inject prompt tokens=7 into {target_of(name)}\n", model)
    assert plan.added_parameters == plan.trainable_parameters == 7 * 64  # P * d
    assert not any(p.requires_grad is False for p in model.parameters())  # check changes nothing


def test_t5_into_embed_is_the_top_level_embedding_once() -> None:
    """T5's encoder and decoder hold the very `shared` embedding: `into embed` patches it once, at the
    top; naming a stack's view of it explicitly is refused with the way out."""
    plan = surgeon.check("inject prompt tokens=4 into embed\n", BUILDERS["t5"](0))
    assert [r.target.path for r in plan.rewrites] == ["shared"]
    with pytest.raises(SpecError, match="into shared"):
        surgeon.check("inject prompt tokens=4 into encoder.embed_tokens\n", BUILDERS["t5"](0))


def test_two_input_prompts_cannot_compose() -> None:
    spec = "inject prompt tokens=4 into embed\ninject prompt tokens=2 into embed\n"
    with pytest.raises(SpecError, match="cannot compose"):
        surgeon.check(spec, BUILDERS["llama"](0))


def test_bad_values_are_plan_errors() -> None:
    with pytest.raises(SpecError, match="tokens"):
        surgeon.check("inject prompt tokens=0 into embed\n", BUILDERS["llama"](0))
    with pytest.raises(SpecError, match="accepts embedding"):
        surgeon.check("inject prompt tokens=4 into layers.0.attn.q\n", BUILDERS["llama"](0))


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_absolute_positions_count_the_prompt(name: str) -> None:
    model, _, _ = apply(name, "inject prompt tokens=8 into TARGET")
    fits = batch(1, (1, 56))  # 8 + 56 = 64 positions: the model's limit
    outputs(model, name, fits, torch.ones_like(fits))
    too_long = batch(1, (1, 57))
    with pytest.raises(SurgeonError, match="8 virtual tokens.*64 absolute positions"):
        outputs(model, name, too_long, torch.ones_like(too_long))
    if name == "gpt2":  # decoding past the limit is caught too, not an index error
        with pytest.raises(SurgeonError, match="64 absolute positions"):
            generate(model, batch(1, (1, 54)))


def test_init_vocab_and_text_match_the_embeddings(tmp_path: Any) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(128)}
    raw = Tokenizer(models.WordLevel(words, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0").save_pretrained(tmp_path)
    model, before, job = apply("llama", f'inject prompt tokens=5 init="w7 w3" tokenizer="{tmp_path}" into TARGET')
    prompt = job.trainable_parameters()["model.embed_tokens.prompt_embeddings"]
    table = before.model.embed_tokens.weight
    assert torch.equal(prompt, table[[7, 3, 7, 3, 7]])  # repeated up to P, as PEFT
    theirs = peft.get_peft_model(before, peft_config_of(job, "llama"))
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight, prompt)
    model, _, job = apply("llama", "inject prompt tokens=6 init=vocab into TARGET")
    prompt = job.trainable_parameters()["model.embed_tokens.prompt_embeddings"]
    rows = [(table == row).all(1).nonzero() for row in prompt]
    assert all(len(found) >= 1 for found in rows)  # each row is some token's embedding
    _, _, job = apply("llama", "inject prompt tokens=6 into TARGET")
    prompt = job.trainable_parameters()["model.embed_tokens.prompt_embeddings"]
    assert abs(prompt.std().item() - 1.0) < 0.3  # random: N(0, 1), as PEFT's RANDOM


def test_peft_hooks_round_trip_and_import() -> None:
    model, before, job = apply("gpt2", "inject prompt tokens=4 init=vocab into TARGET")
    randomize(job)
    rewrite = job.plan.rewrites[0]
    method, params = method_of(rewrite), params_of(rewrite)
    added = {f"{rewrite.target.path}.{n}": p.detach() for n, p in job._surgery.patches[0][1].added_parameters().items()}
    exported = method.to_peft_tensors(rewrite.target, params, added)
    back = method.from_peft_tensors(rewrite.target, params, exported)
    assert back.keys() == added.keys() and all(torch.equal(back[k], added[k]) for k in added)
    config = peft_config_of(job, "gpt2").to_dict()
    assert config["prompt_tuning_init"] == "SAMPLE_VOCAB" and config["num_virtual_tokens"] == 4
    statement = method.statement_from_peft(config, [rewrite.target.path])
    twin = BUILDERS["gpt2"](0)
    imported = surgeon.apply(surgeon.parse_spec(statement + "\n", "peft"), twin)
    assert [r.target.path for r in imported.plan.rewrites] == [rewrite.target.path]
    with torch.no_grad():
        imported.trainable_parameters()["transformer.wte.prompt_embeddings"].copy_(back["transformer.wte.prompt_embeddings"])
    ids = batch()
    torch.testing.assert_close(outputs(twin, "gpt2", ids, torch.ones_like(ids))[0],
                               outputs(model, "gpt2", ids, torch.ones_like(ids))[0], atol=1e-6, rtol=0)
    # a PEFT seq2seq checkpoint (2P rows, the decoder half unused) imports its encoder half
    params8 = type(params)(tokens=2)
    rows = torch.randn(4, 64)
    back = method.from_peft_tensors(rewrite.target, params8, {"prompt_embeddings": rows})
    assert torch.equal(back["transformer.wte.prompt_embeddings"], rows[:2])
    assert registry()[("inject", "prompt")] is method
