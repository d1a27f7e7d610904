"""Several named adapters on the same modules (`inject lora ... into *.attn.<q,v> as sentiment` and
`... as nli`): each, switched on alone, computes what a model with only it computes (built apart,
with the same weights), bit for bit; all of them on stack in spec order, as a hand-computed sum of
their deltas says; save, load, merge and revert are exact in every state."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_merge_keeps_outputs_and_reverts, assert_same_model, batch, clone, run, tiny_bert, tiny_gpt2, tiny_llama

import surgeon
from surgeon.errors import SpecError

SIDE_BY_SIDE = {  # name -> statement; all on the same modules
    "llama-lora": (tiny_llama, {"sentiment": "inject lora r=4 into *.attn.<q,v> as sentiment",
                                "nli": "inject lora r=8 alpha=4 into *.attn.<q,v> as nli"}),
    "gpt2-lora-slices": (tiny_gpt2, {"a": "inject lora r=2 into *.attn.<q,v> as a",
                                     "b": "inject lora r=4 into *.attn.<q,v> as b"}),
    "llama-loha-lokr-lora": (tiny_llama, {"x": "inject loha r=2 into *.attn.q as x",
                                          "y": "inject lokr r=2 into *.attn.q as y",
                                          "z": "inject lora r=2 into *.attn.q as z"}),
    "bert-adapters": (tiny_bert, {"a": "inject adapter config=pfeiffer init=bert as a",
                                  "b": "inject adapter config=parallel init=bert as b",
                                  "c": "inject adapter after *.attn init=bert as c"}),
}


def randomised(job: surgeon.Job, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = {name: torch.randn(p.shape, generator=g) * 0.1 for name, p in job.added_tensors().items()}
    with torch.no_grad():
        for name, p in job.added_tensors().items():
            p.copy_(values[name])
    return values


def alone(build, statement: str, values: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh model with only this statement, holding the same weights."""
    model = build()
    job = surgeon.apply(statement, model)
    with torch.no_grad():
        for name, p in job.added_tensors().items():
            p.copy_(values[name])
    return model


@pytest.mark.parametrize("case", list(SIDE_BY_SIDE))
def test_each_adapter_alone_is_a_model_with_only_it_bit_for_bit(case: str) -> None:
    build, statements = SIDE_BY_SIDE[case]
    model = build()
    original = clone(model)
    ids = batch()
    job = surgeon.apply("\n".join(statements.values()), model, seed=0)
    values = randomised(job)
    tensors = dict(job.added_tensors())
    assert len(tensors) == sum(len(r.added) for r in job.plan.rewrites)  # no adapter's tensors hide another's
    for name, statement in statements.items():
        job.activate(name)
        assert torch.equal(run(model, ids), run(alone(build, statement, values), ids)), name
        assert set(job.trainable_parameters()) == {k for k in tensors if f"[{name}]" in k}
    job.activate(None)
    assert torch.equal(run(model, ids), run(original, ids))
    assert all(p is tensors[n] for n, p in job.added_tensors().items())  # switching moved nothing
    job.activate(list(statements))
    job.revert()
    assert_same_model(model, original)


def test_lora_adapters_on_one_module_stack_as_the_sum_of_their_deltas() -> None:
    """Both on: q's output is W x + s_a B_a A_a x + s_b B_b A_b x, computed by hand from the tensors."""
    model = tiny_llama()
    job = surgeon.apply("inject lora r=4 into *.attn.q as a\ninject lora r=2 alpha=8 into *.attn.q as b", model, seed=0)
    values = randomised(job)
    q = model.model.layers[0].self_attn.q_proj
    weight = model.model.layers[0].self_attn.q_proj.base.base.weight
    x = torch.randn(3, weight.shape[1])
    key = "model.layers.0.self_attn.q_proj[{}].lora_{}"
    expected = x @ weight.T + 1.0 * x @ values[key.format("a", "A")].T @ values[key.format("a", "B")].T \
        + 4.0 * x @ values[key.format("b", "A")].T @ values[key.format("b", "B")].T
    with torch.no_grad():
        assert torch.allclose(q(x), expected, atol=1e-6)
    job.revert()


def test_merge_with_every_adapter_on_keeps_the_outputs_and_reverts_exactly() -> None:
    model = tiny_llama()
    original = clone(model)
    ids = batch()
    job = surgeon.apply("inject lora r=4 into *.attn.<q,v> as a\ninject lora r=8 into *.attn.<q,v> as b", model, seed=0)
    randomised(job)
    assert_merge_keeps_outputs_and_reverts(model, original, job, ids)


def test_a_run_of_adapters_side_by_side_saves_and_loads_with_which_are_on(tmp_path) -> None:
    model = tiny_llama()
    ids = batch()
    spec = "inject lora r=4 into *.attn.<q,v> as a\ninject lora r=8 into *.attn.<q,v> as b"
    job = surgeon.apply(spec, model, seed=0)
    randomised(job)
    job.activate("b")
    only_b = run(model, ids)
    job.save(tmp_path / "run")
    fresh = tiny_llama()
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert loaded.active_adapters() == ["b"]
    assert torch.equal(run(fresh, ids), only_b)
    loaded.activate(["a", "b"])
    job.activate(["a", "b"])
    assert torch.equal(run(fresh, ids), run(model, ids))


def test_a_second_job_puts_a_named_adapter_beside_a_live_one() -> None:
    model = tiny_llama()
    original = clone(model)
    ids = batch()
    first = surgeon.apply("inject lora r=4 into *.attn.q as a", model, seed=0)
    randomised(first, seed=1)
    with_a = run(model, ids)
    second = surgeon.apply("inject lora r=4 into *.attn.q as b", model, seed=0)
    randomised(second, seed=2)
    assert not torch.equal(run(model, ids), with_a)
    second.activate(None)
    assert torch.equal(run(model, ids), with_a)
    second.revert()
    first.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize(("spec", "expected"), [
    ("inject lora into *.attn.q as a\ninject lora r=2 into *.attn.q as a",
     ["is targeted twice", "both are named 'a'"]),
    ("inject lora into *.attn.q\ninject lora r=2 into *.attn.q", ["is targeted twice", "name them"]),
    ("inject dora into *.attn.q as a\ninject dora r=2 into *.attn.q as b", ["is targeted twice", "one rewrite per module"]),
    ("inject lora into *.attn.q as a\ninject ia3 into *.attn.q as b", ["is targeted twice"]),
])
def test_what_cannot_share_a_module_is_refused_before_any_change(spec: str, expected: list[str]) -> None:
    model = tiny_llama()
    original = clone(model)
    with pytest.raises(SpecError) as err:
        surgeon.apply(spec, model)
    for words in expected:
        assert words in str(err.value)
    assert_same_model(model, original)


def test_two_named_loras_on_a_quantized_layer_merge_and_revert_exactly() -> None:
    """The inner LoRA folds into the dequantized layer, the outer one into what that gave; revert
    puts each tensor back into the module it came from."""
    model = tiny_llama()
    original = clone(model)
    single = tiny_llama()
    spec = "quantize base nf4\ninject lora r=4 into *.attn.q as a\ninject lora r=4 into *.attn.q as b"
    job = surgeon.apply(spec, model, seed=0)
    values = randomised(job)
    alone = surgeon.apply("quantize base nf4\ninject lora r=4 into *.attn.q as a", single, seed=0)
    with torch.no_grad():
        for name, p in alone.added_tensors().items():
            p.copy_(values[name])
    ids = batch()
    with job.active("a"):
        assert torch.equal(run(model, ids), run(single, ids))
    job.merge()
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in model.modules())
    job.revert()
    assert_same_model(model, original)
