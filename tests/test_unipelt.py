"""UniPELT (`specs/unipelt.peft`: a prefix, a pfeiffer adapter and LoRA on q, v, each under `gate`)
against AdapterHub's own outputs (fixtures written by adapters 1.3.0 in its own venv:
tests/scripts/adapterhub/make_composition_fixtures.py, eager attention): logits on padded and
unpadded batches, every gradient, every gate's value, on BERT, Llama and GPT-2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_same_model, clone
from safetensors.torch import load_file
from torch import nn

import surgeon
from surgeon.adapterhub_format import surgeon_name
from surgeon.methods.data_path.gate import Gate

FIXTURES = Path(__file__).parent / "data" / "adapterhub"
INDEX = json.loads((FIXTURES / "composition" / "index.json").read_text())
CLASSES = {"bert": transformers.BertForMaskedLM, "llama": transformers.LlamaForCausalLM,
           "gpt2": transformers.GPT2LMHeadModel}
CASES = [c for c in INDEX["cases"] if c["method"] == "unipelt"]
TOL = INDEX["tolerances"]
SPEC = (Path(__file__).parent.parent / "specs" / "unipelt.peft").read_text()
_PREFIX = re.compile(r"(.*)\.prefix_tuning\.pool\.prefix_tunings\.a\.self_prefix\.(wte|control_trans\.0|control_trans\.2)"
                     r"\.(weight|bias)")
_PREFIX_LOCAL = {("wte", "weight"): "prefix_embedding", ("control_trans.0", "weight"): "prefix_in_weight",
                 ("control_trans.0", "bias"): "prefix_in_bias"}


def attention_path(library_path: str) -> str:
    """The library keeps BERT's prefix on `attention.self`; surgeon's prefix target is `attention`."""
    return library_path.removesuffix(".self")


def ours(name: str, tensor: torch.Tensor, prefix_paths: list[str]) -> dict[str, torch.Tensor]:
    """One library tensor (weight or gradient) as the run's tensors, by their names."""
    if (match := _PREFIX.fullmatch(name)) is not None:
        module, kind = match[2], match[3]
        if module != "control_trans.2":  # the MLP's first half sits on layer 0 of the stack
            return {f"{prefix_paths[0]}[prefix].{_PREFIX_LOCAL[(module, kind)]}": tensor}
        rows = tensor.shape[0] // len(prefix_paths)  # the last Linear's rows, split by layer
        return {f"{p}[prefix].prefix_out_{kind}": tensor[i * rows:(i + 1) * rows] for i, p in enumerate(prefix_paths)}
    if (match := re.fullmatch(r"(.*)\.prefix_tuning\.prefix_gates\.a\.(weight|bias)", name)) is not None:
        return {f"{attention_path(match[1])}[prefix].prefix_gate.{match[2]}": tensor}
    if (match := re.fullmatch(r"(.*)\.loras\.a\.(lora_A|lora_B|gate\.weight|gate\.bias)", name)) is not None:
        path, local = match[1], match[2]
        if path.endswith("c_attn") and local.startswith("lora_"):  # GPT-2: q and v stacked (grouped conv1d)
            half = tensor.shape[0] // 2
            return {f"{path}[lora].{local}_q": tensor[:half], f"{path}[lora].{local}_v": tensor[half:]}
        return {f"{path}[lora].{local}": tensor}
    return {surgeon_name(name, "a", named=True).replace("[a]", "[adapter]"): tensor}


def spec_for(case: dict) -> str:
    return SPEC.replace("projection=512", f"projection={INDEX['unipelt_prefix_bottleneck'][case['model_type']]}")


def applied(case: dict) -> tuple[nn.Module, surgeon.Job, list[str]]:
    model = CLASSES[case["model_type"]].from_pretrained(FIXTURES / INDEX["models"][case["model_type"]]["base_dir"],
                                                        attn_implementation="eager").eval()
    job = surgeon.apply(spec_for(case), model, seed=0)
    params = job.trainable_parameters()
    prefix_paths = [r.target.path for r in job.plan.rewrites if r.method == "prefix"]
    filled: set[str] = set()
    with torch.no_grad():
        for file in case["weights"]:
            for name, tensor in load_file(str(FIXTURES / file)).items():
                if name in case["param_aliases"]:
                    continue  # the library's second name for a shared tensor
                for key, value in ours(name, tensor, prefix_paths).items():
                    params[key].copy_(value)
                    filled.add(key)
    assert filled == set(params)  # every tensor of the run came from the library, none is left over
    return model, job, prefix_paths


def gate_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each gate's last output, under the library's module name (forward hooks)."""
    found: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, Gate):
            def keep(m: nn.Module, args: tuple, out: torch.Tensor, path: str = path) -> None:
                found[path] = out.detach()
            module.register_forward_hook(keep)
    return found


def library_gate_name(path: str, model_type: str) -> str:
    if path.endswith(".prefix_gate"):
        attention = path.removesuffix(".prefix_gate")
        return f"{attention}.self.prefix_tuning.prefix_gates.a" if model_type == "bert" else \
            f"{attention}.prefix_tuning.prefix_gates.a"
    if "adapter_output[adapter]" in path:
        layer = path.removesuffix(".adapter_output[adapter].gate")
        site = {"bert": "output.adapters", "llama": "output_adapters.adapters", "gpt2": "output_adapters.adapters"}
        return f"{layer}.{site[model_type]}.a.gate"
    return f"{path.removesuffix('.gate').removesuffix('.base')}.loras.a.gate"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_unipelt_equals_adapterhub_logits_gradients_and_gates(case: dict) -> None:
    model, job, prefix_paths = applied(case)
    gates = gate_values(model)
    for variant in case["variants"]:
        inputs = load_file(str(FIXTURES / variant["inputs"]))
        expected = load_file(str(FIXTURES / variant["file"]))
        model.zero_grad()
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        torch.testing.assert_close(logits, expected["logits"], **TOL["logits"])
        library = {library_gate_name(path, case["model_type"]): value for path, value in gates.items()}
        assert {f"gate.{name}" for name in library} == set(variant["gate_keys"])
        for name, value in library.items():
            torch.testing.assert_close(value, expected[f"gate.{name}"], **TOL["gates"])
        if variant["has_grads"]:
            (logits * inputs["loss_weights"]).sum().backward()
            params = job.trainable_parameters()
            grads: dict[str, torch.Tensor] = {}
            for key, grad in expected.items():
                if key.startswith("grad.") and key.removeprefix("grad.") not in case["param_aliases"]:
                    grads |= ours(key.removeprefix("grad."), grad, prefix_paths)
            assert set(grads) == set(params)
            for name, grad in grads.items():
                torch.testing.assert_close(params[name].grad, grad, **TOL["grads"])


def test_a_gate_is_switched_with_its_adapter_and_revert_is_exact() -> None:
    case = next(c for c in CASES if c["model_type"] == "llama")
    model, job, _ = applied(case)
    original = CLASSES["llama"].from_pretrained(FIXTURES / "llama" / "base", attn_implementation="eager").eval()
    ids = load_file(str(FIXTURES / "llama" / "inputs_nopad.safetensors"))["input_ids"]
    job.activate(["prefix", "adapter"])
    assert not any("[lora]" in name for name in job.trainable_parameters())  # the LoRA's gate went with it
    with torch.no_grad():
        without_lora = model(input_ids=ids).logits
    job.activate(job.adapter_names())
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, without_lora)
    with pytest.raises(surgeon.SurgeonError, match="'gate gate' .* is not mergeable"):
        job.merge()
    job.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize(("spec", "expected"), [
    ("inject lora into *.attn.q as lora\ngate <lora,prefx>", "no adapter named 'prefx' before this statement"),
    ("inject ia3 into *.attn.q as a\ngate <a>", "'a' is 'inject ia3': gate scales LoRA"),
    ("inject adapter config=houlsby as a\ngate <a>", "'a' is 'inject adapter config=houlsby'"),
    ("inject lora into *.attn.q as a\ngate <a> into *.attn.q", "takes no target clause"),
    ("inject lora into *.attn.q as a\ngate a", "gate takes a list of adapter names"),
])
def test_a_gate_over_what_it_cannot_gate_is_refused_where_it_is_written(spec: str, expected: str) -> None:
    from conftest import tiny_llama

    model = tiny_llama()
    original = clone(model)
    with pytest.raises(surgeon.SurgeonError, match=expected) as err:
        surgeon.apply(spec, model)
    assert ":2:" in str(err.value)
    assert_same_model(model, original)
