"""Named adapters (`... as NAME`) switched on and off with `job.activate`: the outputs equal a model
that has only the active ones (built apart, with the same weights), bit for bit; all off is the
base model; switching moves no tensor; revert is exact in every state."""

from __future__ import annotations

from itertools import combinations

import pytest
import torch
from conftest import assert_same_model, batch, clone, run, tiny_bert, tiny_llama
from safetensors.torch import save_file

import surgeon
from surgeon.errors import PlanError

STATEMENTS = {  # one per seam: weights, data path, attention
    "q": "inject lora r=4 into *.attn.q as q",
    "adapter": "inject adapter config=parallel init=bert as adapter",
    "prefix": "inject prefix tokens=3 into *.attn as prefix",
}


def randomised(job: surgeon.Job) -> dict[str, torch.Tensor]:
    """Every added tensor drawn at random (LoRA's B starts at zero), by name; the values set."""
    g = torch.Generator().manual_seed(7)
    values = {name: torch.randn(p.shape, generator=g) * 0.1 for name, p in job.added_tensors().items()}
    with torch.no_grad():
        for name, p in job.added_tensors().items():
            p.copy_(values[name])
    return values


def only(names: tuple[str, ...], values: dict[str, torch.Tensor], build) -> tuple[torch.nn.Module, set[str]]:
    """A fresh model with only these statements, holding the same weights; its trainable names."""
    model = build()
    if not names:
        return model, set()
    job = surgeon.apply("\n".join(STATEMENTS[n] for n in names), model, seed=0)
    with torch.no_grad():
        for name, p in job.added_tensors().items():
            p.copy_(values[name])
    return model, set(job.trainable_parameters())


SUBSETS = [s for k in range(len(STATEMENTS) + 1) for s in combinations(STATEMENTS, k)]


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_the_active_adapters_compute_what_a_model_with_only_them_computes(build) -> None:
    model = build()
    original = clone(model)
    ids = batch()
    job = surgeon.apply("\n".join(STATEMENTS.values()), model, seed=0)
    values = randomised(job)
    tensors = {name: p for name, p in job.added_tensors().items()}
    assert job.adapter_names() == list(STATEMENTS)
    for subset in SUBSETS:
        job.activate(list(subset))
        assert job.active_adapters() == list(subset)
        alone, trainable = only(subset, values, build)
        assert torch.equal(run(model, ids), run(alone, ids)), subset
        assert set(job.trainable_parameters()) == trainable, subset
    assert all(p is tensors[n] for n, p in job.added_tensors().items())  # nothing reallocated
    job.activate([])
    assert torch.equal(run(model, ids), run(original, ids))  # all off: the base, bit for bit
    job.activate(["q"])
    job.revert()  # exact from a partly active state
    assert_same_model(model, original)


def test_a_named_prompt_switches_too_and_unnamed_statements_always_act() -> None:
    model = tiny_llama()
    ids = batch()
    job = surgeon.apply("inject prompt tokens=3 into embed as p\ninject lora r=4 into *.attn.v", model, seed=0)
    values = randomised(job)
    with job.active([]):
        alone = tiny_llama()
        lora = surgeon.apply("inject lora r=4 into *.attn.v", alone, seed=0)
        with torch.no_grad():
            for name, p in lora.added_tensors().items():
                p.copy_(values[name])
        assert torch.equal(run(model, ids), run(alone, ids))  # the unnamed LoRA still acts
    assert job.active_adapters() == ["p"]  # back as it was after the block
    assert not torch.equal(run(model, ids), run(alone, ids))


def test_unknown_names_and_switches_that_cannot_be_are_refused_and_change_nothing() -> None:
    model = tiny_llama()
    ids = batch()
    job = surgeon.apply("inject lora r=4 into *.attn.q as a\ntrain bias add=true as b", model, seed=0)
    randomised(job)
    before = run(model, ids)
    with pytest.raises(surgeon.SurgeonError, match="no adapter named 'aa'.*did you mean 'a'"):
        job.activate("aa")
    with pytest.raises(surgeon.SurgeonError, match="adapter 'b' .*changes the base itself and cannot be switched off"):
        job.activate([])  # switching a off succeeds first, then b refuses: a is switched back on
    assert job.active_adapters() == ["a", "b"] and torch.equal(run(model, ids), before)
    with pytest.raises(surgeon.SurgeonError, match="an adapter name, a list of names, \\{name: weight\\} or None, not \\[1\\]"):
        job.activate([1])
    with pytest.raises(surgeon.SurgeonError, match="not 7"):
        job.activate(7)
    with pytest.raises(surgeon.SurgeonError, match="adapter 'b' \\('train bias' on .*\\): it cannot be weighted"):
        job.activate({"a": 0.5, "b": 0.5})  # a is weighted first, then b refuses: a's weight is put back
    for bad in ({"a": "half"}, {"a": float("nan")}):
        with pytest.raises(surgeon.SurgeonError, match="weights are \\{adapter name: finite number\\}"):
            job.activate(bad)
    assert job.active_adapters() == ["a", "b"] and torch.equal(run(model, ids), before)
    assert job.manifest.weights == {}


def test_merge_needs_every_adapter_on_and_revert_is_exact_after_it() -> None:
    model = tiny_llama()
    original = clone(model)
    ids = batch()
    job = surgeon.apply("inject lora r=4 into *.attn.q as a\ninject lora r=4 into *.attn.v as b", model, seed=0)
    randomised(job)
    job.activate("a")
    with pytest.raises(PlanError, match=r"adapters \['b'\] are switched off"):
        job.merge()
    job.activate(["a", "b"])
    unmerged = run(model, ids)
    job.merge()
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)


def test_an_inactive_adapter_stays_in_state_dicts_and_checkpoints_and_loads_inactive(tmp_path) -> None:
    """Trainer, accelerate and Lightning save what state_dict() holds: an adapter switched off is
    still in it; a run or checkpoint written then loads every adapter, the same ones switched off."""
    model = tiny_llama()
    job = surgeon.apply("inject lora r=4 into *.attn.q as a\ninject adapter init=bert as b", model, seed=0)
    randomised(job)
    everything = run(model, batch())
    job.activate("a")
    only_a = run(model, batch())
    held = {t.data_ptr() for t in model.state_dict().values()}  # what a checkpoint saves
    assert {p.data_ptr() for p in job.added_tensors().values()} <= held
    job.save(tmp_path / "run")
    model.save_pretrained(tmp_path / "checkpoint")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "state.safetensors"))
    for saved in ("run", "checkpoint", "state.safetensors"):
        fresh = tiny_llama()
        loaded = surgeon.load(tmp_path / saved, fresh)
        assert loaded.active_adapters() == ["a"], saved
        assert torch.equal(run(fresh, batch()), only_a), saved
        loaded.activate(["a", "b"])
        assert torch.equal(run(fresh, batch()), everything), saved


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("inactive", ["z"], r"switches off \['z'\], which are no adapters of its spec"),
    ("weights", {"z": 0.5}, r"weights \['z'\], which are no adapters of its spec"),
    ("weights", {"a": float("nan")}, "finite"),
    ("frozen", ["z"], r"freezes \['z'\], which are no adapters of its spec"),
])
def test_a_run_whose_adapter_state_names_what_its_spec_lacks_is_refused(tmp_path, field: str, value,
                                                                         expected: str) -> None:
    import hashlib
    import json

    model = tiny_llama()
    job = surgeon.apply("inject lora r=4 into *.attn.q as a", model, seed=0)
    job.save(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    manifest[field] = value
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    manifest["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    fresh = tiny_llama()
    original = clone(fresh)
    with pytest.raises(surgeon.SurgeonError, match=expected):
        surgeon.load(tmp_path / "run", fresh)
    assert_same_model(fresh, original)
