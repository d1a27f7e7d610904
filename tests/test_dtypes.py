"""Casts after apply: `model.to(torch.bfloat16)`, `.half()`, `.to(torch.float16)` make every method
compute in the new dtype, as Hugging Face PEFT does. The reference is PEFT's own adapter (PEFT +
bitsandbytes for QLoRA) holding the same weights on a copy of the model, cast the same way; BitFit,
which PEFT lacks, is checked against a plain copy holding the same biases. QLoRA trains under CPU
autocast whatever its compute dtype, and revert after a cast says what happened and changes nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import peft
import pytest
import torch
import transformers
from conftest import assert_same_model, batch, clone, tiny_gpt2, tiny_llama
from peft_twin import randomize
from test_prompt import peft_twin as prompt_twin
from test_ptuning import peft_trained_twin
from torch import nn

import surgeon
from surgeon.errors import RevertError
from surgeon.methods.weights.quantize import QuantizedLinear

CASTS: dict[str, tuple[Callable[[nn.Module], nn.Module], torch.dtype]] = {
    "to-bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "half": (lambda m: m.half(), torch.float16),
    "to-fp16": (lambda m: m.to(torch.float16), torch.float16),
}
# Both sides compute in the narrow dtype; where their kernels round differently (LoKr's factored
# product, bitsandbytes' CPU matmul) outputs of size ~1 differ by a few units in the last place.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3}

# statements whose PEFT twin is the PEFT export of the job, loaded by `PeftModel.from_pretrained`
EXPORTED = {
    "lora": "inject lora r=4 alpha=8 into *.attn.<q,v>",
    "dora": "inject dora r=4 alpha=8 into *.attn.<q,v>",
    "ia3": "inject ia3 into *.attn.<k,v>\ninject ia3 into *.mlp.down",
    "loha": "inject loha r=4 alpha=8 into *.attn.<q,v>",
    "lokr": "inject lokr r=4 alpha=8 into *.attn.<q,v>",
    "adalora": "inject adalora init_r=6 target_r=2 tinit=2 tfinal=3 total_steps=12 into *.attn.<q,v>",
    "prefix": "inject prefix tokens=4 into *.attn",
    "prompt": "inject prompt tokens=4 into embed",
}
QLORA = "quantize base nf4 double compute={compute}\ninject lora r=4 alpha=8 into *.attn.<q,v>"
COMPUTE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return model(input_ids=ids, **kwargs).logits


def exported_twin(job: surgeon.Job, plain: nn.Module, where: Path, trainable: bool = False) -> nn.Module:
    job.save(where, format="peft")
    return peft.PeftModel.from_pretrained(plain, str(where), is_trainable=trainable).eval()


def lora_twin(job: surgeon.Job, plain: nn.Module) -> nn.Module:
    """PEFT LoRA on q, v holding the job's lora_A / lora_B (ReLoRA has no PEFT export)."""
    twin = peft.get_peft_model(plain, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    theirs = dict(twin.named_parameters())
    with torch.no_grad():
        for name, param in job.trainable_parameters().items():
            path, _, local = name.rpartition(".")
            theirs[f"base_model.model.{path}.{local}.default.weight"].copy_(param)
    return twin.eval()


def bnb_llama(where: Path, compute: torch.dtype) -> nn.Module:
    """tiny_llama() loaded 4-bit by transformers + bitsandbytes (NF4, double quant), on the CPU."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency")
    tiny_llama().save_pretrained(where)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    return transformers.AutoModelForCausalLM.from_pretrained(where, quantization_config=config, device_map="cpu",
                                                             dtype=torch.float32).eval()


def with_twin(method: str, tmp_path: Path) -> tuple[nn.Module, nn.Module, dict[str, object]]:
    """(ours, PEFT's twin with the same weights, forward kwargs), both in float32, not yet cast."""
    if method == "qlora":
        ours = tiny_llama()
        job = surgeon.apply(QLORA.format(compute="bf16"), ours, seed=0)
        randomize(job)
        return ours, exported_twin(job, bnb_llama(tmp_path / "base", torch.bfloat16), tmp_path / "peft"), {}
    ours = tiny_llama()
    plain = clone(ours)
    if method in EXPORTED:
        job = surgeon.apply(EXPORTED[method], ours, seed=0)
        randomize(job)
        return ours, exported_twin(job, plain, tmp_path / "peft"), {}
    if method == "relora":
        job = surgeon.apply("inject relora r=4 alpha=8 restart_every=10 into *.attn.<q,v>", ours, seed=0)
        randomize(job)
        return ours, lora_twin(job, plain), {}
    if method == "ptuning":
        job = surgeon.apply("inject ptuning tokens=4 hidden=32 into embed", ours, seed=0)
        randomize(job)
        return ours, peft_trained_twin(job, plain, "llama"), {}
    assert method == "mpt"
    job = surgeon.apply("inject mpt tokens=4 tasks=3 rank=2 into embed", ours, seed=0)
    randomize(job)
    return ours, prompt_twin(job, plain, "llama"), {"task_ids": torch.tensor([2, 0])}


METHODS = [*EXPORTED, "relora", "ptuning", "mpt", "qlora"]
# `.to(torch.float16)` is `.half()` by another name: checked on LoRA and QLoRA only
CASES = [(m, c) for m in METHODS for c in ("to-bf16", "half")] + [("lora", "to-fp16"), ("qlora", "to-fp16")]


@pytest.mark.parametrize(("method", "cast"), CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_a_cast_model_computes_in_the_new_dtype_as_peft_does(method: str, cast: str, tmp_path: Path) -> None:
    ours, theirs, kwargs = with_twin(method, tmp_path)
    ids = batch()
    fp32_out = logits(ours, ids, **kwargs)
    to, dtype = CASTS[cast]
    to(ours), to(theirs)
    assert all(p.dtype == dtype for p in ours.parameters())  # the adapters were cast with the model
    out, reference = logits(ours, ids, **kwargs), logits(theirs, ids, **kwargs)
    assert out.dtype == reference.dtype == dtype
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), reference.float(), atol=tolerance, rtol=0)
    # the narrow dtype shows (so this is not the float32 forward again) and parity means something
    assert (out.float() - fp32_out).abs().max() > 0
    plain = to(tiny_llama())
    assert (logits(plain, ids) - reference[:, -ids.shape[1]:]).abs().max() > 5 * tolerance  # prompts: the real tokens


@pytest.mark.parametrize("cast", ["to-bf16", "half"])
def test_bitfit_computes_in_the_new_dtype_as_a_plain_model_with_its_biases(cast: str) -> None:
    """GPT-2 trains its own biases; Llama gets zero biases added (then made non-zero here)."""
    to, dtype = CASTS[cast]
    ids = batch()
    for build, spec in ((tiny_gpt2, "train bias"), (tiny_llama, "train bias add=true only=<q,v,mlp>")):
        ours = build()
        reference = build()
        job = surgeon.apply(spec, ours, seed=0)
        randomize(job, std=0.5)
        with torch.no_grad():
            for name, bias in job.trainable_parameters().items():
                owner, _, leaf = name.rpartition(".")
                reference.get_submodule(owner).register_parameter(leaf, nn.Parameter(bias.detach().clone()))
        to(ours), to(reference)
        out, expected = logits(ours, ids), logits(reference, ids)
        assert out.dtype == dtype
        assert torch.equal(out, expected), spec
        assert (logits(to(build()), ids) - expected).abs().max() > 5 * TOLERANCE[dtype]


@pytest.mark.parametrize("double", [False, True])
def test_a_cast_moves_the_quantized_state_but_keeps_its_bits(double: bool) -> None:
    """model.to(bfloat16) would round the fp32 absmax constants, and so the weights; they stay."""
    model = tiny_llama()
    surgeon.apply(f"quantize base nf4{' double' if double else ''} compute=fp32", model)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    before = [(layer.dequantized(), {n: b.clone() for n, b in layer.named_buffers()}) for layer in layers]
    for cast in ("to-bf16", "half"):
        CASTS[cast][0](model)
        for layer, (weight, buffers) in zip(layers, before):
            assert layer.compute_dtype == torch.float32  # the compute dtype is the layer's setting, as in bnb
            for name, buffer in layer.named_buffers():
                assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
            assert torch.equal(layer.dequantized(), weight)
        model.to(torch.float32)


def _train_step(model: nn.Module, params: list[nn.Parameter], ids: torch.Tensor
                ) -> tuple[float, dict[int, torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {i: p.grad.float().clone() for i, p in enumerate(params)}


@pytest.mark.parametrize("compute", list(COMPUTE))
def test_qlora_trains_under_autocast_like_peft_with_bitsandbytes(compute: str, tmp_path: Path) -> None:
    ours = tiny_llama().train()
    job = surgeon.apply(QLORA.format(compute=compute), ours, seed=0)
    randomize(job)
    theirs = exported_twin(job, bnb_llama(tmp_path / "base", COMPUTE[compute]), tmp_path / "peft", trainable=True)
    mine = list(job.trainable_parameters().values())
    their_params = dict(theirs.named_parameters())
    peers = [their_params[f"base_model.model.{name}.default.weight"] for name in job.trainable_parameters()]
    ids = batch(shape=(4, 16))
    loss, grads = _train_step(ours, mine, ids)
    their_loss, their_grads = _train_step(theirs.train(), peers, ids)
    assert torch.isfinite(torch.tensor(loss)) and abs(loss - their_loss) < 1e-2
    for i in grads:  # fp16 weights (compute=fp16) round the factors; autocast computes in bf16 anyway
        assert torch.isfinite(grads[i]).all()
        assert (grads[i] - their_grads[i]).norm() <= 0.05 * their_grads[i].norm(), i
    before = [p.detach().clone() for p in mine]
    # fused: compute=fp16 makes fp16 LoRA weights, and the foreach AdamW's eps=1e-8 is 0 in fp16, so a
    # zero gradient entry steps by 0/0 (a PyTorch limit for any fp16 parameter, autocast or not)
    torch.optim.AdamW(mine, lr=1e-2, fused=True).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, mine))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(ours(input_ids=ids, labels=ids).loss)


STACKED = {"dora": "dora r=4", "ia3": "ia3", "loha": "loha r=4", "lokr": "lokr r=4",
           "adalora": "adalora init_r=4 target_r=2 tinit=1 tfinal=1 total_steps=10"}


@pytest.mark.parametrize("method", list(STACKED))
def test_methods_on_an_fp16_quantized_base_train_under_bf16_autocast(method: str) -> None:
    """Three dtypes meet: fp16 weights (compute=fp16), bf16 autocast, fp32 activations between layers."""
    model = tiny_llama().train()
    job = surgeon.apply(f"quantize base nf4 double compute=fp16\ninject {STACKED[method]} into *.attn.<q,v>", model,
                        seed=0)
    randomize(job, std=0.1)
    params = list(job.trainable_parameters().values())
    loss, grads = _train_step(model, params, batch(shape=(4, 16)))
    assert torch.isfinite(torch.tensor(loss))
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads.values())
    before = [p.detach().clone() for p in params]
    torch.optim.AdamW(params, lr=1e-2, fused=True).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))


def test_qlora_with_fp32_compute_trains_under_trainer_bf16(tmp_path: Path) -> None:
    """transformers.Trainer(bf16=True) on the CPU runs the step under autocast (through accelerate)."""
    model = tiny_llama()
    job = surgeon.apply(QLORA.format(compute="fp32"), model, seed=0)
    before = {n: p.detach().clone() for n, p in job.trainable_parameters().items()}
    rows = batch(shape=(4, 16))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          bf16=True, use_cpu=True, report_to=[], save_strategy="no",
                                          logging_steps=1, learning_rate=1e-2, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(before[n], p) for n, p in job.trainable_parameters().items())


# revert after a cast

REVERTED = {**EXPORTED, "qlora": QLORA.format(compute="bf16"), "bitfit": "train bias add=true only=<q,v>",
            "ptuning": "inject ptuning tokens=4 into embed", "mpt": "inject mpt tokens=4 tasks=3 rank=2 into embed"}


def representable_llama() -> nn.Module:
    """tiny_llama() with every weight rounded to bfloat16 (a cast to bfloat16 and back is lossless)."""
    model = tiny_llama()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    return model


def identities(model: nn.Module) -> list[int]:
    return [id(m) for m in model.modules()] + [id(t) for t in model.state_dict(keep_vars=True).values()]


@pytest.mark.parametrize("method", list(REVERTED))
def test_revert_after_a_cast_says_so_and_changes_nothing_then_reverts_exactly(method: str) -> None:
    model = representable_llama()
    original = clone(model)
    job = surgeon.apply(REVERTED[method], model, seed=0)
    randomize(job)
    model.to(torch.bfloat16)
    patched, ids = copy.deepcopy(model), identities(model)
    with pytest.raises(RevertError, match=r"is bfloat16, the original was float32: the model was cast after apply; "
                                          r"cast it back \(model.to\(torch.float32\)\) and revert again"):
        job.revert()
    assert identities(model) == ids
    assert_same_model(model, patched)
    model.to(torch.float32)  # lossless here: every weight fits in bfloat16
    job.revert()
    assert_same_model(model, original)


def test_revert_after_a_lossy_cast_and_back_is_refused_and_says_why() -> None:
    model = tiny_llama()  # float32 weights that bfloat16 rounds
    job = surgeon.apply(EXPORTED["lora"], model, seed=0)
    model.to(torch.bfloat16).to(torch.float32)
    patched, ids = copy.deepcopy(model), identities(model)
    with pytest.raises(RevertError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight differs from the original "
                                          r"\(sha256 mismatch\); every value fits in bfloat16: the model was probably "
                                          r"cast to bfloat16 and back"):
        job.revert()
    assert identities(model) == ids
    assert_same_model(model, patched)
