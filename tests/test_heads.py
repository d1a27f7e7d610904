"""The `head` role on masked-LM, classification, token-classification and QA models; tied biases.

Expected heads are listed by hand and cross-checked against transformers' own view of the model
(`get_output_embeddings()`, and everything outside `model.base_model`), never against surgeon's."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import (assert_merge_keeps_outputs_and_reverts, assert_same_model, batch, clone, run, tiny_bert_cls,
                      tiny_bert_mlm)
from torch import nn

import surgeon
from surgeon.errors import SpecError
from surgeon.graph import build_module_graph

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

_SMALL = {"vocab_size": 64, "num_labels": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _config(family: str) -> transformers.PretrainedConfig:
    if family == "bert":
        return transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=32, **_SMALL)
    if family == "roberta":
        return transformers.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=40, **_SMALL)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32, **_SMALL)
    if family in ("llama", "qwen2"):
        config = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        return config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, **_SMALL)
    return transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, decoder_start_token_id=0,
                                 **_SMALL)


MLM_BERT = {"cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder"}
HEADS = [  # model class, its config family, the modules of its output head
    ("BertForMaskedLM", "bert", MLM_BERT),
    ("BertForSequenceClassification", "bert", {"classifier"}),
    ("BertForTokenClassification", "bert", {"classifier"}),
    ("BertForQuestionAnswering", "bert", {"qa_outputs"}),
    ("RobertaForMaskedLM", "roberta", {"lm_head.dense", "lm_head.layer_norm", "lm_head.decoder"}),
    ("RobertaForSequenceClassification", "roberta", {"classifier.dense", "classifier.out_proj"}),
    ("GPT2LMHeadModel", "gpt2", {"lm_head"}),
    ("GPT2ForSequenceClassification", "gpt2", {"score"}),
    ("GPT2ForTokenClassification", "gpt2", {"classifier"}),
    ("GPT2ForQuestionAnswering", "gpt2", {"qa_outputs"}),
    ("LlamaForCausalLM", "llama", {"lm_head"}),
    ("LlamaForSequenceClassification", "llama", {"score"}),
    ("LlamaForTokenClassification", "llama", {"score"}),
    ("LlamaForQuestionAnswering", "llama", {"qa_outputs"}),
    ("Qwen2ForCausalLM", "qwen2", {"lm_head"}),
    ("Qwen2ForSequenceClassification", "qwen2", {"score"}),
    ("Qwen2ForTokenClassification", "qwen2", {"score"}),
    ("T5ForConditionalGeneration", "t5", {"lm_head"}),
    ("T5ForSequenceClassification", "t5", {"classification_head.dense", "classification_head.out_proj"}),
    ("T5ForTokenClassification", "t5", {"classifier"}),
    ("T5ForQuestionAnswering", "t5", {"qa_outputs"}),
]
_IDS = [name for name, _, _ in HEADS]


def _build(name: str, family: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(transformers, name)(_config(family)).eval()


def _outside_the_body(model: nn.Module) -> set[str]:
    """transformers' split: modules with parameters that are not in `model.base_model` (T5's
    generation and QA models are their own base: there the body is shared, encoder, decoder)."""
    body = model.base_model
    inside = {id(m) for m in body.modules()} if body is not model else {
        id(m) for part in ("shared", "encoder", "decoder") for m in getattr(model, part).modules()}
    return {path for path, m in model.named_modules()
            if id(m) not in inside and any(p is not None for p in m._parameters.values()) and len(m._modules) == 0}


def _head_paths(model: nn.Module) -> set[str]:
    return {path for path, info in build_module_graph(model).modules.items() if "head" in info.role_paths}


@pytest.mark.parametrize(("name", "family", "head"), HEADS, ids=_IDS)
def test_head_role_is_the_output_head(name, family, head):
    model = _build(name, family)
    assert _head_paths(model) == head
    assert _outside_the_body(model) == head  # transformers' own split agrees with the hand list
    output = model.get_output_embeddings()
    if output is not None:
        assert {path for path, m in model.named_modules() if m is output} <= head


@pytest.mark.parametrize(("name", "family", "head"), HEADS, ids=_IDS)
def test_quantize_base_leaves_every_head_out(name, family, head):
    """Every Linear / Conv1D but the head's, found by type; BertForMaskedLM's tied decoder used to
    stop the plan ("shares its weights with bert.embeddings.word_embeddings")."""
    model = _build(name, family)
    linear = {path for path, m in model.named_modules()
              if isinstance(m, (nn.Linear, transformers.pytorch_utils.Conv1D))}
    plan = surgeon.check("quantize base nf4", model)
    assert {r.target.path for r in plan.rewrites} == linear - head
    assert linear & head  # every one of these heads has a linear layer to leave out


def _copy_lora_into_peft(job: surgeon.Job, peft_model: nn.Module) -> None:
    peft_weights = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in job.trainable_parameters().items():
            path, _, local = name.rpartition(".")
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            peft_weights[f"base_model.model.{path}.{local}.default.weight"].copy_(param)
    assert len(peft_weights) == len(job.trainable_parameters())


@pytest.mark.parametrize(("name", "family", "peft_targets"), [
    ("RobertaForSequenceClassification", "roberta", r"classifier\.(dense|out_proj)"),  # a head of two layers
    ("GPT2ForSequenceClassification", "gpt2", ["score"]),
    ("BertForQuestionAnswering", "bert", ["qa_outputs"]),
])
def test_lora_into_head_equals_peft_on_the_head_layers(name, family, peft_targets):
    ours = _build(name, family)
    theirs = peft.get_peft_model(clone(ours), peft.LoraConfig(r=2, lora_alpha=4, target_modules=peft_targets))
    job = surgeon.apply("inject lora r=2 alpha=4 into head", ours, seed=0)
    _copy_lora_into_peft(job, theirs)
    ids = batch(shape=(2, 8)) % 64
    expected = theirs(input_ids=ids)
    got = ours(input_ids=ids)
    for key in ("logits", "start_logits"):
        if key in expected:
            assert (got[key] - expected[key]).abs().max() <= 1e-5, key


# --- BertForMaskedLM and BertForSequenceClassification through LoRA, BitFit and QLoRA ---

def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, transformers.BertForSequenceClassification):
        return model(input_ids=ids, labels=torch.arange(ids.shape[0]) % 3).loss
    return model(input_ids=ids, labels=ids).loss


def _train(job: surgeon.Job, model: nn.Module, steps: int = 2) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=5e-2)
    ids = batch(shape=(2, 12))
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(model, ids).backward()
        optimizer.step()


def _assert_ties_hold(model: nn.Module) -> None:
    """The MLM decoder still shares the embedding's weight and cls.predictions' bias."""
    if isinstance(model, transformers.BertForMaskedLM):
        decoder = model.cls.predictions.decoder
        assert decoder.weight is model.bert.embeddings.word_embeddings.weight
        assert decoder.bias is model.cls.predictions.bias


QLORA = "quantize base nf4 double compute=fp32\ninject lora r=2 alpha=4 into *.attn.<q,v>"
SPECS = ["inject lora r=4 alpha=8 into *.attn.<q,v>", "train bias",
         "inject lora r=2 into *.attn.<q,v>\ntrain bias only=<q,v,norm>", QLORA, QLORA + "\ntrain bias"]
ROUND_TRIPS = [(builder, spec) for builder in (tiny_bert_mlm, tiny_bert_cls) for spec in SPECS] + [
    (tiny_bert_mlm, "inject lora r=2 bias=lora_only tied=true into cls.predictions.decoder")]  # the tied bias trains


@pytest.mark.parametrize(("builder", "spec"), ROUND_TRIPS,
                         ids=[f"{b.__name__.removeprefix('tiny_')}-{i}" for i, (b, _) in enumerate(ROUND_TRIPS)])
def test_apply_train_merge_revert_round_trip(builder, spec):
    model = builder().train()
    original = clone(model)
    job = surgeon.apply(spec, model, seed=0)
    before = {n: p.detach().clone() for n, p in job.trainable_parameters().items()}
    _train(job, model)
    assert all(not torch.equal(p, before[n]) for n, p in job.trainable_parameters().items())
    job.revert()
    assert_same_model(model, original)
    _assert_ties_hold(model)
    job = surgeon.apply(spec, model, seed=0)
    _train(job, model)
    assert_merge_keeps_outputs_and_reverts(model.eval(), original.eval(), job, batch())
    _assert_ties_hold(model)


def test_bitfit_on_mlm_trains_the_body_biases_and_leaves_the_head():
    """`train bias` on BertForMaskedLM: every bias of the encoder and embeddings, by hand from the
    config; the head (and its tied decoder bias) is `train weights in head`'s."""
    model = tiny_bert_mlm()
    original = clone(model)
    job = surgeon.apply("train bias", model)
    c = model.config
    expected = {"bert.embeddings.LayerNorm.bias"}
    for i in range(c.num_hidden_layers):
        layer = f"bert.encoder.layer.{i}"
        expected |= {f"{layer}.attention.self.{n}.bias" for n in ("query", "key", "value")}
        expected |= {f"{layer}.attention.output.dense.bias", f"{layer}.attention.output.LayerNorm.bias",
                     f"{layer}.intermediate.dense.bias", f"{layer}.output.dense.bias", f"{layer}.output.LayerNorm.bias"}
    assert set(job.trainable_parameters()) == expected
    assert job.plan.trainable_parameters == c.hidden_size * (1 + 8 * c.num_hidden_layers) + \
        (c.intermediate_size - c.hidden_size) * c.num_hidden_layers
    _train(job, model)
    job.revert()
    assert_same_model(model, original)


def test_lora_on_the_tied_decoder_trains_its_bias_once_saves_loads_and_reverts(tmp_path):
    model = tiny_bert_mlm()
    original = clone(model)
    with pytest.raises(SpecError, match="shares its weights with bert.embeddings.word_embeddings"):
        surgeon.apply("inject lora r=2 bias=lora_only into cls.predictions.decoder", model)
    job = surgeon.apply("inject lora r=2 bias=lora_only tied=true into cls.predictions.decoder", model, seed=0)
    biases = [n for n in job.trainable_parameters() if n.endswith("bias")]
    assert len(biases) == 1
    _train(job, model)
    assert not torch.equal(model.cls.predictions.bias, original.cls.predictions.bias)  # one tensor, both names
    job.save(tmp_path / "run")
    fresh = tiny_bert_mlm()
    loaded = surgeon.load(tmp_path / "run", fresh)
    ids = batch()
    assert torch.equal(run(fresh, ids), run(model.eval(), ids))
    loaded.revert()
    assert_same_model(fresh, original)
    job.revert()
    assert_same_model(model, original)
    _assert_ties_hold(model)


class _TiedBiases(nn.Module):
    """Two layers that share one bias (as BERT's MLM decoder shares cls.predictions.bias)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.bias = self.a.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_bitfit_trains_a_tied_bias_once_saves_loads_and_reverts(tmp_path):
    model = _TiedBiases()
    original = clone(model)
    job = surgeon.apply("train bias", model)
    assert list(job.trainable_parameters()) == ["a.bias"]  # the name named_parameters() gives it
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    assert model.b.bias is model.a.bias and not torch.equal(model.a.bias, original.a.bias)
    expected = model(x).detach()
    job.save(tmp_path / "run")
    fresh = _TiedBiases()
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert torch.equal(fresh(x), expected)
    loaded.merge()
    assert torch.equal(fresh(x), expected)
    loaded.revert()
    assert_same_model(fresh, original)
    job.revert()
    assert_same_model(model, original)
    assert model.b.bias is model.a.bias
