"""Prefix tuning / P-tuning v2 patched in place, against PEFT's PrefixTuningConfig.

The reference is PEFT's wrapped model built on an independent copy, with the same random prefix
weights copied into its PrefixEncoder. PEFT's `generate` ignores the prefix on Llama under this
transformers (its output equals the plain model's), so generation is checked against a greedy loop
over PEFT's own forward (full recompute, no cache) with the positions `generate` uses.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import peft
import pytest
import torch
from conftest import BUILDERS, assert_same_model, batch, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from typer.testing import CliRunner

import surgeon
from surgeon.cli import app
from surgeon.errors import SpecError, SurgeonError
from surgeon.methods.base import Target
from surgeon.methods.attention.prefix import Prefix
from surgeon.models import load_model

ROOT = Path(__file__).resolve().parent.parent
P = 5


def _spec(proj: int | None, tokens: int = P, where: str = "*.attn") -> str:
    return f"inject prefix tokens={tokens}{f' projection={proj}' if proj else ''} into {where}"


def _paths(job: surgeon.Job) -> list[str]:
    paths = {name.rsplit(".", 1)[0] for name in job.added_tensors()}
    return sorted(paths, key=lambda p: [int(s) for s in p.split(".") if s.isdigit()])


def _peft(base: torch.nn.Module, job: surgeon.Job, proj: int | None, tokens: int = P) -> peft.PeftModel:
    """PEFT's model on `base` holding the same prefix weights as `job` (PEFT's layout, by hand)."""
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens,
                                     prefix_projection=proj is not None,
                                     **({"encoder_hidden_size": proj} if proj else {}))
    model = peft.get_peft_model(base, config).eval()
    encoder, t, paths = model.prompt_encoder["default"], job.added_tensors(), _paths(job)
    with torch.no_grad():
        if proj is None:
            encoder.embedding.weight.copy_(torch.cat([t[f"{p}.prefix"] for p in paths], 1))
        else:
            encoder.embedding.weight.copy_(t[f"{paths[0]}.prefix_embedding"])
            encoder.transform[0].weight.copy_(t[f"{paths[0]}.prefix_in_weight"])
            encoder.transform[0].bias.copy_(t[f"{paths[0]}.prefix_in_bias"])
            encoder.transform[2].weight.copy_(torch.cat([t[f"{p}.prefix_out_weight"] for p in paths], 0))
            encoder.transform[2].bias.copy_(torch.cat([t[f"{p}.prefix_out_bias"] for p in paths], 0))
    return model


def _padded(side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    ids = batch(shape=(2, 10))
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    return ids, mask


def _config_state(model: torch.nn.Module) -> list[tuple[dict, str | None]]:
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    return [(dict(vars(c)), c._attn_implementation) for c in configs.values()]


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("proj", [None, 16])
@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_and_loss_match_peft(name, proj, side):
    model = BUILDERS[name]()
    plain = copy.deepcopy(model)
    job = surgeon.apply(_spec(proj), model, seed=0)
    reference = _peft(copy.deepcopy(plain), job, proj)
    ids, mask = _padded(side)
    real = mask.bool()
    with torch.no_grad():
        ours, theirs = model(input_ids=ids, attention_mask=mask), reference(input_ids=ids, attention_mask=mask)
        before = plain(input_ids=ids, attention_mask=mask).logits
        assert (ours.logits - before)[real].abs().max() > 1e-2  # the prefix does something
        assert (ours.logits - theirs.logits)[real].abs().max() <= 1e-5
        labels = ids.masked_fill(~real, -100)
        a = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        b = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert abs(a.item() - b.item()) <= 1e-5
    assert type(model) is type(plain)  # still the user's own class, no wrapper


def _greedy_reference(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes, with the positions `generate` gives left padding."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("proj", [None, 16])
def test_generate_with_cache_matches_peft_greedy(name, proj):
    model = BUILDERS[name]()
    plain = copy.deepcopy(model)
    job = surgeon.apply(_spec(proj), model, seed=0)
    reference = _peft(copy.deepcopy(plain), job, proj)
    ids, mask = _padded("left")
    ours = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, _greedy_reference(reference, ids, mask, 8))
    if name == "llama":  # (tiny random GPT-2 repeats its last token whatever the prefix)
        assert not torch.equal(ours, plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                    do_sample=False))
    if name == "gpt2":  # PEFT's own generate works on GPT-2
        assert torch.equal(ours, reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                    do_sample=False))
    # sampling goes through the same cache path: top_k=1 sampling is greedy
    sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=1)
    assert torch.equal(sampled, ours)
    torch.manual_seed(0)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True)
    assert free.shape == ours.shape


@pytest.mark.parametrize("where", ["encoder.**.attn", "decoder.**.attn", "decoder.**.cross_attn"])
def test_t5_each_attention_separately(where):
    model = tiny_t5()
    plain = copy.deepcopy(model)
    before = _config_state(model)
    job = surgeon.apply(_spec(8, tokens=4, where=where), model, seed=0)
    stack, role = ("encoder", "layer.0") if where.startswith("encoder") else ("decoder", "layer.0")
    if "cross" in where:
        role = "layer.1"
    assert all(p.startswith(stack) and p.endswith(role) for p in _paths(job))
    ids, mask = _padded("right")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits
        ref = plain(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits
    assert (out - ref).abs().max() > 1e-2
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    decoded = torch.zeros((2, 1), dtype=torch.long)
    for _ in range(5):  # the reference: full recompute, no cache
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoded, use_cache=False).logits
        decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, decoded)
    job.revert()
    assert_same_model(model, plain)
    assert _config_state(model) == before


def test_bert_and_position_budget():
    bert = tiny_bert()
    plain = copy.deepcopy(bert)
    surgeon.apply(_spec(None, tokens=10), bert, seed=0)
    ids = batch(shape=(2, 54))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with torch.no_grad():
        out = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (out - plain(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max() > 1e-2
    # 55 tokens + 10 virtual tokens > 64 positions: a clear error, not an index error
    with pytest.raises(SurgeonError, match="at most 54 tokens"):
        bert(input_ids=batch(shape=(2, 55)))
    gpt2 = tiny_gpt2()
    surgeon.apply(_spec(None, tokens=10), gpt2, seed=0)
    gpt2(input_ids=batch(shape=(1, 54)))
    with pytest.raises(SurgeonError, match="max_position_embeddings"):
        gpt2(input_ids=batch(shape=(1, 55)))


@pytest.mark.parametrize("proj", [None, 16])
def test_counts_match_formulas(proj):
    model = tiny_llama()
    layers, kv_dim = 2, 2 * 16  # 2 kv heads of 16
    expected = P * layers * 2 * kv_dim if proj is None else \
        P * kv_dim + (kv_dim * proj + proj) + (proj * 2 * layers * kv_dim + 2 * layers * kv_dim)
    job = surgeon.apply(_spec(proj), model, seed=0)
    assert sum(p.numel() for p in job.trainable_parameters().values()) == expected
    # PEFT's own count, on its wrapped model
    reference = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=proj is not None,
        **({"encoder_hidden_size": proj} if proj else {})))
    assert reference.get_nb_trainable_parameters()[0] == expected


@pytest.mark.skipif("kv_dim" not in Target.model_fields,
                    reason="the planner does not record kv_dim of attention targets yet (shared change)")
def test_check_counts_match_formulas():
    plan = surgeon.check(_spec(16), tiny_llama())
    kv_dim = 32
    assert plan.trainable_parameters == P * kv_dim + (kv_dim * 16 + 16) + (16 * 4 * kv_dim + 4 * kv_dim)
    assert surgeon.check(_spec(None), tiny_llama()).trainable_parameters == P * 2 * 2 * kv_dim


def test_projection_without_layer_0_is_refused_and_changes_nothing():
    model = tiny_llama()
    plain = copy.deepcopy(model)
    with pytest.raises(SurgeonError, match="layer 0"):
        surgeon.apply(_spec(16, where="layers.1.attn"), model)
    assert_same_model(model, plain)
    assert model.config._attn_implementation == "sdpa" and vars(model.config) == vars(plain.config)


def test_prefix_claims_attention_and_inputs():
    with pytest.raises(SpecError, match="cannot compose"):
        surgeon.check(f"{_spec(None, where='layers.0.attn')}\n{_spec(None, where='layers.1.attn')}\n", tiny_llama())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trains_only_the_prefix_and_lowers_the_loss(checkpointing):
    model = tiny_llama()
    job = surgeon.apply(_spec(16), model, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(job.trainable_parameters())
    if checkpointing:  # PEFT refuses prefix tuning under gradient checkpointing
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = job.optimizer(lr=1e-2)
    ids = batch(shape=(2, 16))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        assert all(p.grad is not None for p in job.trainable_parameters().values())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        job = surgeon.apply(_spec(16), model, seed=0)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        ids = batch(shape=(2, 16))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in job.trainable_parameters().items()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fold_keeps_outputs_and_revert_is_exact(name):
    model = BUILDERS[name]()
    plain = copy.deepcopy(model)
    before = _config_state(model)
    job = surgeon.apply(_spec(16), model, seed=0)
    assert model.config._attn_implementation != "sdpa"
    ids, mask = _padded("left")
    with torch.no_grad():
        unfolded = model(input_ids=ids, attention_mask=mask).logits
        job.fold()
        folded = model(input_ids=ids, attention_mask=mask).logits
    assert (folded - unfolded)[mask.bool()].abs().max() <= 1e-5
    assert {n.rsplit(".", 1)[1] for n in job.trainable_parameters()} == {"prefix"}
    assert sum(p.numel() for p in job.trainable_parameters().values()) == P * 2 * 2 * 64 * (0.5 if name == "llama" else 1)
    job.revert()
    assert_same_model(model, plain)
    assert _config_state(model) == before and model.config._attn_implementation == "sdpa"


def test_revert_unfolded_is_exact():
    model = tiny_llama()
    plain = copy.deepcopy(model)
    before = _config_state(model)
    job = surgeon.apply(_spec(None), model, seed=0)
    model(input_ids=batch())
    job.revert()
    assert_same_model(model, plain)
    assert _config_state(model) == before


def test_fold_run_saves_and_reloads(tmp_path):
    llama_dir = tmp_path / "tiny-llama"
    shutil.copytree(ROOT / "examples" / "tiny-llama", llama_dir)
    (tmp_path / "prefix.peft").write_text(_spec(16) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["apply", str(tmp_path / "prefix.peft"), str(llama_dir), "--out", str(tmp_path / "run"),
                                 "--seed", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["fold", str(tmp_path / "run"), "--out", str(tmp_path / "run2")])
    assert result.exit_code == 0, result.output
    ids = batch(shape=(2, 8))
    outputs = []
    for run in ("run", "run2"):
        model, _ = load_model(str(llama_dir))
        job = surgeon.load(tmp_path / run, model)
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
        if run == "run2":
            assert {n.rsplit(".", 1)[1] for n in job.trainable_parameters()} == {"prefix"}
        job.revert()
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5


@pytest.mark.parametrize("proj", [None, 16])
@pytest.mark.parametrize("fold", [False, True])
def test_peft_export_loads_in_peft(proj, fold, tmp_path):
    model = tiny_llama()
    plain = copy.deepcopy(model)
    job = surgeon.apply(_spec(proj), model, seed=0)
    if fold and proj is not None:
        job.fold()
    job.save(tmp_path / "peft", format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "peft").eval()
    ids, mask = _padded("left")
    with torch.no_grad():
        diff = model(input_ids=ids, attention_mask=mask).logits - reference(input_ids=ids, attention_mask=mask).logits
    assert diff[mask.bool()].abs().max() <= 1e-5
    # the hooks directly: PEFT's prompt_embeddings is the layer blocks side by side
    patches = job._live().patches
    params = Prefix.Params(tokens=P, projection=proj)
    added = {f"{r.target.path}.{n}": t.detach() for r, p in patches for n, t in p.added_parameters().items()}
    exported = Prefix.to_peft_tensors(patches[0][0].target, params, added)
    assert exported.keys() == {"prompt_embeddings"}
    assert torch.allclose(exported["prompt_embeddings"],
                          reference.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)
    config = {"peft_type": Prefix.peft_type, "task_type": "CAUSAL_LM", **Prefix.peft_config(params)}
    imported = surgeon.apply(Prefix.statement_from_peft(config, []), plain, seed=0)
    assert len(imported.added_tensors()) == 2
    imported.revert()


@pytest.mark.skipif("kv_dim" not in Target.model_fields,
                    reason="the planner does not record kv_dim of attention targets yet (shared change)")
def test_peft_import_round_trip():
    model = tiny_llama()
    job = surgeon.apply(_spec(None), model, seed=0)
    patches = job._live().patches
    params = Prefix.Params(tokens=P)
    added = {f"{r.target.path}.{n}": t.detach() for r, p in patches for n, t in p.added_parameters().items()}
    back = Prefix.from_peft_tensors(patches[0][0].target, params,
                                    Prefix.to_peft_tensors(patches[0][0].target, params, added))
    assert back.keys() == added.keys() and all(torch.equal(back[k], added[k]) for k in added)
