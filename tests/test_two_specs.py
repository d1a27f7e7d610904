"""Two specs on one model: the second sees the original module paths through the first one's
wrappers, stacks where its method does, is refused with the reason where not, and both revert
in reverse order to the original, bit for bit (compared with an independent deep copy)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_model, batch, clone, run, tiny_gpt2, tiny_llama, train_losses
from torch import nn

import surgeon
from surgeon.errors import RevertError, SpecError
from surgeon.graph import build_module_graph
from surgeon.methods.weights.quantize import QuantizedLinear

Q_V = "inject lora r=4 into *.attn.<q,v>"


def layer_names(model: nn.Module, template: str) -> set[str]:
    """`template` filled in for every decoder layer index, from the model's own config."""
    return {template.format(i=i) for i in range(model.config.num_hidden_layers)}


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]], dict[str, bool]]:
    """Tensors (copied), module classes and requires_grad flags of a model that may be patched
    (a deep copy of a patched model would copy its hooks' closures too)."""
    return ({n: t.detach().clone() for n, t in model.state_dict().items()},
            [(p, type(m)) for p, m in model.named_modules(remove_duplicate=False)],
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    tensors, classes, flags = snapshot(model)
    assert list(tensors) == list(before[0])
    assert all(torch.equal(tensors[n], before[0][n]) for n in tensors)
    assert classes == before[1] and flags == before[2]


def test_lora_on_other_projections_stacks_trains_and_reverts_in_order() -> None:
    model = tiny_llama()
    original = clone(model)
    first = surgeon.apply(Q_V, model, seed=0)
    second = surgeon.apply("inject lora r=4 into *.attn.<k,o>", model, seed=1)
    expected = set().union(*(layer_names(model, f"model.layers.{{i}}.self_attn.{p}_proj.lora_{m}")
                             for p in "ko" for m in "AB"))
    assert set(second.trainable_parameters()) == expected
    attn = model.model.layers[0].self_attn
    assert type(attn.k_proj.base) is nn.Linear and type(attn.q_proj.base) is nn.Linear  # no wrapper in a wrapper
    # job 2's fingerprint is of the model job 1 left: its tensors (q_proj.base.weight, lora_A) by name
    assert {"model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.base.weight"} <= \
        set(second.manifest.fingerprint)
    first_weights = {n: p.detach().clone() for n, p in first.trainable_parameters().items()}
    losses = train_losses(model, second.trainable_parameters().values(), steps=4)
    assert losses[-1] < losses[0]
    assert attn.o_proj.lora_B.abs().sum() > 0
    # while job 2 is live, only job 2 trains: job 1's tensors are frozen and unchanged
    assert all(torch.equal(p, first_weights[n]) for n, p in first.trainable_parameters().items())
    with pytest.raises(RevertError, match=r"patched again after this job \(by 'inject lora r=4 into "
                                          r"\*\.attn\.<k,o>'\); revert that job first"):
        first.revert()
    second.revert()
    assert all(p.requires_grad for p in first.trainable_parameters().values())  # job 1 trains again
    first.revert()
    assert_same_model(model, original)


def test_bias_training_stacks_on_a_lora_model() -> None:
    model = tiny_gpt2()
    original = clone(model)
    first = surgeon.apply(Q_V, model, seed=0)
    second = surgeon.apply("train bias", model)
    fused = model.transformer.h[0].attn.c_attn
    trained = second.trainable_parameters()
    # the bias trained is the original Conv1D's, inside the LoRA wrapper, named by the original path
    assert trained["transformer.h.0.attn.c_attn.bias"] is fused.base.bias
    assert not any(".base." in name or "lora" in name for name in trained)
    expected = {n for n, _ in original.named_parameters() if n.endswith(".bias")}
    assert set(trained) == expected
    train_losses(model, trained.values(), steps=3)
    assert not torch.equal(fused.base.bias, original.transformer.h[0].attn.c_attn.bias)
    second.revert()
    assert torch.equal(fused.base.bias, original.transformer.h[0].attn.c_attn.bias)
    first.revert()
    assert_same_model(model, original)


def test_prompt_stacks_on_a_lora_model() -> None:
    model = tiny_llama()
    original = clone(model)
    ids = batch()
    first = surgeon.apply(Q_V, model, seed=0)
    second = surgeon.apply("inject prompt tokens=4 into embed", model, seed=0)
    assert set(second.trainable_parameters()) == {"model.embed_tokens.prompt_embeddings"}
    assert run(model, ids).shape[1] == ids.shape[1] + 4  # the virtual tokens are in front
    losses = train_losses(model, second.trainable_parameters().values(), steps=3)
    assert losses[-1] < losses[0]
    second.revert()
    first.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_qlora_in_two_specs(build) -> None:
    """`quantize base` first, LoRA later: LoRA sees the quantized layers as the Linear/Conv1D
    they stand for, wraps them, and starts from the quantized model's outputs."""
    model = build()
    original = clone(model)
    ids = batch()
    first = surgeon.apply("quantize base nf4", model)
    quantized_out = run(model, ids)
    second = surgeon.apply(Q_V, model, seed=0)
    assert torch.equal(run(model, ids), quantized_out)  # B = 0
    wrappers = [m for m in model.modules() if hasattr(m, "lora_B") or hasattr(m, "lora_B_q")]
    assert wrappers and all(isinstance(m.base, QuantizedLinear) for m in wrappers)
    train_losses(model, second.trainable_parameters().values(), steps=2)
    assert not torch.equal(run(model, ids), quantized_out)
    second.revert()
    assert torch.equal(run(model, ids), quantized_out)
    first.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize("first", [Q_V, "quantize base nf4", "inject ptuning tokens=3 into embed"])
def test_the_graph_of_a_patched_model_is_the_originals(first: str) -> None:
    """Paths, roles, kinds and weight shapes through the wrappers are those of the unpatched model;
    `q_proj.base` and what a patch added (LoRA's dropout, a prompt encoder) are no targets."""
    model = tiny_llama()
    before = build_module_graph(clone(model))
    job = surgeon.apply(first, model)
    after = build_module_graph(model)
    assert list(after.modules) == list(before.modules)
    for path, info in before.modules.items():
        now = after.modules[path]
        assert (now.kind, now.role_paths, now.in_features, now.out_features) == \
               (info.kind, info.role_paths, info.in_features, info.out_features), path
        assert now.params["weight"].shape == info.params["weight"].shape if "weight" in info.params else True
    job.revert()


def test_wrapper_internals_match_no_pattern() -> None:
    model = tiny_llama()
    job = surgeon.apply(Q_V, model)
    for pattern in ("**.q_proj.base", "**.q_proj.lora_A", "**.q_proj.dropout"):
        with pytest.raises(SpecError, match="matches no module"):
            surgeon.check(f"inject lora into {pattern}", model)
    job.revert()


REFUSED = [
    (Q_V, "inject lora r=2 into *.attn.q",
     ["model.layers.0.self_attn.q_proj is already patched by a live job ('inject lora r=4 into *.attn.<q,v>'); ",
      "neither is named: give the new statement a name of its own ('as NAME') to keep both side by side"]),
    (Q_V, "inject dora r=2 into *.attn.v", ["v_proj is already patched by a live job", "'inject dora' does not "
                                            "stack on 'inject lora'"]),
    (Q_V, "quantize base nf4", ["q_proj is already patched by a live job ('inject lora r=4 into *.attn.<q,v>'); "
                                "'quantize' goes under 'inject lora', so it must be applied first"]),
    ("quantize base nf4", "inject relora r=2 restart_every=10 into *.attn.k",
     ["k_proj is already patched by a live job ('quantize base nf4'); 'inject relora' cannot stack on "
      "'quantize': a restart merges B A"]),
    ("quantize base nf4", "quantize *.mlp.up nf4", ["up_proj is already patched by a live job ('quantize base "
                                                    "nf4'); 'quantize' already acts on it"]),
    ("inject prompt tokens=3 into embed", "inject prefix tokens=2 into *.attn",
     ["'inject prefix' and the live job's 'inject prompt tokens=3 into embed' both change the model's inputs",
      "they cannot compose"]),
    ("inject prefix tokens=2 into *.attn", "inject ptuning tokens=2 into embed",
     ["'inject ptuning' and the live job's 'inject prefix tokens=2 into *.attn' both change the model's inputs"]),
]


@pytest.mark.parametrize(("first", "second", "expected"), REFUSED, ids=[f"{a[:12]}|{b[:14]}" for a, b, _ in REFUSED])
def test_a_second_spec_that_cannot_stack_is_refused_at_planning(first: str, second: str, expected: list[str]) -> None:
    model = tiny_llama()
    original = clone(model)
    job = surgeon.apply(first, model)
    before = snapshot(model)
    for call in (surgeon.check, surgeon.apply):
        with pytest.raises(SpecError) as err:
            call(second, model)
        text = str(err.value)
        assert text.startswith("<spec>:1:1: error: ")
        for words in expected:
            assert words in text, text
    assert_unchanged(model, before)
    job.revert()  # the refused spec left no job behind: this one is the last
    assert_same_model(model, original)
