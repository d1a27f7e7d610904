"""MAM (`specs/mam.peft`: prefix tuning + a parallel adapter, two seams) against AdapterHub's own
MAMConfig outputs and gradients (fixtures in tests/data/adapterhub, eager attention), with and
without AdapterDrop (`skip_layers`, which drops the prefix of a layer as well as its adapter)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_same_model, batch, clone, run, tiny_llama, train_losses
from safetensors.torch import load_file
from test_adapters import CLASSES, FIXTURES, INDEX, TOL, fixture_model, forward, layers_named, surgeon_name
from torch import nn

import surgeon
import surgeon.methods.attention.prefix as prefix_method
from surgeon.methods.base import DROP_SWITCH

MAM_SPEC = (Path(__file__).parent.parent / "specs" / "mam.peft").read_text()
CASES = [c for c in INDEX["cases"] if c["method"] == "mam"]
_PREFIX = re.compile(r".*\.prefix_tuning\.pool\.prefix_tunings\.\w+\.(\w+)_prefix\.(wte|control_trans\.0|control_trans\.2)"
                     r"\.(weight|bias)")
_LOCAL = {("wte", "weight"): "prefix_embedding", ("control_trans.0", "weight"): "prefix_in_weight",
          ("control_trans.0", "bias"): "prefix_in_bias"}


def spec_for(case: dict) -> str:
    """specs/mam.peft with the fixture's prefix MLP width (the library default, 800, on Llama)."""
    width = case["adapter_config"]["configs"][0]["bottleneck_size"]
    return MAM_SPEC.replace("projection=800", f"projection={width}")


def location(path: str) -> str:
    """AdapterHub's prefix pool key for one of surgeon's prefix targets."""
    if path.startswith("encoder."):
        return "encoder"
    if path.startswith("decoder."):
        return "cross" if path.endswith(".layer.1") else "self"
    return "self"


def stacks(params: dict[str, nn.Parameter]) -> dict[str, list[str]]:
    """Pool key -> surgeon's prefix targets of that stack, in layer order."""
    found: dict[str, list[str]] = {}
    for name in params:
        if name.endswith(".prefix_out_weight"):
            path = name.removesuffix(".prefix_out_weight")
            found.setdefault(location(path), []).append(path)
    index = re.compile(r"\.(\d+)\.")
    return {key: sorted(paths, key=lambda p: int(index.search(p + ".")[1])) for key, paths in found.items()}


def prefix_views(name: str, tensor: torch.Tensor, layers: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """One AdapterHub prefix tensor as surgeon's: the embedding and first Linear on the stack's
    first layer; the last Linear's rows split by layer (layer i: keys and values of rows
    [2i kv, 2i kv + 2 kv), the library's view (P, 2L, heads, head_dim))."""
    match = _PREFIX.fullmatch(name)
    assert match, name
    key, module, kind = match[1], match[2], match[3]
    paths = layers[key]
    if module != "control_trans.2":
        return {f"{paths[0]}.{_LOCAL[(module, kind)]}": tensor}
    rows = tensor.shape[0] // len(paths)
    return {f"{path}.prefix_out_{kind}": tensor[i * rows:(i + 1) * rows] for i, path in enumerate(paths)}


def loaded(case: dict, skip: list[int] | None = None, attention: str = "eager") -> tuple[nn.Module, surgeon.Job]:
    model = CLASSES[case["model_type"]].from_pretrained(FIXTURES / case["model_type"] / "base",
                                                        attn_implementation=attention).eval()
    spec = spec_for(case) + (f"\ndrop adapters in {layers_named(model, skip)}" if skip else "")
    job = surgeon.apply(spec, model, seed=0)
    params = job.trainable_parameters()
    layers = stacks(params)
    filled: set[str] = set()
    with torch.no_grad():
        for name, tensor in load_file(str(FIXTURES / case["adapter_weights"])).items():
            views = prefix_views(name, tensor, layers) if "prefix_tuning" in name else {surgeon_name(name): tensor}
            for ours, value in views.items():
                params[ours].copy_(value)
                filled.add(ours)
    assert filled == set(params)  # every tensor of the run came from the library, none is left over
    return model, job


def library_grads(expected: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The fixture's gradients under surgeon's names."""
    layers = stacks(params)
    grads: dict[str, torch.Tensor] = {}
    for key, grad in expected.items():
        if key.startswith("grad."):
            name = key.removeprefix("grad.")
            grads |= prefix_views(name, grad, layers) if "prefix_tuning" in name else {surgeon_name(name): grad}
    return grads


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_mam_equals_adapterhubs_logits_and_gradients(case: dict) -> None:
    model, job = loaded(case)
    for variant in [v for v in case["variants"] if not v["skip_layers"]]:
        inputs = load_file(str(FIXTURES / variant["inputs"]))
        expected = load_file(str(FIXTURES / variant["file"]))
        logits = forward(model, inputs)
        torch.testing.assert_close(logits, expected["logits"], **TOL["logits"])
        if variant["has_grads"]:
            (logits * inputs["loss_weights"]).sum().backward()
            params = job.trainable_parameters()
            grads = library_grads(expected, params)
            assert set(grads) == set(params)
            for name, grad in grads.items():
                torch.testing.assert_close(params[name].grad, grad, **TOL["grads"])
            model.zero_grad()


def adapterhubs_t5_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    """AdapterHub's T5 under skip_layers with a prefix (adapters 1.3, models/t5/modeling_t5.py:144-163):
    a skipped first layer computes the relative bias without the prefix; every later layer then
    finds the length wrong and, holding no bias table of its own, uses zeros, so the real tokens
    lose T5's relative positions altogether. surgeon keeps them; this emulates the library's bug
    so its fixture can still check everything else."""
    own = prefix_method._t5_bias

    def library(layer, bias: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
        first = layer.bias_source
        if first is not None and first.__dict__[DROP_SWITCH].dropped and first.__dict__[prefix_method._LAYER_ATTR] is not layer:
            return torch.zeros((1, bias.shape[1], q_len, kv_len + layer.tokens), dtype=bias.dtype)
        return own(layer, bias, q_len, kv_len)

    monkeypatch.setattr(prefix_method, "_t5_bias", library)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_adapterdrop_of_mam_equals_skip_layers(case: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    for variant in [v for v in case["variants"] if v["skip_layers"]]:
        inputs = load_file(str(FIXTURES / variant["inputs"]))
        expected = load_file(str(FIXTURES / variant["file"]))["logits"]
        model, _ = loaded(case, variant["skip_layers"])
        if case["model_type"] == "t5":  # the library's bug changes T5's outputs: surgeon's differ ...
            assert (forward(model, inputs) - expected).abs().max() > 1e-3
            adapterhubs_t5_bias(monkeypatch)  # ... by exactly that bug
        torch.testing.assert_close(forward(model, inputs), expected, **TOL["logits"])
        monkeypatch.undo()


@pytest.mark.parametrize("case", [c for c in CASES if c["model_type"] in ("llama", "gpt2")],
                         ids=["llama", "gpt2"])
def test_under_sdpa_mam_gives_the_eager_logits(case: dict) -> None:
    """AdapterHub's prefix is wrong under SDPA on decoder models (top-left causal alignment without
    padding, the prefix masked out with it); surgeon's under SDPA equals the library's eager result."""
    model, _ = loaded(case, attention="sdpa")
    assert model.config._attn_implementation == "surgeon_sdpa"
    for variant in [v for v in case["variants"] if not v["skip_layers"]]:
        inputs = load_file(str(FIXTURES / variant["inputs"]))
        torch.testing.assert_close(forward(model, inputs), load_file(str(FIXTURES / variant["file"]))["logits"],
                                   **TOL["logits"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_added_parameters_are_the_librarys_count(case: dict) -> None:
    assert surgeon.check(spec_for(case), fixture_model(case["model_type"])).added_parameters == case["adapter_params"]


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_counts_with_the_library_defaults_at_hidden_128(model_type: str) -> None:
    """MAMConfig() as the library counts it (prefix MLP 800), the models of the fixture at hidden 128."""
    base = fixture_model(model_type).config.to_dict()
    widths = {"bert": {"hidden_size": 128, "intermediate_size": 256},
              "llama": {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}}[model_type]
    config = type(fixture_model(model_type).config).from_dict({**base, **widths})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config) if model_type == "llama" else \
            transformers.BertForMaskedLM(config)
    assert surgeon.check(MAM_SPEC, model).added_parameters == \
        INDEX["param_counts_hidden128"][model_type]["mam"]["adapter_params"]


def test_mam_trains_saves_loads_and_reverts_exactly(tmp_path: Path) -> None:
    model = tiny_llama().train()
    original = clone(model)
    job = surgeon.apply(MAM_SPEC.replace("projection=800", "projection=32"), model, seed=0)
    assert {name.rsplit(".", 1)[-1] for name in job.trainable_parameters()} >= {"prefix_embedding", "weight", "bias"}
    assert all(p.requires_grad == (n in job.trainable_parameters()) for n, p in model.named_parameters())
    losses = train_losses(model, job.trainable_parameters().values(), steps=6, lr=1e-2)
    assert losses[-1] < losses[0]
    job.save(tmp_path / "run")
    fresh = tiny_llama()
    surgeon.load(tmp_path / "run", fresh)
    assert torch.equal(run(fresh.eval(), batch()), run(model.eval(), batch()))
    job.revert()
    assert_same_model(model, original)
    assert model.config.__dict__ == original.config.__dict__  # the attention switch is undone too
    assert all(type(m).forward is type(o).forward and "forward" not in vars(m)
               for m, o in zip(model.modules(), original.modules()))


def test_adapterhub_positions_leave_the_base_positions_and_are_refused_by_peft_export(tmp_path: Path) -> None:
    """positions=adapterhub shifts nothing: with the prefix dropped in every layer the model is
    the base exactly (positions=peft shifts BERT's absolute positions by the prefix length)."""
    model = fixture_model("bert")
    ids = torch.arange(1, 9)[None]
    base = model(ids).logits
    spec = "inject prefix tokens=4 projection=8 positions={} into *.attn\ndrop adapters in layers.*"
    job = surgeon.apply(spec.format("adapterhub"), model, seed=0)
    assert torch.equal(model(ids).logits, base)
    job.revert()
    job = surgeon.apply("inject prefix tokens=4 projection=8 positions=adapterhub into *.attn", model, seed=0)
    with pytest.raises(surgeon.SurgeonError, match="positions=adapterhub"):
        job.save(tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()
    job.revert()
    job = surgeon.apply(spec.format("peft"), model, seed=0)
    assert not torch.equal(model(ids).logits, base)
    job.revert()
