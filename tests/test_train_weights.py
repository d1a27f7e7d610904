"""`train weights in PATTERN`: chosen modules train in full (PEFT's modules_to_save), revert exactly.

Counts come from the configs by hand; PEFT (`modules_to_save`) is the reference for export and
import; exactness is checked against a deep copy taken before the surgery."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import (assert_same_model, batch, clone, run, tiny_bert_cls, tiny_gpt2, tiny_llama, train_losses)
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import surgeon
from surgeon.cli import app
from surgeon.errors import ExportError, SpecError
from surgeon.manifest import TRAINED_BASE_PREFIX
from surgeon.models import load_model

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

LABELS = torch.tensor([0, 2, 1, 0])


def tiny_roberta_cls(seed: int = 0) -> nn.Module:
    """RoBERTa's classifier is a head of two layers (dense, out_proj)."""
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, vocab_size=128, max_position_embeddings=72,
                                        num_labels=3)
    return transformers.RobertaForSequenceClassification(config).eval()


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _classify(model: nn.Module, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids, losses = batch(shape=(4, 12)), []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=LABELS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _randomize(job: surgeon.Job, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def test_head_of_a_classifier_trains_alone_and_reverts_exactly():
    model = tiny_bert_cls().train()
    original = clone(model)
    job = surgeon.apply("train weights in head", model)
    hidden, labels = model.config.hidden_size, model.config.num_labels
    assert set(job.trainable_parameters()) == {"classifier.weight", "classifier.bias"} == _trainable(model)
    assert job.plan.trainable_parameters == hidden * labels + labels and job.plan.added_parameters == 0
    losses = _classify(model)
    assert losses[-1] < losses[0]
    now, before = model.state_dict(keep_vars=True), original.state_dict()
    for name, tensor in before.items():
        assert torch.equal(now[name], tensor) != name.startswith("classifier."), name  # only the head moved
    job.revert()
    assert_same_model(model, original)


def test_a_head_of_several_layers_and_a_container_pattern():
    """`head` names every layer of RoBERTa's classifier; `classifier`, the container, means the
    layers inside it (as PEFT's modules_to_save=["classifier"] does), and so does `classifier.**`."""
    model = tiny_roberta_cls()
    expected = {f"classifier.{m}.{t}" for m in ("dense", "out_proj") for t in ("weight", "bias")}
    d, labels = model.config.hidden_size, model.config.num_labels
    for spec in ("train weights in head", "train weights in classifier.**", "train weights in classifier"):
        plan = surgeon.check(spec, model)
        assert {f"{r.target.path}.{n}" for r in plan.rewrites for n in r.trained} == expected
        assert plan.trainable_parameters == d * d + d + labels * d + labels
    with pytest.raises(SpecError, match="none of the 1 modules the statement matched is one weights acts on"):
        surgeon.check("train weights in roberta.embeddings.dropout", model)  # a module with no tensor at all


def test_beside_lora_trains_merges_and_reverts_after_merge():
    model = tiny_roberta_cls().train()
    original = clone(model)
    job = surgeon.apply("inject lora r=4 alpha=8 into *.attn.<q,v>\ntrain weights in head", model, seed=0)
    d, labels, layers = model.config.hidden_size, model.config.num_labels, model.config.num_hidden_layers
    lora = layers * 2 * 4 * (d + d)
    assert job.plan.trainable_parameters == lora + d * d + d + labels * d + labels
    assert sum(p.numel() for p in job.trainable_parameters().values()) == job.plan.trainable_parameters
    losses = _classify(model)
    assert losses[-1] < losses[0]
    model.eval()
    ids = batch()
    unmerged = run(model, ids)
    job.merge()
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in model.modules())
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    assert not torch.equal(model.classifier.out_proj.weight, original.classifier.out_proj.weight)  # merge keeps it
    job.revert()
    assert_same_model(model.train(), original.train())


def test_saved_run_holds_the_trained_weights_and_loads_back(tmp_path):
    model = tiny_bert_cls()
    original = clone(model)
    job = surgeon.apply("inject lora r=2 into *.attn.<q,v>\ntrain weights in classifier", model, seed=0)
    _randomize(job)
    ids = batch()
    expected = run(model, ids)
    job.save(tmp_path / "run")
    stored = load_file(str(tmp_path / "run" / "adapters.safetensors"))
    assert {TRAINED_BASE_PREFIX + "classifier.weight", TRAINED_BASE_PREFIX + "classifier.bias"} <= set(stored)
    assert torch.equal(stored[TRAINED_BASE_PREFIX + "classifier.weight"], model.classifier.weight.detach())
    fresh = tiny_bert_cls()
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert torch.equal(run(fresh, ids), expected)
    loaded.merge()
    assert (run(fresh, ids) - expected).abs().max() <= 1e-5
    loaded.revert()
    assert_same_model(fresh, original)
    job.revert()
    assert_same_model(model, original)


def _norms(model: nn.Module) -> set[str]:
    return {f"{path}.weight" for path, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"}


def test_longlora_embeddings_and_norms_beside_lora():
    """LongLoRA: LoRA on attention, embeddings and every norm trained in full."""
    model = tiny_llama().train()
    original = clone(model)
    job = surgeon.apply("inject lora r=2 into *.attn.<q,v>\ntrain weights in <embed,norm>", model, seed=0)
    c = model.config
    trained = {n for n in job.trainable_parameters() if "lora" not in n}
    assert trained == {"model.embed_tokens.weight"} | _norms(original)
    assert len(_norms(original)) == 2 * c.num_hidden_layers + 1
    q, v = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    lora = c.num_hidden_layers * 2 * ((c.hidden_size + q) + (c.hidden_size + v))
    by_hand = lora + c.vocab_size * c.hidden_size + (2 * c.num_hidden_layers + 1) * c.hidden_size
    assert job.plan.trainable_parameters == by_hand
    losses = train_losses(model, job.trainable_parameters().values(), steps=4)
    assert losses[-1] < losses[0]
    assert not torch.equal(model.model.norm.weight, original.model.norm.weight)
    job.revert()
    assert_same_model(model, original)


def test_tied_embedding_needs_tied_true_and_then_trains_the_head_with_it(tmp_path):
    model = tiny_gpt2().train()
    original = clone(model)
    with pytest.raises(SpecError, match=r"(?s)transformer\.wte shares its weights with lm_head .*add tied=true"):
        surgeon.apply("train weights in embed", model)
    job = surgeon.apply("train weights tied=true in <embed,head>", model)
    assert list(job.trainable_parameters()) == ["transformer.wte.weight"]  # one tensor, named once
    train_losses(model, job.trainable_parameters().values(), steps=2)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight)
    job.save(tmp_path / "run")
    fresh = tiny_gpt2()
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    loaded.revert()
    job.revert()
    assert_same_model(model, original)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("pattern", ["embed", "head"])
def test_a_tied_module_does_not_export_to_peft_which_would_untie_it(tmp_path, pattern):
    job = surgeon.apply(f"inject lora r=2 into c_attn\ntrain weights tied=true in {pattern}", tiny_gpt2(), seed=0)
    with pytest.raises(ExportError, match="modules_to_save trains a copy of .*unties"):
        job.save(tmp_path / "adapter", format="peft")
    assert not (tmp_path / "adapter").exists()


def test_does_not_share_a_module_with_lora():
    with pytest.raises(SpecError, match="targeted twice"):
        surgeon.check("inject lora r=2 into head\ntrain weights in head", tiny_bert_cls())


@pytest.mark.parametrize(("builder", "spec", "saved"), [
    (tiny_bert_cls, "inject lora r=4 alpha=8 into *.attn.<q,v>\ntrain weights in classifier", ["classifier"]),
    (tiny_roberta_cls, "inject lora r=4 alpha=8 into *.attn.<q,v>\ntrain weights in head", ["classifier"]),
    (tiny_llama, "inject lora r=4 alpha=8 into *.attn.<q,v>\ntrain weights in <embed,norm>",
     ["embed_tokens", "input_layernorm", "norm", "post_attention_layernorm"]),
], ids=["bert", "roberta", "llama"])
def test_exports_to_peft_modules_to_save_with_the_same_outputs(tmp_path, builder, spec, saved):
    model = builder()
    job = surgeon.apply(spec, model, seed=0)
    _randomize(job)
    job.save(tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == saved
    theirs = peft.PeftModel.from_pretrained(builder(), tmp_path / "adapter").eval()
    ids = batch()
    assert (run(theirs, ids) - run(builder(), ids)).abs().max() > 1e-3  # the adapter changes something
    assert (run(theirs, ids) - run(model, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("builder", [tiny_bert_cls, tiny_roberta_cls], ids=["bert", "roberta"])
def test_a_peft_adapter_with_modules_to_save_imports_with_the_same_outputs(tmp_path, builder):
    base = builder()
    base.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    theirs = peft.get_peft_model(builder(), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:  # LoRA's A and B, and the copy of the classifier PEFT trains
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()
    result = CliRunner().invoke(app, ["import", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"),
                                      "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    assert "train weights in " in json.loads(result.output)["spec"]
    fresh, _ = load_model(str(tmp_path / "base"))
    job = surgeon.load(tmp_path / "run", fresh)
    ids = batch()
    assert (run(fresh, ids) - run(theirs, ids)).abs().max() <= 1e-5
    assert {n for n in job.trainable_parameters() if n.startswith("classifier")} == \
        {n.removeprefix("base_model.model.").replace("modules_to_save.default.", "")
         for n, p in theirs.named_parameters() if p.requires_grad and "modules_to_save" in n}
    job.revert()
    assert_same_model(fresh, load_model(str(tmp_path / "base"))[0])


def test_check_counts_the_weights_it_makes_trainable(tmp_path):
    model = tiny_bert_cls()
    model.save_pretrained(tmp_path / "bert")
    spec = tmp_path / "head.peft"
    spec.write_text("train weights in head\ntrain bias only=<q,v>")
    result = CliRunner().invoke(app, ["check", str(spec), str(tmp_path / "bert"), "--json"])
    assert result.exit_code == 0, result.output
    c = model.config
    per_method = json.loads(result.output)["per_method"]
    assert per_method == {"train weights": c.hidden_size * c.num_labels + c.num_labels,
                          "train bias": 2 * c.hidden_size * c.num_hidden_layers}


def test_a_tied_tensor_reached_twice_is_counted_once() -> None:
    """GPT-2's wte is its head too: training both names trains one tensor, and check says so."""
    model = tiny_gpt2()
    plan = surgeon.check("train weights tied=true in <embed,head>", model)
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    assert plan.trainable_parameters == wte.numel()
