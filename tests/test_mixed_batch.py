"""Mixed batches (`model(**batch, adapter_names=[...])`, PEFT's): each row computes what it computes
alone under `job.active(its adapter)`; against PEFT's own mixed-batch forward on the same LoRA
weights; through `generate` (greedy and beam search); bad names are refused before the forward."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import assert_same_model, batch, clone, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from peft_twin import named_lora_twin

import surgeon

CASES = {  # model, spec, the row names of a batch of 5
    "llama-lora": (tiny_llama, "inject lora r=4 into *.attn.<q,v> as a\ninject lora r=8 into *.attn.<q,v> as b\n"
                               "inject lora r=2 into *.attn.k", ["a", None, "b", "a", "b"]),
    "gpt2-fused-slices": (tiny_gpt2, "inject lora r=2 into *.attn.<q,v> as a\ninject lora r=4 into *.attn.qkv as b",
                          ["b", "a", None, "a", "b"]),
    "llama-loha-lokr": (tiny_llama, "inject loha r=2 into *.attn.q as x\ninject lokr r=2 into *.attn.<q,v> as y",
                        ["y", "x", "y", None, "x"]),
    "bert-bottlenecks": (tiny_bert, "inject adapter config=pfeiffer init=bert as p\n"
                                    "inject adapter config=houlsby init=bert as h\n"
                                    "inject adapter beside *.mlp init=bert as s", ["p", "h", "s", None, "h"]),
    "llama-bottleneck-and-lora": (tiny_llama, "inject adapter config=pfeiffer init=bert as p\n"
                                              "inject lora r=4 into *.attn.q as l", ["l", "p", None, "p", "l"]),
    "t5-lora": (tiny_t5, "inject lora r=4 into *.attn.<q,v> as a\ninject lora r=4 into *.mlp.down as b",
                ["a", "b", None, "b", "a"]),
}


def randomised(job: surgeon.Job, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in job.added_tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def forward(model: torch.nn.Module, ids: torch.Tensor, names: list[str | None] | None = None) -> torch.Tensor:
    extra = {} if names is None else {"adapter_names": names}
    with torch.no_grad():
        if getattr(model.config, "is_encoder_decoder", False):
            return model(input_ids=ids, decoder_input_ids=ids, **extra).logits
        out = model(input_ids=ids, **extra)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("case", list(CASES))
def test_each_row_computes_what_it_computes_alone_under_its_adapter(case: str) -> None:
    build, spec, names = CASES[case]
    model = build()
    original = clone(model)
    ids = batch(shape=(len(names), 9))
    job = surgeon.apply(spec, model, seed=0)
    randomised(job)
    mixed = forward(model, ids, names)
    for row, name in enumerate(names):
        with job.active(name):
            alone = forward(model, ids[row:row + 1])
        assert (mixed[row] - alone[0]).abs().max() <= 1e-5, (row, name)
    with job.active(None):
        base = forward(model, ids)
    for row, name in enumerate(names):  # the adapters were at work, on their rows alone
        assert ((mixed[row] - base[row]).abs().max() > 1e-4) == (name is not None), row  # (unnamed ones act in both)
    job.revert()
    assert_same_model(model, original)  # the seam left with the job


def test_a_mixed_batch_equals_peft_mixed_batch_on_the_same_lora_weights() -> None:
    model = tiny_llama()
    reference = clone(model)
    ids = batch(shape=(8, 10))
    ranks = {"a": (4, 8), "b": (8, 4), "c": (2, 2), "d": (4, 16)}  # name -> (r, alpha)
    spec = "\n".join(f"inject lora r={r} alpha={alpha} into *.attn.<q,v> as {name}" for name, (r, alpha) in ranks.items())
    job = surgeon.apply(spec, model, seed=0)
    randomised(job)
    twin = named_lora_twin(reference, job, {name: peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
                                            for name, (r, alpha) in ranks.items()})
    names = ["a", "b", None, "c", "d", "a", None, "d"]
    with torch.no_grad():
        theirs = twin(input_ids=ids, adapter_names=[name or "__base__" for name in names]).logits  # PEFT's word
    assert (forward(model, ids, names) - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_serves_each_row_with_its_adapter(beams: int) -> None:
    model = tiny_llama()
    job = surgeon.apply("inject lora r=4 into *.attn.<q,v> as a\ninject lora r=4 into *.attn.<q,v> as b", model, seed=0)
    randomised(job, seed=3)
    ids = batch(shape=(3, 6))
    names = ["b", None, "a"]
    settings = {"max_new_tokens": 5, "do_sample": False, "num_beams": beams, "pad_token_id": 0,
                "attention_mask": torch.ones_like(ids)}
    mixed = model.generate(ids, adapter_names=names, **settings)
    for row, name in enumerate(names):
        with job.active(name):
            alone = model.generate(ids[row:row + 1], **(settings | {"attention_mask": torch.ones_like(ids[:1])}))
        assert torch.equal(mixed[row], alone[0]), (row, name)
    with job.active(None):
        base = model.generate(ids, **settings)
    assert not torch.equal(mixed[0], base[0]) and not torch.equal(mixed[2], base[2])  # the adapters were at work


def test_only_the_rows_adapter_gets_gradients() -> None:
    model = tiny_llama()
    job = surgeon.apply("inject lora r=4 into *.attn.q as a\ninject lora r=4 into *.attn.q as b", model, seed=0)
    randomised(job)
    ids = batch(shape=(2, 8))
    model(input_ids=ids, labels=ids, adapter_names=["a", None]).loss.backward()
    grads = {name: p.grad for name, p in job.trainable_parameters().items()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "[a]" in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if "[b]" in n)


@pytest.mark.parametrize(("spec", "names", "expected"), [
    ("inject lora into *.attn.q as a", ["a"], "names 1 rows, but the batch has 2"),
    ("inject lora into *.attn.q as sentiment", ["sentimnt", None], "did you mean 'sentiment'"),
    ("inject lora into *.attn.q as a", "a", "one adapter name (or None) per row"),
    ("inject lora into *.attn.q as a", [1, None], "each entry is an adapter name or None"),
    ("inject lora into *.attn.q as a\ninject prefix tokens=2 into *.attn as p", ["a", None],
     "adapter 'p' has 'inject prefix', which cannot split a batch by rows"),
    ("inject lora into *.attn.q as a\ninject lora into *.attn.q as b", ["a", "b"], "names ['b'], switched off"),
    ("inject adapter as a\ninject adapter as b\nfuse adapters <a,b>", ["a", "b"], "cannot split its batch"),
])
def test_bad_adapter_names_are_refused_and_change_nothing(spec: str, names, expected: str) -> None:
    model = tiny_llama()
    job = surgeon.apply(spec, model, seed=0)
    randomised(job)
    if "as b" in spec:
        job.activate("a")
    ids = batch()
    before = forward(model, ids)
    with pytest.raises(surgeon.SurgeonError, match=expected.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        model(input_ids=ids, adapter_names=names)
    assert torch.equal(forward(model, ids), before)  # no rows left behind for the next call
