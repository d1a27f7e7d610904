"""Applying a spec touches nothing outside the model it patches: no process-wide patch while a
streamed skeleton is built (other threads' modules stay real), and a seed drives a generator of
the apply's own, so seeded applies agree across threads and leave the caller's global RNG alone.
And the skeleton a checkpoint streams into has exactly the buffers a normally built model has."""

from __future__ import annotations

import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from conftest import BUILDERS, clone, tiny_llama
from torch import nn

import surgeon
import surgeon.job
from surgeon.errors import ModelLoadError
from surgeon.models import load_model, load_model_skeleton

ROOT = Path(__file__).resolve().parent.parent
TINY_LLAMA = ROOT / "examples" / "tiny-llama"
LORA = "inject lora r=4 into *.attn.<q,v>"

# captured at import, before any apply: what every other thread must keep seeing
REGISTER_PARAMETER = nn.Module.register_parameter
INIT_FUNCTIONS = {name: getattr(nn.init, name) for name in
                  ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "zeros_", "ones_")}


def no_process_wide_patch() -> bool:
    return (nn.Module.register_parameter is REGISTER_PARAMETER
            and all(getattr(nn.init, name) is fn for name, fn in INIT_FUNCTIONS.items()))


@contextmanager
def fine_thread_switching():
    """Switch threads every 10 us instead of every 5 ms, so races show up in a few repetitions."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def added(job: surgeon.Job) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in job.added_tensors().items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.dtype.is_floating_point else t


# ---------------------------------------------------------------------------------------------
# (a), (b): streaming apply builds its skeleton without patching anything process-wide


def test_modules_built_in_another_thread_during_streaming_applies_have_real_weights(tmp_path, monkeypatch):
    shutil.copytree(TINY_LLAMA, tmp_path / "model")
    skeletons = []
    build = surgeon.job.load_model_skeleton
    monkeypatch.setattr(surgeon.job, "load_model_skeleton", lambda path: skeletons.append(path) or build(path))
    devices: list[str] = []
    stop = threading.Event()

    def build_linears() -> None:
        while not stop.is_set():
            devices.append(nn.Linear(64, 64).weight.device.type)

    other = threading.Thread(target=build_linears)
    with fine_thread_switching():
        other.start()
        try:
            for _ in range(6):
                surgeon.apply_checkpoint("quantize base nf4", str(tmp_path / "model"))
        finally:
            stop.set()
            other.join()
    assert len(skeletons) == 6  # every apply streamed into a skeleton
    assert devices
    on_meta = sum(d == "meta" for d in devices)
    assert on_meta == 0, f"{on_meta} of {len(devices)} Linears built by the other thread got meta weights"


def test_streaming_apply_patches_nothing_process_wide(tmp_path, monkeypatch):
    shutil.copytree(TINY_LLAMA, tmp_path / "model")
    seen: list[bool] = []
    init_weights = transformers.PreTrainedModel._init_weights  # Llama's (every submodel's) own

    def spy(self, module):  # runs while the skeleton gets its buffers
        seen.append(no_process_wide_patch())
        return init_weights(self, module)

    monkeypatch.setattr(transformers.PreTrainedModel, "_init_weights", spy)
    surgeon.apply_checkpoint("quantize base nf4", str(tmp_path / "model"))
    assert seen, "the skeleton's buffers did not come from transformers' _init_weights"
    assert all(seen), "register_parameter or torch.nn.init was patched while the skeleton was built"
    assert nn.Module.register_parameter is REGISTER_PARAMETER
    assert no_process_wide_patch()


# ---------------------------------------------------------------------------------------------
# the skeleton's buffers: bit for bit those of the model built normally on the CPU


def tiny_gpt_neox() -> nn.Module:
    config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=128, max_position_embeddings=64)
    return transformers.GPTNeoXForCausalLM(config).eval()


SKELETON_ARCHS = {**{a: BUILDERS[a] for a in ("llama", "qwen2", "mistral", "gpt2", "bert", "t5")},
                  "gpt_neox": tiny_gpt_neox}


@pytest.mark.parametrize("arch", list(SKELETON_ARCHS))
def test_skeleton_buffers_equal_a_normally_built_model_and_parameters_stay_on_meta(arch, tmp_path):
    SKELETON_ARCHS[arch]().save_pretrained(tmp_path / "model")
    torch.manual_seed(5)
    rng = torch.random.get_rng_state()
    skeleton = load_model_skeleton(tmp_path / "model")
    assert torch.equal(torch.random.get_rng_state(), rng)  # building it drew nothing
    config = transformers.AutoConfig.from_pretrained(tmp_path / "model")
    normal = getattr(transformers, config.architectures[0])(config).eval()
    assert type(skeleton) is type(normal) and not skeleton.training
    ours, theirs = dict(skeleton.named_buffers()), dict(normal.named_buffers())
    assert list(ours) == list(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert got.device.type == "cpu" and got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(bits(got), bits(expected)), f"{name} differs"
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in normal.named_parameters()]
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert not any(hasattr(p, "_is_hf_initialized") for p in skeleton.parameters())


def test_a_buffer_transformers_does_not_compute_on_meta_is_refused_not_garbage(tmp_path, monkeypatch):
    shutil.copytree(TINY_LLAMA, tmp_path / "model")
    monkeypatch.setattr(transformers.PreTrainedModel, "_init_weights", lambda self, module: None)
    with pytest.raises(ModelLoadError, match="rotary_emb.inv_freq"):
        load_model_skeleton(tmp_path / "model")


# ---------------------------------------------------------------------------------------------
# (c), (d), (e): a seed drives the apply's own generator


def test_seeded_applies_in_two_threads_equal_a_single_thread_apply():
    base = tiny_llama()
    expected = added(surgeon.apply(LORA, clone(base), seed=3))
    for _ in range(8):
        models = [clone(base), clone(base)]
        results: list[dict[str, torch.Tensor] | BaseException] = [{}, {}]
        start = threading.Barrier(2)

        def work(i: int) -> None:
            try:
                start.wait()
                results[i] = added(surgeon.apply(LORA, models[i], seed=3))
            except BaseException as err:  # noqa: BLE001 (reported below, in the main thread)
                results[i] = err

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        with fine_thread_switching():
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for got in results:
            assert isinstance(got, dict), got
            assert_same_tensors(got, expected)


SEEDED_SPECS = [
    LORA,
    "inject lora r=4 init=kaiming into *.attn.<q,v>",
    "inject dora r=4 into *.attn.<q,v>",
    "inject relora r=2 restart_every=4 into *.attn.q",
    "inject adalora init_r=4 target_r=2 tinit=1 tfinal=1 total_steps=10 into *.attn.<q,v>",
    "inject loha r=4 into *.attn.<q,v>",
    "inject lokr r=4 into *.mlp.<up,down>",
    "inject prompt tokens=4 into embed",
    "inject prompt tokens=4 init=vocab into embed",
    "inject mpt tokens=4 tasks=2 rank=2 into embed",
    "inject ptuning tokens=4 encoder=mlp hidden=32 into embed",
    "inject ptuning tokens=4 encoder=lstm hidden=24 into embed",
    "inject prefix tokens=3 into *.attn",
    "inject prefix tokens=3 projection=16 into *.attn",
]


@pytest.mark.parametrize("spec", SEEDED_SPECS)
def test_a_seeded_apply_leaves_the_global_rng_alone(spec):
    model = tiny_llama()
    torch.manual_seed(1234)
    torch.rand(7)  # somewhere in the stream, not at a seed
    before = torch.random.get_rng_state()
    surgeon.apply(spec, model, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_seeded_streaming_apply_leaves_the_global_rng_alone(tmp_path):
    shutil.copytree(TINY_LLAMA, tmp_path / "model")
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    job = surgeon.apply_checkpoint(f"quantize base nf4 double\n{LORA}", str(tmp_path / "model"), seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    model, source = load_model(str(tmp_path / "model"))
    in_memory = surgeon.apply(f"quantize base nf4 double\n{LORA}", model, seed=3, source=source)
    assert_same_tensors(dict(sorted(added(job).items())), dict(sorted(added(in_memory).items())))


ENCODER_SPECS = [
    "inject ptuning tokens=4 encoder=mlp hidden=32 into embed",
    "inject ptuning tokens=4 encoder=lstm hidden=24 into embed",
    "inject prefix tokens=3 projection=16 into *.attn",
]


@pytest.mark.parametrize("spec", ENCODER_SPECS)
def test_seeded_encoder_weights_are_determined_by_the_seed_alone(spec):
    """P-tuning's encoder and prefix tuning's MLP: the same seed gives the same weights even while
    another thread draws from the global RNG, and another seed gives other weights."""
    base = tiny_llama()
    expected = added(surgeon.apply(spec, clone(base), seed=5))
    assert expected
    stop = threading.Event()

    def draw_globally() -> None:
        while not stop.is_set():
            torch.randn(64)

    other = threading.Thread(target=draw_globally)
    with fine_thread_switching():
        other.start()
        try:
            again = [added(surgeon.apply(spec, clone(base), seed=5)) for _ in range(4)]
        finally:
            stop.set()
            other.join()
    for got in again:
        assert_same_tensors(got, expected)
    different = added(surgeon.apply(spec, clone(base), seed=6))
    assert all(not torch.equal(different[name], expected[name]) for name in expected
               if expected[name].abs().sum() > 0)  # zero-initialised tensors are zero under every seed


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_the_seeded_ptuning_encoder_is_drawn_with_torch_default_laws(encoder):
    """Drawn again from the generator, the encoder is bit for bit what torch's own reset_parameters
    draws from a global RNG in the same state: same laws, same order."""
    from surgeon.methods._rng import reset_parameters
    from surgeon.methods.inputs.ptuning import PromptEncoder, PTuningParams

    params = PTuningParams(tokens=4, encoder=encoder, hidden=24)
    torch.manual_seed(11)
    by_torch = PromptEncoder(4, 64, params)
    with torch.device("meta"):
        ours = PromptEncoder(4, 64, params)
    ours = ours.to_empty(device="cpu")
    reset_parameters(ours, torch.Generator().manual_seed(11))
    theirs = dict(by_torch.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.equal(param, theirs[name]), name
    with torch.no_grad():  # built on meta and moved: the LSTM's flat weights are the drawn ones
        assert torch.equal(ours.prompts(), by_torch.prompts())
