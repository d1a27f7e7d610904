"""`with job.disabled():` computes the original model's outputs bit for bit, for every method,
without reverting; on leaving, the patched model is back exactly (`job.summary()` beside it)."""

from __future__ import annotations

import pytest
import torch

import surgeon
from tests.conftest import batch, clone, run, tiny_llama

SPECS = {
    "lora": "inject lora r=4 alpha=8 into *.attn.<q,v>",
    "dora": "inject dora r=4 alpha=8 into *.attn.<q,v>",
    "ia3": "inject ia3 into *.attn.<k,v>\ninject ia3 into *.mlp.down",
    "loha": "inject loha r=4 alpha=8 into *.attn.<q,v>",
    "lokr": "inject lokr r=4 alpha=8 into *.mlp.<up,down>",
    "adalora": "inject adalora init_r=4 target_r=2 tinit=1 tfinal=1 total_steps=6 into *.attn.<q,v>",
    "relora": "inject relora r=2 restart_every=1 into *.attn.q\ntrain bias add=true only=q",
    "bitfit": "inject lora r=2 into *.attn.v\ntrain bias add=true",
    "weights": "inject lora r=2 into *.attn.v\ntrain weights in <embed,norm>",
    "prefix": "inject prefix tokens=3 projection=16 into *.attn",
    "prompt": "inject prompt tokens=4 into embed",
    "ptuning": "inject ptuning tokens=4 encoder=mlp hidden=32 into embed",
}


def perturb(job: surgeon.Job) -> None:
    """Move every trained tensor off its initial value (LoRA's B starts at zero: a no-op adapter)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))


@pytest.mark.parametrize("name", SPECS)
def test_disabled_gives_the_original_outputs_and_comes_back(name: str) -> None:
    model = tiny_llama()
    ids = batch()
    original = run(clone(model), ids)
    job = surgeon.apply(SPECS[name], model, seed=0)
    if name == "relora":  # a restart folds B A into the base: disabled must see the original base
        optimizer = job.optimizer(lr=1e-2)
        perturb(job)
        job.step(1, optimizer)
    perturb(job)
    patched = run(model, ids)
    assert not torch.equal(patched, original)
    with torch.no_grad(), job.disabled():
        assert torch.equal(run(model, ids), original)
    assert torch.equal(run(model, ids), patched)


def test_disabled_after_merge_gives_the_original_outputs() -> None:
    model = tiny_llama()
    ids = batch()
    original = run(clone(model), ids)
    job = surgeon.apply(SPECS["lora"], model, seed=0)
    perturb(job)
    job.merge()
    merged = run(model, ids)
    with torch.no_grad(), job.disabled():
        assert torch.equal(run(model, ids), original)
    assert torch.equal(run(model, ids), merged)


def test_disabled_keeps_a_quantized_base_as_peft_does() -> None:
    model, reference = tiny_llama(), tiny_llama()
    ids = batch()
    surgeon.apply("quantize base nf4 double", reference)  # the base alone, quantized the same way
    job = surgeon.apply("quantize base nf4 double\n" + SPECS["lora"], model, seed=0)
    perturb(job)
    with torch.no_grad(), job.disabled():
        assert torch.equal(run(model, ids), run(reference, ids))


def test_disabled_gradients_do_not_leak_into_the_adapters() -> None:
    model = tiny_llama()
    job = surgeon.apply(SPECS["lora"], model, seed=0)
    with job.disabled():
        run(model, batch()).sum()  # no adapter in the graph: nothing of the job gets a gradient
    assert all(p.grad is None for p in job.trainable_parameters().values())


def test_summary_is_what_check_prints_with_live_counts() -> None:
    model = tiny_llama()
    job = surgeon.apply(SPECS["lora"], model, seed=0)
    found = job.summary(as_dict=True)
    expected = sum(p.numel() for p in job.trainable_parameters().values())
    assert found["totals"]["trainable_parameters"] == expected == found["live"]["trainable_parameters"]
    assert found["live"]["all_parameters"] == sum(p.numel() for p in model.parameters())
    text = job.summary()
    assert "model.layers.0.self_attn.q_proj" in text and f"{expected:,}" in text
