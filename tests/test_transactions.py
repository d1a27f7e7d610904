"""Surgery is transactional: an interrupt (or any BaseException) at any point of apply, merge, fold
or revert leaves the model exactly as before that call; a revert that cannot finish changes nothing."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import assert_same_model, batch, clone, run, tiny_gpt2, tiny_llama
from torch import nn

import surgeon
import surgeon.surgery
from surgeon.errors import RevertError

SPECS = {
    "qlora+bitfit": ("llama", "quantize base nf4 double compute=fp32\ninject lora r=4 alpha=8 into *.attn.<q,v>\n"
                              "train bias in *.attn.q add=true"),
    "dora+ia3": ("llama", "inject dora r=2 into *.attn.q\ninject ia3 into *.mlp.down"),
    "adalora": ("llama", "inject adalora init_r=4 target_r=2 total_steps=10 into *.attn.<q,v>"),
    "prefix": ("llama", "inject prefix tokens=3 projection=16 into *.attn"),
    "prompt": ("gpt2", "inject ptuning tokens=3 encoder=mlp hidden=16 into embed"),
    "gpt2-slices": ("gpt2", "inject lora r=2 into *.attn.<q,v>\ntrain bias in *.attn.*"),
}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def identities(model: nn.Module) -> dict[str, int]:
    """Which object stands at each name: a restored model holds the very same objects."""
    found = {f"m:{path}": id(m) for path, m in model.named_modules(remove_duplicate=False)}
    found.update({f"t:{name}": id(t) for name, t in model.state_dict(keep_vars=True).items()})
    return found


def config_state(model: nn.Module) -> dict:
    config = model.config
    return {"dict": config.to_dict(), "attn": config.__dict__.get("_attn_implementation_internal")}


class Interrupt(KeyboardInterrupt):
    pass


def interrupting(function, after: bool):
    """`function`, but raising an interrupt before (or right after) it does its work."""
    def run_then_raise(*args, **kwargs):
        if after:
            function(*args, **kwargs)
        raise Interrupt()
    return run_then_raise


def count_apply_calls(spec: str, model: nn.Module) -> int:
    return len(surgeon.check(spec, model).rewrites)


@pytest.mark.parametrize("name", list(SPECS))
def test_apply_interrupted_at_every_patch_leaves_the_model_as_it_was(name, monkeypatch):
    arch, spec = SPECS[name]
    model = BUILD[arch]()
    original = clone(model)
    ids, config = identities(model), config_state(model)
    real_method_of = surgeon.surgery.method_of
    for index, after in itertools.product(range(count_apply_calls(spec, model)), (False, True)):
        calls = itertools.count()

        def method_of(rewrite, index=index, after=after, calls=calls):
            method = real_method_of(rewrite)

            def apply(model, target, params, ctx):
                if next(calls) == index:
                    return interrupting(method.apply, after)(model, target, params, ctx)
                return method.apply(model, target, params, ctx)
            return type(method.__name__, (method,), {"apply": staticmethod(apply)})

        monkeypatch.setattr(surgeon.surgery, "method_of", method_of)
        with pytest.raises(Interrupt):
            surgeon.apply(spec, model, seed=0)
        assert_same_model(model, original)
        assert identities(model) == ids and config_state(model) == config, (index, after)
    monkeypatch.setattr(surgeon.surgery, "method_of", real_method_of)
    job = surgeon.apply(spec, model, seed=0)  # and the model still takes the spec afterwards
    job.revert()
    assert_same_model(model, original)


def _patched(name: str):
    arch, spec = SPECS[name]
    model = BUILD[arch]()
    original = clone(model)
    job = surgeon.apply(spec, model, seed=0)
    with torch.no_grad():  # non-zero deltas, so a half-done merge would show in the outputs
        for param in job.trainable_parameters().values():
            param.add_(0.01)
    return model, original, job


STEPS = [(name, "revert") for name in SPECS] + \
    [(name, "merge") for name in ("qlora+bitfit", "dora+ia3", "adalora", "gpt2-slices")] + [("prefix", "fold")]


@pytest.mark.parametrize(("name", "step"), STEPS)
def test_revert_merge_fold_interrupted_at_every_patch_leave_the_model_as_it_was(name, step):
    model, original, job = _patched(name)
    patches = [patch for _, patch in job._surgery.patches]
    ids_ = batch()
    patched = clone(model)
    expected_out = run(model, ids_)
    ids, manifest = identities(model), job.manifest
    for index, after in itertools.product(range(len(patches)), (False, True)):
        patch = patches[index]
        setattr(patch, step, interrupting(getattr(patch, step), after))
        with pytest.raises(Interrupt):
            getattr(job, step)()
        delattr(patch, step)
        assert identities(model) == ids, (index, after)
        assert_same_model(model, patched)
        assert torch.equal(run(model, ids_), expected_out)
        assert job.manifest is manifest
    getattr(job, step)()
    job.revert() if step != "revert" else None
    assert_same_model(model, original)


@pytest.mark.parametrize(("name", "dtype"), [("qlora+bitfit", torch.bfloat16), ("dora+ia3", torch.float64)])
def test_revert_after_a_cast_says_so_and_changes_nothing(name, dtype):
    model, original, job = _patched(name)
    model.to(dtype)
    patched, ids = clone(model), identities(model)
    cast = str(dtype).removeprefix("torch.")
    with pytest.raises(RevertError, match=rf"is {cast}, the original was float32: the model was cast after apply"):
        job.revert()
    assert identities(model) == ids
    assert_same_model(model, patched)
    if dtype == torch.float64:  # a lossless cast back: the job is still live and now reverts exactly
        model.to(torch.float32)
        job.revert()
        assert_same_model(model, original)


def test_revert_on_the_meta_device_is_refused():
    model, original, job = _patched("dora+ia3")
    model.to("meta")
    with pytest.raises(RevertError, match="meta device"):
        job.revert()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert type(model.model.layers[0].self_attn.q_proj).__module__.startswith("surgeon")


def test_snapshot_restores_swapped_tensors_and_flags():
    from surgeon.transaction import Snapshot

    layer = nn.Linear(4, 4)
    weight, before = layer.weight, layer.weight.detach().clone()
    snapshot = Snapshot(layer)
    torch.utils.swap_tensors(weight, nn.Parameter(torch.zeros(2, 2)))
    weight.requires_grad_(False)
    layer.extra = nn.Linear(1, 1)
    snapshot.restore()
    assert layer.weight is weight and torch.equal(weight, before) and weight.requires_grad
    assert not hasattr(layer, "extra") and copy.deepcopy(layer)(torch.ones(4)).shape == (4,)


def test_jobs_on_one_model_revert_in_reverse_order():
    model = tiny_llama()
    original = clone(model)
    first = surgeon.apply("train bias add=true in *.attn.q", model)
    second = surgeon.apply("train bias in *.attn.q", model)
    patched = clone(model)
    with pytest.raises(RevertError, match=r"patched again after this job \(by 'train bias in \*.attn.q'\)"):
        first.revert()
    assert_same_model(model, patched)
    second.revert()
    first.revert()
    assert_same_model(model, original)


def test_quantize_base_never_takes_the_head_even_when_nothing_else_is_left():
    model = tiny_llama()
    surgeon.apply("quantize base nf4", model)
    with pytest.raises(surgeon.SurgeonError, match="nothing is left for quantize: .* all 'head', which it leaves out"):
        surgeon.apply("quantize base nf4", model)
    assert type(model.lm_head) is nn.Linear
