"""QLoRA: `quantize base nf4 double` + LoRA, on every architecture; bits per parameter; exact revert
from memory and from a checkpoint; streaming a sharded checkpoint; merge; errors."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUILDERS, assert_same_files, assert_same_model, batch, clone, run, tiny_gpt2, tiny_llama
from torch import nn
from typer.testing import CliRunner

import surgeon
from surgeon.cli import app
from surgeon.errors import RevertError, SpecError
from surgeon.methods.weights.quantize import QuantizedLinear

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
QLORA = "quantize base nf4 double\ninject lora r=4 alpha=8 into *.attn.<q,v>"


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1D except the output head: what `base` means, found independently."""
    return {n: m for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and not n.endswith("lm_head")}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5", "qwen2"])
def test_qlora_applies_everywhere_and_reverts_bit_exact_from_memory(arch):
    model = BUILDERS[arch]()
    original = clone(model)
    expected = set(linear_layers(original))
    job = surgeon.apply(QLORA, model, seed=0)
    quantized = {n.removesuffix(".base") for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == expected
    assert job.manifest.originals.kind == "spilled"
    ids = batch()
    out = run(model, ids)
    assert torch.isfinite(out).all()
    job.revert()
    assert_same_model(model, original)


def test_quantized_forward_matches_bitsandbytes_dequantized_reference():
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")
    model = tiny_llama()
    reference = clone(model)
    with torch.no_grad():
        for layer in linear_layers(reference).values():
            q, state = bnb_functional.quantize_4bit(layer.weight.data, blocksize=64, quant_type="nf4",
                                                    compress_statistics=True)
            layer.weight.copy_(bnb_functional.dequantize_4bit(q, state))
    full = clone(model)
    surgeon.apply("quantize base nf4 double compute=fp32", model)
    ids = batch()
    assert (run(model, ids) - run(reference, ids)).abs().max() <= 1e-5
    error = (run(model, ids) - run(full, ids)).abs().max()
    assert 1e-4 < error < 0.5  # NF4 moves the logits, but only by the quantization error


def test_qlora_training_lowers_the_loss_and_base_stays_frozen():
    model = tiny_llama().train()
    job = surgeon.apply(QLORA.replace("nf4 double", "nf4 double compute=fp32"), model, seed=0)
    ids = batch(shape=(4, 16))
    optimizer = job.optimizer("adamw", lr=1e-2)
    codes_before = model.model.layers[0].mlp.up_proj.codes.clone()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert torch.equal(model.model.layers[0].mlp.up_proj.codes, codes_before)
    embed_grad = model.model.embed_tokens.weight.grad
    assert embed_grad is None  # frozen, yet gradients had to flow through every quantized layer below LoRA
    assert all(p.grad is not None for p in job.trainable_parameters().values())


def test_bits_per_parameter_from_stored_sizes():
    import transformers

    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                                      num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    the_plan = surgeon.check("quantize base nf4 double", model)

    def by_hand(numel: int) -> float:  # 4-bit codes + 8-bit absmax per 64 + fp32 scale per 256 blocks + offset + map
        blocks = numel // 64
        return numel / 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4

    numels = [math.prod(r.target.weight_shape) for r in the_plan.rewrites]
    assert sum(r.bytes_after for r in the_plan.rewrites) == sum(by_hand(n) for n in numels)
    bits = 8 * sum(r.bytes_after for r in the_plan.rewrites) / sum(numels)
    assert bits == pytest.approx(4.127, abs=0.001)
    plain = surgeon.check("quantize base nf4", model)
    assert 8 * sum(r.bytes_after for r in plain.rewrites) / sum(numels) == pytest.approx(4.5)
    # and the real stored tensors have exactly the size the plan promised
    small = tiny_llama()
    planned = {r.target.path: r.bytes_after for r in surgeon.check("quantize base nf4 double", small).rewrites}
    surgeon.apply("quantize base nf4 double", small)
    for path, module in small.named_modules():
        if isinstance(module, QuantizedLinear):
            assert module.quantized().nbytes == planned[path]


def test_check_reports_memory_and_bits(tmp_path):
    spec = tmp_path / "q.peft"
    spec.write_text("quantize base nf4 double")
    result = runner.invoke(app, ["check", str(spec), str(ROOT / "examples" / "tiny-llama"), "--json"])
    assert result.exit_code == 0, result.output
    totals = json.loads(result.output)["totals"]
    assert totals["memory_after"] < totals["memory_before"]
    from safetensors.torch import load_file

    weights = load_file(str(ROOT / "examples" / "tiny-llama" / "model.safetensors"))
    numels = [t.numel() for n, t in weights.items() if n.endswith("proj.weight")]  # every linear but lm_head
    stored = sum(n / 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 + 1024 for n in numels)
    # tiny layers: the fixed 1028 bytes of double-quant state per tensor weigh in (4.127 only for big ones)
    assert totals["quantized_bits_per_parameter"] == pytest.approx(8 * stored / sum(numels))


def test_revert_from_a_checkpoint_is_bit_exact(tmp_path):
    shutil.copytree(ROOT / "examples" / "tiny-llama", tmp_path / "model")
    spec = tmp_path / "qlora.peft"
    spec.write_text(QLORA)
    result = runner.invoke(app, ["apply", str(spec), str(tmp_path / "model"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["originals"]["kind"] == "checkpoint"
    assert not (tmp_path / "run" / "originals").exists()  # nothing copied: the checkpoint holds them
    result = runner.invoke(app, ["revert", str(tmp_path / "run"), "--out", str(tmp_path / "restored")])
    assert result.exit_code == 0, result.output
    assert_same_files(tmp_path / "restored", tmp_path / "model")


def test_spilled_originals_travel_with_the_run(tmp_path):
    model = tiny_gpt2()
    original = clone(model)
    job = surgeon.apply(QLORA, model, seed=0)
    job.save(tmp_path / "run")
    assert (tmp_path / "run" / "originals").is_dir()
    shutil.rmtree(job.manifest.originals.location)  # the temp spill is gone; the run's copy remains
    fresh = tiny_gpt2()
    loaded = surgeon.load(tmp_path / "run", fresh)
    loaded.revert()
    assert_same_model(fresh, original)


def test_gone_or_changed_originals_fail_and_change_nothing(tmp_path):
    model = tiny_llama()
    job = surgeon.apply("quantize base nf4", model, originals_dir=tmp_path / "orig")
    before = {n: t.clone() for n, t in model.state_dict(keep_vars=True).items()}
    victim = sorted((tmp_path / "orig").iterdir())[0]
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(victim))
    (name, tensor), = tensors.items()
    tensor.view(-1)[0] += 1
    save_file({name: tensor}, str(victim))
    with pytest.raises(RevertError, match="has changed since apply"):
        job.revert()
    victim.unlink()
    with pytest.raises(RevertError, match="is gone"):
        job.revert()
    assert all(torch.equal(before[n], t) for n, t in model.state_dict(keep_vars=True).items())
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())


def _make_sharded_checkpoint(path: Path, hidden: int, layers: int) -> int:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=8, vocab_size=256)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size="300KB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_streaming_apply_on_a_sharded_checkpoint_equals_in_memory_apply(tmp_path):
    from surgeon.job import apply_checkpoint
    from surgeon.models import load_model

    _make_sharded_checkpoint(tmp_path / "model", hidden=128, layers=4)
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
    streamed = apply_checkpoint(QLORA, str(tmp_path / "model"), seed=0)
    model, source = load_model(str(tmp_path / "model"))
    pristine = clone(model)
    in_memory = surgeon.apply(QLORA, model, seed=0, source=source)
    ids = batch()
    assert torch.equal(run(streamed.model, ids), run(in_memory.model, ids))
    assert streamed.manifest.fingerprint == in_memory.manifest.fingerprint
    streamed.revert()
    # the streamed model was never whole in memory; after revert it holds exactly what
    # from_pretrained loads (transformers' private loader attributes aside)
    restored, loaded = streamed.model.state_dict(), pristine.state_dict()
    assert list(restored) == list(loaded)
    assert all(torch.equal(restored[n].view(torch.uint8), loaded[n].view(torch.uint8)) for n in loaded)
    assert [type(m) for m in streamed.model.modules()] == [type(m) for m in pristine.modules()]


PEAK_SCRIPT = """
import resource, sys, torch
from surgeon.job import apply_checkpoint
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
job = apply_checkpoint("quantize base nf4 double", sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024)
"""


def test_streaming_peak_memory_stays_well_below_full_precision(tmp_path):
    full_bytes = _make_sharded_checkpoint(tmp_path / "model", hidden=512, layers=8)
    script = "import surgeon.job, transformers, torch\n" + PEAK_SCRIPT  # imports before the baseline
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    grown = int(done.stdout.strip().splitlines()[-1])
    assert grown < 0.5 * full_bytes, (grown, full_bytes)


QUANTIZE_ERRORS = [
    ("quantize base nf4 blocksize=48", ":1:19: error: bad value 48 for 'blocksize'", "power of two"),
    ("quantize base nf5", ":1:15: error: unknown word 'nf5' for quantize", "did you mean 'nf4'?"),
    ("quantize base nf4 compute=fp64", "bad value 'fp64' for 'compute'", "'bf16', 'fp16' or 'fp32'"),
    ("quantize base nf4 fp4", "two types: 'nf4' and 'fp4'", ""),
]


@pytest.mark.parametrize(("text", "message", "hint"), QUANTIZE_ERRORS)
def test_quantize_errors_change_nothing(text, message, hint):
    model = tiny_llama()
    original = clone(model)
    with pytest.raises(SpecError) as info:
        surgeon.apply(text, model)
    assert message in str(info.value)
    assert hint in str(info.value)
    assert_same_model(model, original)


def test_blocksize_must_divide_the_layer():
    model = tiny_llama()  # k_proj is 32 x 64 = 2048 weights
    original = clone(model)
    with pytest.raises(SpecError, match="blocksize=4096 does not divide model.layers.0.self_attn.k_proj's 2048 weights"):
        surgeon.apply("quantize *.attn.k nf4 blocksize=4096", model)
    assert_same_model(model, original)


def test_quantizing_a_layer_lora_merged_into_is_refused():
    model = tiny_llama()
    lora = surgeon.apply("inject lora r=2 into *.attn.q", model)
    lora.merge()
    snapshot = {n: t.clone() for n, t in model.state_dict(keep_vars=True).items()}
    with pytest.raises(SpecError, match="holds a merged LoRA delta"):
        surgeon.apply("quantize *.attn.q nf4", model)
    assert all(torch.equal(snapshot[n], t) for n, t in model.state_dict(keep_vars=True).items())


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_merge_onto_a_quantized_base(tmp_path, compute):
    import transformers

    shutil.copytree(ROOT / "examples" / "tiny-llama", tmp_path / "model")
    from surgeon.models import load_model

    model, source = load_model(str(tmp_path / "model"))
    job = surgeon.apply(QLORA.replace("double", f"double compute={compute}"), model, seed=0, source=source)
    with torch.no_grad():
        for p in job.trainable_parameters().values():
            p.normal_(0, 0.1)
    ids = batch()
    patched = run(model, ids)
    job.save(tmp_path / "run")
    result = runner.invoke(app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    tolerance = 1e-4 if compute == "fp32" else 5e-2  # bf16: the unmerged forward rounds each matmul
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] <= tolerance
    stock = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (run(stock, ids) - patched).abs().max() <= tolerance


def test_paged_optimizer_falls_back_on_cpu_and_says_so_once(monkeypatch):
    import surgeon.job

    monkeypatch.setattr(surgeon.job, "_SAID", set())
    model = tiny_llama()
    job = surgeon.apply(QLORA, model)
    with pytest.warns(UserWarning, match="paged AdamW needs CUDA"):
        first = job.optimizer("paged_adamw", lr=1e-3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = job.optimizer("paged_adamw", lr=1e-3)
    assert type(first) is torch.optim.AdamW and type(second) is torch.optim.AdamW


def test_streaming_onto_a_named_device_equals_streaming_plainly(tmp_path):
    _make_sharded_checkpoint(tmp_path / "model", hidden=128, layers=2)
    plain = surgeon.apply_checkpoint(QLORA, str(tmp_path / "model"), seed=0)
    on_cpu = surgeon.apply_checkpoint(QLORA, str(tmp_path / "model"), seed=0, device="cpu")
    ids = batch()
    assert torch.equal(run(plain.model, ids), run(on_cpu.model, ids))
    assert plain.manifest.fingerprint == on_cpu.manifest.fingerprint


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_apply_on_a_device_this_machine_lacks_is_a_clear_error(tmp_path):
    spec = tmp_path / "qlora.peft"
    spec.write_text(QLORA)
    for device, message in (("cuda", "device 'cuda' is not available on this machine"),
                            ("gpu7", "unknown device 'gpu7'")):
        result = runner.invoke(app, ["apply", str(spec), str(ROOT / "examples" / "tiny-llama"),
                                     "--out", str(tmp_path / "run"), "--device", device])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output
        assert not (tmp_path / "run").exists()


def _qlora_run(tmp_path: Path, example: str, spec: str) -> Path:
    """A saved run on a copy of a bundled example, with non-zero LoRA weights."""
    from surgeon.models import load_model

    shutil.copytree(ROOT / "examples" / example, tmp_path / "model")
    model, source = load_model(str(tmp_path / "model"))
    job = surgeon.apply(spec, model, seed=0, source=source)
    with torch.no_grad():
        for p in job.trainable_parameters().values():
            p.normal_(0, 0.1)
    job.save(tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("example", ["tiny-llama", "tiny-gpt2"])
def test_merge_requantize_writes_what_bitsandbytes_writes_and_transformers_loads(tmp_path, example):
    """The merged weights, quantized by bitsandbytes itself, are the codes in the written file, and
    transformers loads that file into bitsandbytes' Linear4bit layers that dequantize to our weights."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")
    import transformers
    from safetensors.torch import load_file

    run_dir = _qlora_run(tmp_path, example, QLORA.replace("double", "double compute=fp32"))
    plain = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    result = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "4bit"), "--requantize", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["requantized"] and 1e-4 < report["max_abs_diff"] < 0.5  # now NF4 error, not merge error

    written = load_file(str(tmp_path / "4bit" / "model.safetensors"))
    merged, original = load_file(str(tmp_path / "plain" / "model.safetensors")), \
        load_file(str(tmp_path / "model" / "model.safetensors"))
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    patches = json.loads((run_dir / "manifest.json").read_text())["patches"]
    with_delta = {p["target"] for p in patches if p["method"] == "inject lora"}
    assert with_delta
    expected = {}  # bitsandbytes' own quantization of what each layer should hold
    for path, layer in linear_layers(stock).items():
        # a layer LoRA merged into holds base + delta; the others keep their first quantization
        weight = (merged if path in with_delta else original)[f"{path}.weight"]
        weight = weight.T.contiguous() if type(layer).__name__ == "Conv1D" else weight
        expected[path] = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        packed, state = expected[path]
        assert torch.equal(written[f"{path}.weight"].view(-1), packed.view(-1)), path
        assert torch.equal(written[f"{path}.weight.absmax"], state.absmax), path
        assert torch.equal(written[f"{path}.weight.nested_absmax"], state.state2.absmax), path

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "4bit", device_map="cpu")
    assert set(linear_layers(loaded)) == set(expected)
    for path, layer in linear_layers(loaded).items():
        assert type(layer).__name__ == "Linear4bit", path
        ours = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(ours, bnb_functional.dequantize_4bit(*expected[path])), path
    ids = batch()
    # bitsandbytes' CPU matmul rounds (about 1e-2 here); the weights themselves are equal above
    assert (run(loaded, ids) - run(stock, ids)).abs().max() < 0.5


@pytest.mark.parametrize(("spec", "message"), [
    ("quantize base int8\ninject lora r=2 into *.attn.q", "bitsandbytes' 4-bit format, which has no int8"),
    ("quantize *.attn.* nf4\nquantize *.mlp.<up,down,gate> fp4\ninject lora r=2 into *.attn.q", "2 combinations"),
    ("inject lora r=2 into *.attn.q", "the run quantizes nothing"),
])
def test_merge_requantize_refuses_what_bitsandbytes_cannot_hold(tmp_path, spec, message):
    run_dir = _qlora_run(tmp_path, "tiny-llama", spec)
    result = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "out"), "--requantize"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_requantized_merge_keeps_the_model_4bit_and_reverts_bit_exact():
    model = tiny_gpt2()
    original = clone(model)
    job = surgeon.apply(QLORA, model, seed=0)
    with torch.no_grad():
        for p in job.trainable_parameters().values():
            p.normal_(0, 0.1)
    codes_before = model.transformer.h[0].mlp.c_fc.codes.clone()  # no LoRA there
    job.merge(requantize=True)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == set(linear_layers(original))
    assert torch.equal(model.transformer.h[0].mlp.c_fc.codes, codes_before)
    assert torch.isfinite(run(model, batch())).all()
    job.revert()
    assert_same_model(model, original)


def test_quantized_layers_of_one_shape_chain_forward_and_backward_like_their_dequantized_weights():
    """Two layers of one shape share the dequantize buffer: both directions must still see their own weight."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")
    from surgeon.quant import quantize

    torch.manual_seed(0)
    weights = [torch.randn(256, 256) * 0.05 for _ in range(2)]
    layers = [QuantizedLinear(quantize(w, "nf4", double=True), None, torch.float32, "linear") for w in weights]
    reference = []
    for w in weights:
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        reference.append(bnb_functional.dequantize_4bit(packed, state))
    x = torch.randn(3, 256, requires_grad=True)
    out = layers[1](torch.tanh(layers[0](x)))
    (out ** 2).sum().backward()
    ours_grad, x.grad = x.grad, None
    expected = torch.tanh(x @ reference[0].T) @ reference[1].T
    (expected ** 2).sum().backward()
    assert (out - expected).abs().max() <= 1e-5
    assert (ours_grad - x.grad).abs().max() <= 1e-5
