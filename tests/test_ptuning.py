"""P-tuning patched in place: PEFT's PromptEncoderConfig (MLP and LSTM) as the reference for the
prefix form; templates checked against hand-built inputs_embeds fed to the unpatched model."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import BUILDERS, batch
from test_prompt import (apply, assert_forward_parity, assert_generate_parity, assert_reverts, masks, outputs,
                         peft_config_of, peft_tensors, randomize, train_steps)
from torch import nn

import surgeon
from surgeon.errors import ExportError, SpecError
from surgeon.planner import method_of, params_of

D, P = 64, 4


def mlp_count(p: int, d: int, h: int) -> int:
    return p * d + (d * h + h) + (h * h + h) + (h * d + d)


def lstm_count(p: int, d: int, h: int, layers: int = 2) -> int:
    lstm = sum(2 * (4 * h * ((d if layer == 0 else 2 * h) + h) + 8 * h) for layer in range(layers))
    return p * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def peft_trained_twin(job: surgeon.Job, before: nn.Module, name: str) -> nn.Module:
    """PEFT's own encoder (training mode: it runs the MLP/LSTM) with surgeon's encoder weights."""
    model = peft.get_peft_model(before, peft_config_of(job, name))
    ours = job._surgery.patches[0][1].owner.prompt_encoder
    model.prompt_encoder["default"].load_state_dict(ours.state_dict())
    return model.eval()


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert"])
def test_forward_matches_peft_encoder(name: str, encoder: str) -> None:
    model, before, job = apply(name, f"inject ptuning tokens={P} encoder={encoder} hidden=32 into TARGET")
    randomize(job, std=0.3)
    assert_forward_parity(model, peft_trained_twin(job, before, name), name, virtual=P)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "t5"])
def test_generate_matches_peft(name: str, encoder: str) -> None:
    model, before, job = apply(name, f"inject ptuning tokens={P} encoder={encoder} into TARGET")
    randomize(job, std=0.3)
    assert_generate_parity(model, peft_trained_twin(job, before, name), name)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_peft_checkpoint_holds_the_encoder_output(encoder: str) -> None:
    """PEFT loads surgeon's export (the encoder's output) and gives surgeon's outputs."""
    model, before, job = apply("gpt2", f"inject ptuning tokens={P} encoder={encoder} into TARGET")
    randomize(job, std=0.3)
    theirs = peft.get_peft_model(before, peft_config_of(job, "gpt2", inference_mode=True))
    peft.set_peft_model_state_dict(theirs, peft_tensors(job))
    assert_forward_parity(model, theirs.eval(), "gpt2", virtual=P)
    rewrite = job.plan.rewrites[0]
    method, params = method_of(rewrite), params_of(rewrite)
    with pytest.raises(ExportError, match="imports as prompt tuning"):
        method.from_peft_tensors(rewrite.target, params, peft_tensors(job))
    statement = method.statement_from_peft(peft_config_of(job, "gpt2").to_dict(), [rewrite.target.path])
    twin = BUILDERS["gpt2"](0)
    imported = surgeon.apply(surgeon.parse_spec(statement + "\n", "peft"), twin)
    with torch.no_grad():
        imported.trainable_parameters()["transformer.wte.prompt_embeddings"].copy_(peft_tensors(job)["prompt_embeddings"])
    assert_forward_parity(twin, model, "gpt2", virtual=P)


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_check_counts_match_the_formulas(name: str) -> None:
    target = "shared" if name == "t5" else "embed"
    model = BUILDERS[name](0)
    assert surgeon.check(f"inject ptuning tokens=5 into {target}\n", model).added_parameters == mlp_count(5, D, D)
    spec = f"inject ptuning tokens=5 encoder=mlp hidden=24 into {target}\n"
    assert surgeon.check(spec, model).added_parameters == mlp_count(5, D, 24)
    spec = f"inject ptuning tokens=5 encoder=lstm hidden=24 into {target}\n"
    assert surgeon.check(spec, model).added_parameters == lstm_count(5, D, 24)
    spec = f"inject ptuning tokens=5 encoder=lstm hidden=24 layers=1 into {target}\n"
    assert surgeon.check(spec, model).added_parameters == lstm_count(5, D, 24, layers=1)
    # and PEFT counts the same for its own encoder
    peft_model = peft.get_peft_model(BUILDERS[name](0), peft.PromptEncoderConfig(
        task_type="SEQ_2_SEQ_LM" if name == "t5" else "CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=24,
        encoder_reparameterization_type="LSTM", num_transformer_submodules=1))
    assert peft_model.get_nb_trainable_parameters()[0] == lstm_count(5, D, 24)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_only_the_encoder_trains_and_the_loss_falls(encoder: str) -> None:
    model, before, job = apply("llama", f"inject ptuning tokens={P} encoder={encoder} into TARGET")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == list(job.trainable_parameters())
    assert all(n.startswith("model.embed_tokens.prompt_encoder.") for n in trained)
    losses = train_steps(model, job, "llama")
    assert losses[-1] < losses[0] - 0.05
    assert_reverts(model, before, job)


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
def test_revert_is_exact(name: str) -> None:
    model, before, job = apply(name, f"inject ptuning tokens={P} encoder=lstm into TARGET")
    outputs(model, name, batch(), torch.ones_like(batch()))
    assert_reverts(model, before, job)


# templates: the reference is the unpatched model fed the sequence built by hand

TEMPLATE = "[P:2] [INPUT] [P] [5]"  # two virtual tokens, the input, one virtual token, anchor token 5


def by_hand(plain: nn.Module, prompts: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
            generated: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the unpatched Llama for [v0 v1] ids [v2 tok5] generated, mask ones at the inserted places."""
    table = plain.get_input_embeddings()
    batch_size = ids.shape[0]
    anchor = table(torch.full((batch_size, 1), 5))
    parts = [prompts[:2].expand(batch_size, -1, -1), table(ids), prompts[2:3].expand(batch_size, -1, -1), anchor]
    full_mask = [torch.ones(batch_size, 2, dtype=mask.dtype), mask, torch.ones(batch_size, 2, dtype=mask.dtype)]
    if generated is not None:
        parts.append(table(generated))
        full_mask.append(torch.ones_like(generated))
    with torch.no_grad():
        return plain(inputs_embeds=torch.cat(parts, 1), attention_mask=torch.cat(full_mask, 1)).logits


def test_template_places_the_virtual_tokens() -> None:
    model, before, job = apply("llama", f'inject ptuning tokens=3 template="{TEMPLATE}" into TARGET')
    randomize(job, std=0.3)
    encoder = job._surgery.patches[0][1].owner.prompt_encoder
    with torch.no_grad():
        prompts = encoder.prompts()[0]
    ids = batch(1)
    for side, mask in masks(ids).items():
        ours, _ = outputs(model, "llama", ids, mask)
        expected = by_hand(before, prompts, ids, mask)
        assert ours.shape == expected.shape == (2, 12 + 4, 128)
        keep = torch.cat([torch.ones(2, 2), mask, torch.ones(2, 2)], 1) == 1
        torch.testing.assert_close(ours[keep], expected[keep], atol=1e-5, rtol=0, msg=side)
    # labels: -100 at the four inserted places; as in PEFT's prefix form the last virtual token before
    # the input predicts its first token, and nothing is predicted after it
    out = model(input_ids=ids, labels=ids)
    logits = by_hand(before, prompts, ids, torch.ones_like(ids))
    expected = nn.functional.cross_entropy(logits[:, 1:1 + 12].reshape(-1, 128), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)


def test_template_generate_continues_after_the_suffix() -> None:
    model, before, job = apply("llama", f'inject ptuning tokens=3 template="{TEMPLATE}" into TARGET')
    randomize(job, std=0.3)
    with torch.no_grad():
        prompts = job._surgery.patches[0][1].owner.prompt_encoder.prompts()[0]
    ids = batch(2, (2, 6))
    generated = torch.zeros((2, 0), dtype=torch.long)
    for _ in range(4):  # greedy by hand, no cache
        logits = by_hand(before, prompts, ids, torch.ones_like(ids), generated)
        generated = torch.cat([generated, logits[:, -1].argmax(-1, keepdim=True)], 1)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         eos_token_id=-1, pad_token_id=0)
    assert torch.equal(out[:, 6:], generated)
    padded = torch.cat([torch.zeros((2, 2), dtype=torch.long), ids], 1)
    pad_mask = torch.cat([torch.zeros((2, 2), dtype=torch.long), torch.ones_like(ids)], 1)
    out = model.generate(input_ids=padded, attention_mask=pad_mask, max_new_tokens=4, do_sample=False,
                         eos_token_id=-1, pad_token_id=0)
    assert torch.equal(out[:, 8:], generated)


def test_template_errors_and_export_refusal() -> None:
    model = BUILDERS["llama"](0)
    for template, message in [("[P:2] [INPUT]", "holds 2 virtual tokens"), ("[P:3]", "exactly once"),
                              ("[P:3] [INPUT] [X]", "is not"), ("[INPUT] [INPUT] [P:3]", "exactly once")]:
        with pytest.raises(SpecError, match=message):
            surgeon.check(f'inject ptuning tokens=3 template="{template}" into embed\n', model)
    with pytest.raises(SpecError, match="applies to encoder=lstm"):
        surgeon.check("inject ptuning tokens=3 layers=3 into embed\n", model)
    job = surgeon.apply(f'inject ptuning tokens=3 template="{TEMPLATE}" into embed\n', model)
    with pytest.raises(ExportError, match="only prepends"):
        peft_tensors(job)
    spec = "inject ptuning tokens=3 into embed\ninject prompt tokens=2 into embed\n"
    with pytest.raises(SpecError, match="cannot compose"):
        surgeon.check(spec, BUILDERS["llama"](0))
