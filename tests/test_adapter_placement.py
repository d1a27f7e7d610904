"""Explicit adapter placement: `after *.attn`, `after *.mlp`, `beside *.mlp`, `beside *.attn`.
The compositions that are AdapterHub configurations are checked against its fixtures (houlsby =
after both sub-blocks, par_bn = beside the FFN); `beside *.attn` against a hand-written BERT layer."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_model, batch, clone, run, tiny_bert, tiny_llama, tiny_t5
from safetensors.torch import load_file
from test_adapters import FIXTURES, INDEX, TOL, fixture_model, forward, surgeon_name

import surgeon
from surgeon.errors import SpecError

EXPLICIT = {  # AdapterHub config -> the explicit statements that compute it
    "double_seq_bn": "inject adapter config=houlsby after *.attn\ninject adapter config=houlsby after *.mlp",
    "par_bn": "inject adapter config=parallel beside *.mlp",
}
CASES = [c for c in INDEX["cases"] if c["method"] in EXPLICIT]


def explicit_name(config_name: str, job: surgeon.Job) -> str:
    """A config form's name (`<layer>.adapter_attention.<...>`) as the explicit form's
    (`<the attention block>.adapter.<...>`): the sub-block of that layer the job placed it on."""
    layer, _, rest = config_name.partition(".adapter_")
    site, _, local = rest.partition(".")
    owners = {name.partition(".adapter.")[0] for name in job.trainable_parameters()}
    block = next(o for o in sorted(owners) if o.startswith(layer + ".")
                 and (("attn" in o or "attention" in o or o.endswith(".layer.0")) == (site == "attention")))
    return f"{block}.adapter.{local}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_explicit_placements_compute_the_librarys_configs(case: dict) -> None:
    model = fixture_model(case["model_type"])
    job = surgeon.apply(EXPLICIT[case["method"]], model, seed=0)
    params = job.trainable_parameters()
    weights = load_file(str(FIXTURES / case["adapter_weights"]))
    names = {explicit_name(surgeon_name(n), job): n for n in weights}
    assert set(names) == set(params)
    with torch.no_grad():
        for ours, theirs in names.items():
            params[ours].copy_(weights[theirs])
    for variant in [v for v in case["variants"] if not v["skip_layers"]]:
        inputs = load_file(str(FIXTURES / variant["inputs"]))
        torch.testing.assert_close(forward(model, inputs), load_file(str(FIXTURES / variant["file"]))["logits"],
                                   **TOL["logits"])


def _bert_layer_by_hand(layer, x: torch.Tensor, adapter, beside: bool) -> torch.Tensor:
    """BERT's post-norm layer written out, with an adapter A (its scale included) on the attention
    sub-block: beside: LN(h + A(x) + x); after: LN(h + A(h) + x); then the FFN as BERT computes it."""
    attention = layer.attention
    h = attention.output.dense(attention.self(x)[0])
    y = attention.output.LayerNorm(h + (adapter(x) if beside else adapter(h)) + x)
    return layer.output.LayerNorm(layer.output.dense(layer.intermediate(y)) + y)


@pytest.mark.parametrize("preposition", ["beside", "after"])
def test_an_adapter_at_berts_attention_is_the_formula(preposition: str) -> None:
    model = tiny_bert()
    job = surgeon.apply(f"inject adapter scale=2 init=bert {preposition} *.attn", model, seed=0)
    assert all(".attention.adapter." in name for name in job.trainable_parameters())
    layer = model.encoder.layer[0]
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = layer(x)
        got = out[0] if isinstance(out, tuple) else out
        expected = _bert_layer_by_hand(layer, x, layer.attention.adapter, preposition == "beside")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("spec", [
    "inject adapter after *.attn", "inject adapter after *.mlp", "inject adapter scale=4 beside *.mlp",
    "inject adapter beside *.attn", "inject adapter after *.attn\ninject adapter beside *.mlp",
])
@pytest.mark.parametrize("build", [tiny_llama, tiny_bert, tiny_t5], ids=["llama", "bert", "t5"])
def test_every_explicit_adapter_acts_and_reverts_exactly(build, spec: str) -> None:
    model = build()
    original = clone(model)
    ids = batch()
    job = surgeon.apply(spec, model, seed=0)
    assert torch.equal(run(model, ids), run(original, ids))  # up-projection zero: an exact identity
    layers = {name.partition(".adapter.")[0] for name in job.trainable_parameters()}
    assert len(layers) == sum(1 for _ in surgeon.check(spec, original).rewrites)  # BERT's FFN: one adapter
    for name, param in job.trainable_parameters().items():
        if name.endswith("adapter_up.bias"):
            with torch.no_grad():
                param.fill_(0.05)
            assert not torch.equal(run(model, ids), run(original, ids)), name  # each one is reached
            with torch.no_grad():
                param.zero_()
    job.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize("statement, message", [
    ("inject adapter after *.cross_attn", "cross-attention block"),
    ("inject adapter after layers.*", "names attention or feed-forward blocks"),
    ("inject adapter after *.mlp into *.attn", "does not take 'into'"),
    ("inject adapter after *.mlp beside *.mlp", "named by 'after' and by 'beside'"),
])
def test_placement_mistakes_are_located_errors(statement: str, message: str) -> None:
    model = tiny_t5()
    original = clone(model)
    with pytest.raises(SpecError, match=message):
        surgeon.apply(statement, model)
    assert_same_model(model, original)


def test_a_config_form_and_an_explicit_one_on_one_place_are_refused_and_change_nothing() -> None:
    model = tiny_llama()
    original = clone(model)
    surgeon.apply("inject adapter after *.mlp", model)  # fine alone: on the FFN block
    model = clone(original)
    with pytest.raises(surgeon.SurgeonError, match="targeted twice|already has"):
        surgeon.apply("inject adapter after *.mlp\ninject adapter config=parallel beside *.mlp", model)
    assert_same_model(model, original)


def test_beside_the_attention_reads_the_unnormalised_residual_stream() -> None:
    """Pre-norm (Llama): r is the layer's input x, before input_layernorm, so the stream after the
    attention sub-block is x + attention(norm(x)) + A(x), the attention output the base's."""
    model = tiny_llama()
    original = clone(model)
    surgeon.apply("inject adapter init=bert beside *.attn", model, seed=0)
    seen: dict[str, dict[str, torch.Tensor]] = {"patched": {}, "base": {}}
    for key, m in (("patched", model), ("base", original)):
        layer, kept = m.model.layers[0], seen[key]
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, kept=kept: kept.__setitem__("x", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, args, kept=kept: kept.__setitem__("stream", args[0]))
        with torch.no_grad():
            m(batch())
    patched, base = seen["patched"], seen["base"]
    with torch.no_grad():
        expected = base["stream"] + model.model.layers[0].self_attn.adapter(patched["x"])
    torch.testing.assert_close(patched["x"], base["x"])
    torch.testing.assert_close(patched["stream"], expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(patched["stream"], base["stream"])
