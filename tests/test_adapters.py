"""Bottleneck adapters (`inject adapter config=pfeiffer|houlsby|parallel`) against AdapterHub's own
outputs and gradients (fixtures in tests/data/adapterhub, written by adapters 1.3.0 in its own
venv: tests/scripts/adapterhub/make_fixtures.py), and exact revert, training, save and load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_same_model, batch, clone, run, tiny_llama, tiny_mistral, tiny_qwen2, train_losses
from safetensors.torch import load_file
from torch import nn

import surgeon
from surgeon.adapterhub_format import surgeon_name as adapterhub_name
from surgeon.errors import PlanError, SpecError

FIXTURES = Path(__file__).parent / "data" / "adapterhub"
INDEX = json.loads((FIXTURES / "index.json").read_text())
CLASSES = {"bert": transformers.BertForMaskedLM, "llama": transformers.LlamaForCausalLM,
           "gpt2": transformers.GPT2LMHeadModel, "t5": transformers.T5ForConditionalGeneration}
CASES = [c for c in INDEX["cases"] if c["model_type"] in CLASSES and c["method"] != "mam"]
TOL = INDEX["tolerances"]


def surgeon_name(name: str) -> str:
    """AdapterHub's tensor name as surgeon names it (the mapping `surgeon import` uses; the
    reference is the library's logits and gradients, not the mapping)."""
    return adapterhub_name(name, INDEX["adapter_name"])


def fixture_model(model_type: str) -> nn.Module:
    return CLASSES[model_type].from_pretrained(FIXTURES / model_type / "base", attn_implementation="eager").eval()


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    extra = {"decoder_input_ids": inputs["decoder_input_ids"]} if "decoder_input_ids" in inputs else {}
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **extra).logits


def layers_named(model: nn.Module, skip: list[int]) -> str:
    """AdapterHub's skip_layers as a pattern; it numbers T5's decoder blocks after the encoder's."""
    encoder_layers = getattr(model.config, "num_layers", None) if model.config.is_encoder_decoder else None
    if encoder_layers is None:
        return f"layers.[{','.join(map(str, skip))}]"
    named = [f"encoder.layers.{i}" if i < encoder_layers else f"decoder.layers.{i - encoder_layers}" for i in skip]
    return f"<{','.join(named)}>"


def applied(case: dict, skip: list[int] | None = None) -> tuple[nn.Module, surgeon.Job]:
    model = fixture_model(case["model_type"])
    spec = case["surgeon_statement"] + (f"\ndrop adapters in {layers_named(model, skip)}" if skip else "")
    job = surgeon.apply(spec, model, seed=0)
    params = job.trainable_parameters()
    weights = load_file(str(FIXTURES / case["adapter_weights"]))
    assert {surgeon_name(n) for n in weights} == set(params)  # the very same tensors, no more, no less
    with torch.no_grad():
        for name, tensor in weights.items():
            params[surgeon_name(name)].copy_(tensor)
    return model, job


def assert_variant(model: nn.Module, job: surgeon.Job, variant: dict) -> None:
    """The fixture's logits, and where it has them its gradients of sum(logits * loss_weights);
    a dropped adapter (params_without_grad) is not in the graph at all."""
    inputs = load_file(str(FIXTURES / variant["inputs"]))
    expected = load_file(str(FIXTURES / variant["file"]))
    logits = forward(model, inputs)
    torch.testing.assert_close(logits, expected["logits"], **TOL["logits"])
    if not variant["has_grads"]:
        return
    (logits * inputs["loss_weights"]).sum().backward()
    params = job.trainable_parameters()
    for name in variant["params_without_grad"] or ():
        assert params[surgeon_name(name)].grad is None, name
    for key, grad in expected.items():
        if key.startswith("grad."):
            torch.testing.assert_close(params[surgeon_name(key.removeprefix("grad."))].grad, grad, **TOL["grads"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_logits_and_gradients_equal_adapterhub(case: dict) -> None:
    model, job = applied(case)
    for variant in [v for v in case["variants"] if not v["skip_layers"]]:
        assert_variant(model, job, variant)
        model.zero_grad()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_adapterdrop_equals_adapterhubs_skip_layers(case: dict) -> None:
    for variant in [v for v in case["variants"] if v["skip_layers"]]:
        model, job = applied(case, variant["skip_layers"])
        assert_variant(model, job, variant)


def test_adapterdrop_with_a_rate_drops_only_in_training_and_reverts() -> None:
    model = tiny_llama()
    original = clone(model)
    ids = batch()
    job = surgeon.apply("inject adapter config=pfeiffer\ndrop adapters rate=1.0 in layers.[0,1]", model, seed=0)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.add_(0.1)
    model.train()
    assert torch.equal(run(model, ids), run(original.train(), ids))  # rate 1: always dropped in training
    model.eval()
    assert not torch.equal(run(model, ids), run(original.eval(), ids))  # never in eval
    job.revert()
    assert_same_model(model, original)


def test_dropping_layers_without_adapters_is_refused_and_changes_nothing() -> None:
    model = tiny_llama()
    original = clone(model)
    with pytest.raises(surgeon.SurgeonError, match="holds no adapter to drop"):
        surgeon.apply("inject adapter config=pfeiffer in layers.[1]\ndrop adapters in layers.[0]", model)
    assert_same_model(model, original)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_added_parameters_are_the_librarys_count(case: dict) -> None:
    plan = surgeon.check(case["surgeon_statement"], fixture_model(case["model_type"]))
    assert plan.added_parameters == case["adapter_params"]


def test_counts_at_hidden_128_are_the_librarys() -> None:
    model = fixture_model("bert")  # hidden 128, 2 layers
    counts = INDEX["param_counts_hidden128"]["bert"]
    for config, method, issue in (("pfeiffer", "seq_bn", 4368), ("houlsby", "double_seq_bn", 8736),
                                  ("parallel", "par_bn", 33152)):
        found = surgeon.check(f"inject adapter config={config}", model).added_parameters
        assert found == counts[method]["adapter_params"] == issue


@pytest.mark.parametrize("config", ["pfeiffer", "houlsby", "parallel"])
def test_default_init_is_an_exact_identity_and_revert_is_exact(config: str) -> None:
    model = tiny_llama()
    original = clone(model)
    ids = batch()
    job = surgeon.apply(f"inject adapter config={config}", model, seed=0)
    assert torch.equal(run(model, ids), run(original, ids))  # up-projection zero: step 0 is the base
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.add_(0.1)
    assert not torch.equal(run(model, ids), run(original, ids))
    job.revert()
    assert_same_model(model, original)
    assert torch.equal(run(model, ids), run(original, ids))


def test_only_adapters_train_the_loss_falls_and_a_saved_run_loads(tmp_path: Path) -> None:
    model = tiny_llama().train()
    original = clone(model)
    job = surgeon.apply("inject adapter config=houlsby reduction=8 in layers.[1]", model, seed=0)
    assert set(job.trainable_parameters()) == {f"model.layers.1.{site}.{name}" for site in
                                              ("adapter_attention", "adapter_output") for name in
                                              ("adapter_down.0.weight", "adapter_down.0.bias",
                                               "adapter_up.weight", "adapter_up.bias")}
    losses = train_losses(model, job.trainable_parameters().values(), steps=8, lr=1e-2)
    assert losses[-1] < losses[0]
    job.save(tmp_path / "run")
    fresh = clone(original)
    surgeon.load(tmp_path / "run", fresh)
    assert torch.equal(run(fresh.eval(), batch()), run(model.eval(), batch()))
    job.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize("spec", [
    "quantize base nf4 double\ninject lora r=4 into *.attn.<q,v>\ninject adapter config=parallel init=bert",
    "inject prefix tokens=4 projection=16 into *.attn\ninject adapter config=parallel init=bert",  # MAM's two seams
    "train bias add=true\ninject adapter config=houlsby init=bert",
], ids=["qlora+lora", "prefix", "bitfit"])
def test_an_adapter_composes_with_other_methods_and_trains(spec: str) -> None:
    model = tiny_llama().train()
    original = clone(model)
    job = surgeon.apply(spec, model, seed=0)
    losses = train_losses(model, job.trainable_parameters().values(), steps=6, lr=1e-2)
    assert losses[-1] < losses[0]
    job.revert()
    assert_same_model(model, original)


def test_merge_is_refused_with_the_reason(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from surgeon.cli import app

    model = tiny_llama()
    original = clone(model)
    model.save_pretrained(tmp_path / "base")
    job = surgeon.apply("inject adapter config=pfeiffer\ninject lora r=2 into *.attn.q", model)
    with pytest.raises(PlanError, match=r"'inject adapter' \(model.layers.0, model.layers.1\) is not mergeable: "
                                        r"a bottleneck adapter computes up\(act\(down\(x\)\)\)"):
        job.merge()
    job.save(tmp_path / "run")
    job.revert()
    assert_same_model(model, original)  # the refused merge left the model as it was
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "run"), "--model", str(tmp_path / "base"),
                                      "--out", str(tmp_path / "merged")])
    assert result.exit_code == 2 and "no weight matrix holds" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("statement, message", [
    ("inject adapter config=pfeiffer reducton=16", "did you mean 'reduction'"),
    ("inject adapter config=pfeifer", "pfeiffer"),
    ("inject adapter config=pfeiffer size=0", "size"),
    ("inject adapter config=pfeiffer in *.attn", "adapter placement is known for"),
    ("inject adapter config=pfeiffer in layers.[7]", "matches no module"),
])
def test_config_mistakes_are_located_errors(statement: str, message: str) -> None:
    model = tiny_llama()
    original = clone(model)
    with pytest.raises(SpecError, match=message):
        surgeon.apply(statement, model)
    assert_same_model(model, original)


def test_a_layer_of_unknown_placement_is_refused_with_the_reason() -> None:
    config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=64)
    with pytest.raises(SpecError, match="GPTNeoXLayer: adapter placement is known for"):
        surgeon.check("inject adapter config=pfeiffer", transformers.GPTNeoXForCausalLM(config))


@pytest.mark.parametrize("config", ["pfeiffer", "houlsby", "parallel"])
@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(config: str, model_type: str) -> None:
    """AdapterHub breaks gradient checkpointing (adapter-hub/adapters#732); the hooks here re-run
    with the recomputed forward and give the same gradients."""
    grads = []
    for checkpointing in (False, True):
        model = fixture_model(model_type).train()
        job = surgeon.apply(f"inject adapter config={config} init=bert", model, seed=0)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        inputs = load_file(str(FIXTURES / model_type / "inputs_pad.safetensors"))
        (forward(model, inputs) * inputs["loss_weights"]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in job.trainable_parameters().items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-6)


def _roberta() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, vocab_size=128, max_position_embeddings=72)
    return transformers.RobertaForMaskedLM(config).eval()


@pytest.mark.parametrize("config", ["pfeiffer", "houlsby", "parallel"])
@pytest.mark.parametrize("build", [tiny_qwen2, tiny_mistral, _roberta], ids=["qwen2", "mistral", "roberta"])
def test_the_other_architectures_take_every_config_and_revert_exactly(build, config: str) -> None:
    """No AdapterHub fixture for these: the placement is their family's (Llama's, BERT's); this checks
    that every adapter is reached (each one's up-projection changes the output) and revert is exact."""
    model = build()
    original = clone(model)
    ids = batch()
    job = surgeon.apply(f"inject adapter config={config}", model, seed=0)
    assert torch.equal(run(model, ids), run(original, ids))
    for name, param in job.trainable_parameters().items():
        if name.endswith("adapter_up.bias"):
            with torch.no_grad():
                param.fill_(0.05)
            assert not torch.equal(run(model, ids), run(original, ids)), name
            with torch.no_grad():
                param.zero_()
    job.revert()
    assert_same_model(model, original)


SAVED = [c for c in CASES if c.get("saved_adapter_dir")]


@pytest.mark.parametrize("case", SAVED, ids=[c["name"] for c in SAVED])
def test_an_adapterhub_saved_adapter_imports_to_the_librarys_outputs(case: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from surgeon.cli import app

    base = FIXTURES / case["model_type"] / "base"
    result = CliRunner().invoke(app, ["import", str(FIXTURES / case["saved_adapter_dir"]), "--model", str(base),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "inject adapter config=" in (tmp_path / "run" / "spec.peft").read_text()
    model = fixture_model(case["model_type"])
    surgeon.load(tmp_path / "run", model)
    variant = next(v for v in case["variants"] if v["name"] == "nopad")
    logits = forward(model, load_file(str(FIXTURES / variant["inputs"])))
    torch.testing.assert_close(logits, load_file(str(FIXTURES / variant["file"]))["logits"], **TOL["logits"])


def test_an_adapterhub_pickle_or_an_option_surgeon_lacks_is_refused(tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from surgeon.cli import app

    case = next(c for c in SAVED if c["name"] == "llama/seq_bn")
    base = str(FIXTURES / "llama" / "base")
    pickled = tmp_path / "pickled"
    shutil.copytree(FIXTURES / case["saved_adapter_dir"], pickled)
    (pickled / "adapter.safetensors").rename(pickled / "pytorch_adapter.bin")
    gated = tmp_path / "gated"
    shutil.copytree(FIXTURES / case["saved_adapter_dir"], gated)
    config = json.loads((gated / "adapter_config.json").read_text())
    config["config"]["use_gating"] = True
    (gated / "adapter_config.json").write_text(json.dumps(config))
    outside = tmp_path / "outside"
    shutil.copytree(FIXTURES / case["saved_adapter_dir"], outside)
    config = json.loads((outside / "adapter_config.json").read_text())
    config["config"]["leave_out"] = [7]  # the model has layers 0 and 1
    (outside / "adapter_config.json").write_text(json.dumps(config))
    for folder, message in ((pickled, "is a pickle"), (gated, "use_gating=True"),
                            (outside, "leave_out [7] is not a list of layer indices of this model (0 to 1)")):
        result = CliRunner().invoke(app, ["import", str(folder), "--model", base, "--out", str(tmp_path / "run")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "run").exists()
