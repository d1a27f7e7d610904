"""`job.combine({...}, combination=...)` against PEFT's `add_weighted_adapter` on the same LoRA
weights, for every combination type PEFT has: the new adapter's tensors and the model's logits
with it active. DARE's random masks: both libraries draw from one generator seeded alike (PEFT
draws from torch's global RNG, after initialising the new adapter; the test hands its draws the
same stream as surgeon's `seed`)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_same_model, batch, clone, run, tiny_gpt2, tiny_llama
from peft_twin import named_lora_twin

import surgeon
from surgeon.combine import COMBINATIONS

LLAMA = {"a": "inject lora r=4 alpha=8 into *.attn.<q,v> as a",
         "b": "inject lora r=4 alpha=2 into *.attn.<q,k> as b"}
LLAMA_TARGETS = {"a": ["q_proj", "v_proj"], "b": ["q_proj", "k_proj"]}


def randomised(job: surgeon.Job, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in job.added_tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_combined(twin: torch.nn.Module, weights: dict[str, float], name: str, kind: str, seed: int,
                  **options) -> None:
    """add_weighted_adapter with its DARE draws from a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    bernoulli = torch.bernoulli
    try:
        torch.bernoulli = lambda p, *args, **kwargs: bernoulli(p, generator=generator)
        twin.add_weighted_adapter(list(weights), list(weights.values()), name, combination_type=kind, **options)
    finally:
        torch.bernoulli = bernoulli
    twin.set_adapter(name)


def llama_pair(ranks: tuple[int, int] = (4, 4)) -> tuple[torch.nn.Module, surgeon.Job, torch.nn.Module]:
    model = tiny_llama()
    reference = clone(model)
    spec = "\n".join(s.replace("r=4", f"r={r}") for s, r in zip(LLAMA.values(), ranks))
    job = surgeon.apply(spec, model, seed=0)
    randomised(job)
    configs = {name: peft.LoraConfig(r=r, lora_alpha=int(s.split("alpha=")[1].split()[0]), target_modules=LLAMA_TARGETS[name])
               for (name, s), r in zip(LLAMA.items(), ranks)}
    return model, job, named_lora_twin(reference, job, configs)


def assert_same_adapter(job: surgeon.Job, twin: torch.nn.Module, name: str, atol: float) -> None:
    ours = {k: v for k, v in job.added_tensors().items() if f"[{name}]" in k}
    theirs = {}
    for key, param in twin.named_parameters():
        if f".{name}." in key and ".lora_" in key:
            path, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
            theirs[f"{path}[{name}].lora_{rest.split('.')[0]}"] = param
    assert set(ours) == set(theirs) and ours
    for key in ours:
        assert (ours[key] - theirs[key]).abs().max() <= atol, key


@pytest.mark.parametrize("kind", COMBINATIONS)
def test_every_combination_equals_peft_add_weighted_adapter(kind: str) -> None:
    model, job, twin = llama_pair()
    ids = batch()
    weights = {"a": 0.7, "b": -0.3}
    name = job.combine(weights, kind, name="ab", density=0.5, seed=11)
    peft_combined(twin, weights, "ab", kind, seed=11, density=0.5)
    if not kind.endswith("svd"):  # an SVD's factors are only defined up to the signs of its vectors
        assert_same_adapter(job, twin, "ab", atol=1e-6)
    with job.active(name):
        ours = run(model, ids)
    with torch.no_grad():
        theirs = twin(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5
    with job.active(["a", "b"]):
        assert not torch.allclose(run(model, ids), ours, atol=1e-4)  # the combination is not the two stacked


@pytest.mark.parametrize(("kind", "options"), [
    ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3}), ("svd", {"svd_clamp": 0.9}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("dare_ties_svd", {"density": 0.7, "svd_rank": 2, "majority_sign_method": "frequency"}),
])
def test_options_and_adapters_of_different_ranks_equal_peft(kind: str, options: dict) -> None:
    model, job, twin = llama_pair((4, 8) if kind in ("cat", "svd", "dare_ties_svd") else (4, 4))
    ids = batch()
    weights = {"a": 1.5, "b": 0.5}
    job.combine(weights, kind, name="mix", seed=3, **options)
    peft_combined(twin, weights, "mix", kind, seed=3, **options)
    with job.active("mix"):
        ours = run(model, ids)
    with torch.no_grad():
        assert (ours - twin(input_ids=ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_combinations_on_gpt2_fused_conv1d_equal_peft(kind: str) -> None:
    model = tiny_gpt2()
    reference = clone(model)
    job = surgeon.apply("inject lora r=4 into *.attn.qkv as a\ninject lora r=4 alpha=8 into *.attn.qkv as b", model)
    randomised(job)
    configs = {"a": peft.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
               "b": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)}
    twin = named_lora_twin(reference, job, configs)
    ids = batch()
    job.combine({"a": 0.5, "b": 0.5}, kind, name="ab")
    peft_combined(twin, {"a": 0.5, "b": 0.5}, "ab", kind, seed=0)
    with job.active("ab"):
        ours = run(model, ids)
    with torch.no_grad():
        assert (ours - twin(input_ids=ids).logits).abs().max() <= 1e-5


def test_a_combined_adapter_saves_loads_merges_and_reverts_exactly(tmp_path) -> None:
    model, job, _ = llama_pair()
    original = copy.deepcopy(tiny_llama())
    ids = batch()
    name = job.combine({"a": 0.5, "b": 0.5}, "cat")
    assert name == "a_b" and job.active_adapters() == ["a", "b"]  # added switched off, as PEFT adds it
    job.activate(name)
    combined = run(model, ids)
    job.save(tmp_path / "run")
    fresh = tiny_llama()
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert loaded.adapter_names() == ["a", "b", "a_b"] and loaded.active_adapters() == ["a_b"]
    assert torch.equal(run(fresh, ids), combined)
    loaded.activate(loaded.adapter_names())
    loaded.merge()
    loaded.revert()
    assert_same_model(fresh, original)
    job.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize(("spec", "call", "expected"), [
    ("\n".join(LLAMA.values()), lambda job: job.combine({"a": 1, "c": 1}), "no adapter named 'c'"),
    ("\n".join(LLAMA.values()), lambda job: job.combine({"a": 1, "b": 1}, name="a"), "already in this job"),
    ("\n".join(LLAMA.values()), lambda job: job.combine({"a": 1, "b": 1}, "avg"), "unknown combination 'avg'"),
    ("\n".join(LLAMA.values()), lambda job: job.combine({"a": 1, "b": 1}, name="a b"), "cannot name an adapter"),
    ("\n".join(LLAMA.values()), lambda job: job.combine({"a": 1, "b": 1}, "ties"), "needs density"),
    ("\n".join(LLAMA.values()), lambda job: job.combine(["a", "b"]), r"combine takes \{adapter name: weight"),
    ("inject lora r=4 into *.attn.q as a\ninject lora r=8 into *.attn.q as b",
     lambda job: job.combine({"a": 1, "b": 1}, "linear"), "need one rank; theirs are \\[4, 8\\]: use 'cat'"),
    ("inject lora into *.attn.q as a\ninject loha into *.attn.q as b",
     lambda job: job.combine({"a": 1, "b": 1}, "cat"), "adapter 'b' has 'inject loha'"),
    ("inject lora into *.attn.q as a\ninject dora into *.attn.v as b",
     lambda job: job.combine({"a": 1, "b": 1}), "adapter 'b' has 'inject dora'"),
])
def test_a_combination_that_does_not_apply_is_refused_and_changes_nothing(spec: str, call, expected: str) -> None:
    model = tiny_llama()
    job = surgeon.apply(spec, model, seed=0)
    randomised(job)
    ids = batch()
    before, text, tensors = run(model, ids), job.manifest.spec_text, dict(job.added_tensors())
    with pytest.raises(surgeon.SurgeonError, match=expected):
        call(job)
    assert torch.equal(run(model, ids), before) and job.manifest.spec_text == text
    assert job.added_tensors() == tensors


def test_weighted_activation_averages_the_layer_outputs_as_peft_cat_combines_them(tmp_path) -> None:
    """activate({a: 0.3, b: 0.7}): each adapted layer puts out 0.3 y_a + 0.7 y_b (checked on q by
    hand), the model what PEFT's exact `cat` combination with those weights gives; it saves, loads,
    and a plain activate afterwards is the unweighted model bit for bit."""
    model, job, twin = llama_pair()
    ids = batch()
    plain = run(model, ids)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        with job.active("a"):
            y_a = q(x)
        with job.active("b"):
            y_b = q(x)
        job.activate({"a": 0.3, "b": 0.7})
        assert (q(x) - (0.3 * y_a + 0.7 * y_b)).abs().max() <= 1e-6
    weighted = run(model, ids)
    peft_combined(twin, {"a": 0.3, "b": 0.7}, "ab", "cat", seed=0)
    with torch.no_grad():
        assert (weighted - twin(input_ids=ids).logits).abs().max() <= 1e-5
    with job.active("b"):
        assert job.manifest.weights == {}
    assert torch.equal(run(model, ids), weighted) and job.manifest.weights == {"a": 0.3, "b": 0.7}
    job.save(tmp_path / "run")
    fresh = tiny_llama()
    assert surgeon.load(tmp_path / "run", fresh).manifest.weights == {"a": 0.3, "b": 0.7}
    assert torch.equal(run(fresh, ids), weighted)
    job.activate(["a", "b"])
    assert torch.equal(run(model, ids), plain)


@pytest.mark.parametrize(("spec", "expected"), [
    ("inject lora into *.attn.q as a\ninject adapter as b", "adapter 'b' \\('inject adapter' on .*cannot be weighted"),
    ("inject lora into *.attn.q as a\ninject dora into *.attn.v as b", "adapter 'b' \\('inject dora'.*cannot be weighted"),
])
def test_weights_on_what_is_no_weight_delta_are_refused_and_change_nothing(spec: str, expected: str) -> None:
    model = tiny_llama()
    job = surgeon.apply(spec, model, seed=0)
    randomised(job)
    ids = batch()
    before = run(model, ids)
    with pytest.raises(surgeon.SurgeonError, match=expected):
        job.activate({"a": 0.5, "b": 0.5})
    assert torch.equal(run(model, ids), before) and job.manifest.weights == {} and job.active_adapters() == ["a", "b"]


@pytest.mark.parametrize("kind", ["linear", "cat", "svd", "dare_ties"])
def test_combinations_of_embedding_loras_equal_peft(kind: str) -> None:
    model = tiny_llama()
    reference = clone(model)
    job = surgeon.apply("inject lora r=4 into embed as a\ninject lora r=4 alpha=8 into embed as b", model, seed=0)
    randomised(job)
    twin = named_lora_twin(reference, job, {"a": peft.LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens"]),
                                            "b": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"])})
    job.combine({"a": 0.6, "b": 0.4}, kind, name="ab", density=0.5, seed=1)
    peft_combined(twin, {"a": 0.6, "b": 0.4}, "ab", kind, seed=1, density=0.5)
    with job.active("ab"):
        ours = run(model, batch())
    with torch.no_grad():
        assert (ours - twin(input_ids=batch()).logits).abs().max() <= 1e-5
