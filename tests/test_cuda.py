"""QLoRA on CUDA: the codec against bitsandbytes' CUDA kernels, the quantized layer, training with
paged AdamW, streaming a checkpoint onto the GPU, revert and merge there.

Skipped where there is no CUDA device (this project's CI); run on a GPU machine with
`python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_same_model, batch, clone, tiny_gpt2, tiny_llama
from test_qlora import QLORA, _make_sharded_checkpoint, linear_layers
from test_quant import REFERENCE, same_bits, same_dequantized, sample

import surgeon
from surgeon.methods.weights.quantize import QuantizedLinear
from surgeon.quant import code_4bit, quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parent.parent


def bnb_cuda():
    functional = pytest.importorskip("bitsandbytes.functional")
    x = torch.ones(64, device=CUDA)
    try:
        functional.quantize_4bit(x, blocksize=64, quant_type="nf4")
    except Exception as error:  # noqa: BLE001 - no kernel for this CUDA version
        pytest.skip(f"bitsandbytes has no working CUDA kernels here: {error}")
    return functional


@torch.no_grad()
def cuda_run(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids.to(CUDA))
    return out.logits.float().cpu()


def without_zero_sign(codes: torch.Tensor) -> torch.Tensor:
    """FP4 bytes with nibble 8 (-0) read as nibble 0 (+0): bitsandbytes' CUDA kernel gives tiny
    negatives the code -0, its CPU kernels (and surgeon, on every device) +0."""
    high, low = codes >> 4, codes & 15
    return (torch.where(high == 8, 0, high) << 4) | torch.where(low == 8, 0, low)


@pytest.mark.parametrize("double", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(300, 257), (1024, 4096), (4097,)], ids=lambda s: "x".join(map(str, s)))
def test_codec_on_cuda_against_bitsandbytes_cuda(shape, dtype, qtype, double):
    functional = bnb_cuda()
    x = sample(shape, dtype, seed=7)
    packed, state = functional.quantize_4bit(x.to(CUDA), blocksize=64, quant_type=qtype, compress_statistics=double)
    q = quantize(x.to(CUDA), qtype, blocksize=64, double=double)
    on_cpu = quantize(x, qtype, blocksize=64, double=double)  # = bitsandbytes' CPU output (test_quant)
    assert q.codes.device.type == "cuda"
    assert same_bits(q.codes.cpu(), on_cpu.codes) and same_bits(q.absmax.cpu(), on_cpu.absmax)
    ours, theirs = q.codes.cpu(), packed.view(-1).cpu()
    if qtype == "nf4":
        assert same_bits(ours, theirs), "NF4 codes differ from bitsandbytes' CUDA kernel"
    else:
        # bitsandbytes' CUDA FP4 kernel compares with decimal constants for the midpoints (its CPU
        # kernels, and surgeon, with the midpoints computed in fp32) and gives tiny negatives -0:
        # besides the sign of zero, only values within an ulp of a midpoint may land one code apart
        nibbles = lambda b: torch.stack([b >> 4, b & 15])  # noqa: E731
        differ = nibbles(without_zero_sign(ours)) != nibbles(without_zero_sign(theirs))
        which, byte = differ.nonzero(as_tuple=True)
        element = 2 * byte + which  # the high nibble holds the even element
        flat = x.reshape(-1).float()
        absmax = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % 64)).view(-1, 64).amax(1)
        scaled = flat[element] / absmax.repeat_interleave(64)[element]
        code = code_4bit("fp4").sort().values
        midpoints = (code[1:] + code[:-1]) / 2
        assert ((scaled[:, None] - midpoints).abs().amin(1) <= 1e-6).all(), "an FP4 code differs away from a midpoint"
    if double:
        # bitsandbytes' CUDA kernel finds the 8-bit code of an absmax by a binary search that can
        # stop one code from the nearest one its CPU kernel (and surgeon) picks: allow exactly that
        a, b = q.absmax.cpu().long(), state.absmax.cpu().long()
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 0.05
        assert same_bits(q.absmax_scale.cpu(), state.state2.absmax.cpu())
        state.absmax, state.offset = q.absmax, q.absmax_offset.reshape(state.offset.shape)
    else:
        assert same_bits(q.absmax.cpu(), state.absmax.cpu())
    for out_dtype in (torch.float32, dtype):  # the dequantize kernels, on the same codes
        state.dtype = out_dtype
        expected = functional.dequantize_4bit(q.codes.view(-1, 1), state).reshape(shape)
        assert same_dequantized(q.dequantize(out_dtype).cpu(), expected.cpu())


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(1024, 4096), (300, 257), (37, 64), (4097,)], ids=lambda s: "x".join(map(str, s)))
def test_fused_cuda_dequantize_equals_the_torch_path(monkeypatch, shape, qtype):
    pytest.importorskip("triton")
    import surgeon.quant.codec as quant_module

    x = sample(shape, torch.bfloat16, seed=5).to(CUDA)
    results = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(quant_module, "dequantize_4bit_fused", lambda *args: False)
        for double in (False, True):
            q = quantize(x, qtype, blocksize=64, double=double)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                results[fused, double, dtype] = q.dequantize(dtype).cpu()
    for (fused, double, dtype), value in results.items():
        if fused:
            assert same_bits(value, results[False, double, dtype]), (double, dtype)


def test_cuda_codes_equal_cpu_codes_and_the_committed_reference():
    from safetensors.torch import load_file

    ref = load_file(str(REFERENCE))
    q = quantize(ref["small.x"].to(CUDA), "nf4", blocksize=64)
    assert same_bits(q.codes.cpu(), ref["small.nf4.codes"]) and same_bits(q.absmax.cpu(), ref["small.nf4.absmax"])
    assert same_bits(q.dequantize(torch.float32).cpu(), ref["small.nf4.dequant_fp32"])
    x = sample((512, 384), torch.bfloat16, seed=3)
    for double in (False, True):
        on_cpu, on_gpu = quantize(x, "nf4", double=double), quantize(x.to(CUDA), "nf4", double=double)
        assert same_bits(on_cpu.codes, on_gpu.codes.cpu())
        assert same_bits(on_cpu.dequantize(torch.bfloat16), on_gpu.dequantize(torch.bfloat16).cpu())


def test_quantized_forward_on_cuda_matches_the_bitsandbytes_reference():
    functional = bnb_cuda()
    model = tiny_llama().to(CUDA)
    reference = clone(model)
    with torch.no_grad():
        for layer in linear_layers(reference).values():
            q, state = functional.quantize_4bit(layer.weight.data, blocksize=64, quant_type="nf4",
                                                compress_statistics=True)
            layer.weight.copy_(functional.dequantize_4bit(q, state))
    surgeon.apply("quantize base nf4 double compute=fp32", model)
    assert all(m.codes.is_cuda for m in model.modules() if isinstance(m, QuantizedLinear))
    ids = batch()
    assert (cuda_run(model, ids) - cuda_run(reference, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_qlora_trains_on_cuda_with_paged_adamw_and_reverts_bit_exact(builder):
    model = builder().to(CUDA).train()
    original = clone(model)
    job = surgeon.apply(QLORA, model, seed=0)  # compute bf16, the QLoRA default
    optimizer = job.optimizer("paged_adamw", lr=1e-2)
    try:
        import bitsandbytes
    except ImportError:
        bitsandbytes = None
    if bitsandbytes is not None:
        assert isinstance(optimizer, bitsandbytes.optim.PagedAdamW)
    ids = batch(shape=(4, 16)).to(CUDA)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.is_cuda for p in job.trainable_parameters().values())
    job.revert()
    assert_same_model(model, original)


def test_streaming_onto_cuda_holds_little_gpu_memory_and_reverts_to_the_checkpoint(tmp_path):
    full_bytes = _make_sharded_checkpoint(tmp_path / "model", hidden=512, layers=8)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    job = surgeon.apply_checkpoint(QLORA, str(tmp_path / "model"), seed=0, device="cuda")
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < 0.5 * full_bytes, (peak, full_bytes)
    assert all(t.device.type == "cuda" for t in job.model.state_dict(keep_vars=True).values())
    import transformers

    stock = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model").to(CUDA).eval()
    ids = batch()
    error = (cuda_run(job.model, ids) - cuda_run(stock, ids)).abs().max()
    assert error < 0.5  # NF4 moves the logits by its quantization error only
    job.revert()
    restored, loaded = job.model.state_dict(), stock.state_dict()
    assert all(torch.equal(restored[n].view(torch.uint8), loaded[n].view(torch.uint8)) for n in loaded)


def test_merge_on_cuda_matches_the_unmerged_forward(tmp_path):
    shutil.copytree(ROOT / "examples" / "tiny-llama", tmp_path / "model")
    job = surgeon.apply_checkpoint(QLORA.replace("double", "double compute=fp32"), str(tmp_path / "model"),
                                   seed=0, device="cuda")
    with torch.no_grad():
        for p in job.trainable_parameters().values():
            p.normal_(0, 0.1)
    ids = batch()
    unmerged = cuda_run(job.model, ids)
    job.merge()
    assert (cuda_run(job.model, ids) - unmerged).abs().max() <= 1e-4


def test_requantized_merge_on_cuda_loads_in_transformers_with_bitsandbytes(tmp_path):
    functional = bnb_cuda()
    import transformers

    from surgeon.quant.bnb import save_bnb_4bit

    shutil.copytree(ROOT / "examples" / "tiny-llama", tmp_path / "model")
    job = surgeon.apply_checkpoint(QLORA, str(tmp_path / "model"), seed=0, device="cuda")
    with torch.no_grad():
        for p in job.trainable_parameters().values():
            p.normal_(0, 0.1)
    ids = batch()
    unmerged = cuda_run(job.model, ids)
    job.merge(requantize=True)
    save_bnb_4bit(job.model, tmp_path / "4bit")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "4bit", device_map="cuda")
    for path, layer in linear_layers(loaded).items():
        assert type(layer).__name__ == "Linear4bit", path
        ours = job.model.get_submodule(path).dequantized()
        theirs = functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(ours.dtype)
        assert (ours - theirs).abs().max() <= 1e-2, path  # bf16 compute: one rounding apart at most
    assert (cuda_run(loaded, ids) - unmerged).abs().max() < 0.5
    job.revert()
    assert all(t.is_cuda for t in job.model.state_dict(keep_vars=True).values())


@pytest.mark.parametrize("spec", [
    "inject dora r=4 alpha=8 into *.attn.<q,v>",
    "inject loha r=4 alpha=8 into *.attn.<q,v>",
    "inject lokr r=4 alpha=8 into *.mlp.<up,down>",
    "inject ia3 into *.attn.<k,v>\ninject ia3 into *.mlp.down",
    "inject adalora init_r=6 target_r=4 tinit=1 tfinal=1 total_steps=10 into *.attn.<q,v>",
    "inject prompt tokens=4 into embed",
    "inject ptuning tokens=4 encoder=mlp hidden=32 into embed",
    "inject prefix tokens=3 projection=16 into *.attn",
])
def test_methods_on_cuda_compute_what_they_compute_on_cpu(spec):
    """Every added tensor lands on the model's device; outputs, greedy tokens and revert as on the CPU."""
    on_cpu = tiny_llama()
    on_gpu = clone(on_cpu).to(CUDA)
    original = clone(on_gpu)
    jobs = [surgeon.apply(spec, model, seed=0) for model in (on_cpu, on_gpu)]
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for (name, a), b in zip(jobs[0].trainable_parameters().items(), jobs[1].trainable_parameters().values()):
            assert b.is_cuda, name
            b.copy_(a.add_(torch.randn(a.shape, generator=generator) * 0.1))
    ids = batch()
    with torch.no_grad():
        expected = on_cpu.eval()(input_ids=ids).logits
    assert (cuda_run(on_gpu.eval(), ids) - expected).abs().max() <= 1e-4
    with torch.no_grad():
        tokens = on_gpu.generate(ids.to(CUDA), max_new_tokens=5, do_sample=False).cpu()
    assert torch.equal(tokens, on_cpu.generate(ids, max_new_tokens=5, do_sample=False))
    jobs[1].revert()
    assert_same_model(on_gpu, original)


@pytest.mark.parametrize("spec", ["attend sinks tokens=2 window=6", "attend window size=8\nattend alibi",
                                  "attend rerope window=8 leak=4", "attend logn train_len=16"])
def test_attend_statements_on_cuda_equal_the_cpu(spec):
    """The attention seam on CUDA (sdpa's CUDA kernels, the bounded cache on the device) against the
    same statements on the CPU, whose parity with the references tests/test_attend.py shows."""
    from test_attend import build, decoded, ids_of

    cpu, ids = build("llama", "sdpa"), ids_of(40)
    gpu = clone(cpu).cuda()
    surgeon.apply(spec, cpu)
    surgeon.apply(spec, gpu)
    expected = decoded(cpu, ids, 10)[0]
    assert (decoded(gpu, ids.cuda(), 10)[0].cpu() - expected).abs().max() <= 1e-4
