"""AdapterFusion (`fuse adapters <a,b>`) against AdapterHub's own outputs (fixtures written by
adapters 1.3.0 in its own venv: tests/scripts/adapterhub/make_composition_fixtures.py, eager
attention): logits, fusion gradients and probabilities for the dynamic and static configs; the
temperature schedule forward by forward; the regulariser; on BERT, Llama and GPT-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import surgeon
from surgeon.adapterhub_format import surgeon_fusion_name, surgeon_name
from surgeon.methods.data_path.fusion import Fusion

FIXTURES = Path(__file__).parent / "data" / "adapterhub"
INDEX = json.loads((FIXTURES / "composition" / "index.json").read_text())
CLASSES = {"bert": transformers.BertForMaskedLM, "llama": transformers.LlamaForCausalLM,
           "gpt2": transformers.GPT2LMHeadModel}
CASES = {case["name"]: case for case in INDEX["cases"]}
TOL = INDEX["tolerances"]
SPECS = {"fusion": "fuse adapters <a,b>", "fusion_static": "fuse adapters <a,b> config=static",
         "fusion_temperature": "fuse adapters <a,b> temperature=true"}


def ours(name: str) -> str:
    """A fixture tensor's name in the run (the mapping `surgeon import` uses)."""
    if "adapter_fusion_layer" in name:
        return surgeon_fusion_name(name, ["a", "b"])
    return surgeon_name(name, "a" if ".adapters.a." in name else "b", named=True)


def fused(case: dict) -> tuple[nn.Module, surgeon.Job]:
    model_type = case["model_type"]
    model = CLASSES[model_type].from_pretrained(FIXTURES / INDEX["models"][model_type]["base_dir"],
                                                attn_implementation="eager").eval()
    spec = "inject adapter config=pfeiffer as a\ninject adapter config=pfeiffer as b\n" + SPECS[case["method_variant"]]
    job = surgeon.apply(spec, model, seed=0)
    added = job.added_tensors()
    weights = {name: t for file in case["weights"] for name, t in load_file(str(FIXTURES / file)).items()}
    assert {ours(n) for n in weights} == set(added)  # the very same tensors, no more, no less
    with torch.no_grad():
        for name, tensor in weights.items():
            added[ours(name)].copy_(tensor)
    return model, job


def fusions(model: nn.Module) -> list[Fusion]:
    return [m for m in model.modules() if isinstance(m, Fusion)]


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def cases(variant: str) -> list[dict]:
    found = []
    for model_type in CLASSES:
        case = dict(CASES[f"{model_type}/{variant}"])
        case["method_variant"] = variant
        found.append(case)
    return found


@pytest.mark.parametrize("case", cases("fusion") + cases("fusion_static"), ids=lambda c: c["name"])
def test_fusion_equals_adapterhub_logits_gradients_and_probabilities(case: dict) -> None:
    model, job = fused(case)
    for fusion in fusions(model):
        fusion.record = True
    for variant in case["variants"]:
        inputs = load_file(str(FIXTURES / variant["inputs"]))
        expected = load_file(str(FIXTURES / variant["file"]))
        model.zero_grad()
        logits = forward(model, inputs)
        torch.testing.assert_close(logits, expected["logits"], **TOL["logits"])
        for layer, fusion in enumerate(fusions(model)):
            torch.testing.assert_close(fusion.probabilities, expected[f"fusion_probs.layer{layer}.output_adapter"],
                                       **TOL["fusion_probs"])
        if variant["has_grads"]:
            (logits * inputs["loss_weights"]).sum().backward()
            params = job.added_tensors()
            grads = {key.removeprefix("grad."): grad for key, grad in expected.items() if key.startswith("grad.")}
            assert grads
            for name, grad in grads.items():
                torch.testing.assert_close(params[ours(name)].grad, grad, **TOL["grads"])
    if case.get("fusion_regularization_loss") is not None:
        assert abs(float(job.regularization()) - case["fusion_regularization_loss"]) <= 1e-6


@pytest.mark.parametrize("case", cases("fusion_temperature"), ids=lambda c: c["name"])
def test_the_temperature_schedule_follows_adapterhub_forward_by_forward(case: dict) -> None:
    """T starts at 50 and falls by 0.05 per forward (eval and no_grad too) to 1: the recorded
    forwards' logits, run on one model in order, with the unrecorded ones in between."""
    model, _ = fused(case)
    plain = load_file(str(FIXTURES / INDEX["models"][case["model_type"]]["inputs"][case["unrecorded_forward_inputs"]]))
    done = 0
    with torch.no_grad():
        for recorded in case["forwards"]:
            while done < recorded["forward"] - 1:
                forward(model, plain)
                done += 1
            before = [fusion.temperature for fusion in fusions(model)]
            assert before == list(recorded["temperature_before"].values())  # the same floats, not just close
            expected = load_file(str(FIXTURES / recorded["file"]))
            torch.testing.assert_close(forward(model, load_file(str(FIXTURES / recorded["inputs"]))),
                                       expected["logits"], **TOL["logits"])
            done += 1
            assert [fusion.temperature for fusion in fusions(model)] == list(recorded["temperature_after"].values())


@pytest.mark.parametrize("case", cases("fusion"), ids=lambda c: c["name"])
def test_adapterhub_saved_fusion_directories_import_with_the_librarys_outputs(case: dict, tmp_path: Path) -> None:
    """The library's save_adapter (a, b) + save_adapter_fusion (a,b) folders: `surgeon import` of the
    folder holding them writes a run of `inject adapter ... as a/b` + `fuse adapters <a,b>` whose
    logits are the library's."""
    from typer.testing import CliRunner

    from surgeon.cli import app

    base = FIXTURES / INDEX["models"][case["model_type"]]["base_dir"]
    saved = FIXTURES / case["saved_dir"]
    result = CliRunner().invoke(app, ["import", str(saved), "--model", str(base), "--out", str(tmp_path / "run"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    spec = json.loads(result.output.strip().splitlines()[-1])["spec"]
    assert spec.strip().splitlines()[1:] == [
        "inject adapter config=pfeiffer reduction=16.0 act=relu scale=1.0 as a",
        "inject adapter config=pfeiffer reduction=16.0 act=relu scale=1.0 as b", "fuse adapters <a,b>"]
    model = CLASSES[case["model_type"]].from_pretrained(base, attn_implementation="eager").eval()
    surgeon.load(tmp_path / "run", model)
    variant = case["variants"][0]
    with torch.no_grad():
        logits = forward(model, load_file(str(FIXTURES / variant["inputs"])))
    torch.testing.assert_close(logits, load_file(str(FIXTURES / variant["file"]))["logits"], **TOL["logits"])


def test_a_fusion_folder_whose_adapters_are_missing_is_refused(tmp_path: Path) -> None:
    import shutil

    saved = FIXTURES / CASES["bert/fusion"]["saved_dir"]
    shutil.copytree(saved / "fusion", tmp_path / "fusion")
    shutil.copytree(saved / "a", tmp_path / "a")
    with pytest.raises(surgeon.SurgeonError, match="the fusion fuses 'b', but neither"):
        surgeon.job.import_adapterhub_fusion(tmp_path / "fusion", str(FIXTURES / "bert" / "base"))
