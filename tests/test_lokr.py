"""LoKr (`inject lokr`): PEFT's factor shapes, parity with PEFT's LoKrConfig, counts by hand, step-0
identity, training, merge, exact revert, a quantized base, the PEFT hooks both ways, and errors."""

import json

import pytest
import torch
from conftest import BUILDERS, assert_same_model, batch, clone, run, tiny_gpt2, tiny_llama, train_losses
from peft_twin import peft_state as state_of, peft_twin as make_twin, randomize, rewrites_of, with_grad
from safetensors.torch import load_file
from torch import nn

import surgeon
from surgeon.errors import ExportError, SpecError
from surgeon.methods.weights.lokr import Lokr, factorize
from surgeon.planner import params_of

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
from peft.tuners.lokr.layer import factorization  # noqa: E402  (PEFT's own, the reference)

QV = "*.attn.<q,v>"
PEFT_QV = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


def peft_twin(job: surgeon.Job, model: nn.Module, modules: list[str]) -> nn.Module:
    return make_twin(job, model, "lokr", peft.LoKrConfig, modules, "lokr_")


def lokr_rewrites(job: surgeon.Job) -> list:
    return rewrites_of(job, "lokr")


def peft_state(job: surgeon.Job) -> dict[str, torch.Tensor]:
    return state_of(job, "lokr")


def test_factor_shapes_are_peft_factorization():
    for dimension in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 5, 7, 8, 16, 64, 500):
            assert factorize(dimension, factor) == factorization(dimension, factor), (dimension, factor)


# (arch, options, which factors are low-rank): each branch of PEFT's full/low-rank choice
CASES = [
    ("llama", "r=2 alpha=4", {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("llama", "r=2 alpha=3 factor=16 decompose_both=true", {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}),
    ("bert", "r=8 alpha=4", {"lokr_w1", "lokr_w2"}),
    ("llama", "r=1 alpha=2 factor=4 decompose_both=true rank_dropout=0.2 module_dropout=0.1 rank_dropout_scale=true",
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
]


@pytest.mark.parametrize(("arch", "options", "factors"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_same_weights_same_outputs_and_gradients_as_peft(arch, options, factors):
    ours = BUILDERS[arch]()
    plain = clone(ours)
    job = surgeon.apply(f"inject lokr {options} into {QV}", ours, seed=0)
    assert {n.rpartition(".")[2] for n in job.trainable_parameters()} == factors
    randomize(job)
    theirs = peft_twin(job, clone(plain), PEFT_QV[arch])
    ids = batch()
    reference = run(theirs, ids)
    assert (reference - run(plain, ids)).abs().max() > 1e-3  # the delta is not zero, so parity means something
    assert (run(ours, ids) - reference).abs().max() <= 1e-5
    peft_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in job.trainable_parameters().values()) == sum(p.numel() for p in peft_params.values())
    # ours never builds the Kronecker product in the forward: its gradients must still be PEFT's
    with_grad(ours, ids).square().mean().backward()
    with_grad(theirs, ids).square().mean().backward()
    for name, param in job.trainable_parameters().items():
        path, _, local = name.rpartition(".")
        expected = peft_params[f"base_model.model.{path}.{local}.default"].grad
        assert torch.allclose(param.grad, expected, rtol=1e-4, atol=1e-7), name


# module_dropout=0: PEFT still draws its number each training forward; ours must too, or every
# later rank-dropout mask differs
@pytest.mark.parametrize(("scaled", "module_dropout"), [(False, 0.3), (True, 0.0)])
def test_train_mode_dropouts_drop_what_peft_drops(scaled, module_dropout):
    ours = tiny_llama()
    plain = clone(ours)
    spec = (f"inject lokr r=2 alpha=4 rank_dropout=0.3 module_dropout={module_dropout} "
            f"rank_dropout_scale={str(scaled).lower()} into {QV}")
    job = surgeon.apply(spec, ours, seed=0)
    randomize(job)
    theirs = peft_twin(job, clone(plain), PEFT_QV["llama"])
    ids = batch()
    evaluated = run(ours, ids)
    ours.train(), theirs.train()
    for seed in range(3):
        torch.manual_seed(seed)
        dropped = run(ours, ids)
        torch.manual_seed(seed)
        assert (dropped - run(theirs, ids)).abs().max() <= 1e-5
        assert (dropped - evaluated).abs().max() > 1e-4  # the dropouts act


def test_trainable_count_by_hand():
    # tiny Llama: q_proj 64 -> 64, v_proj 64 -> 32 (2 kv heads x 16), 2 layers.
    # factor -1: 64 = 8 x 8, 32 = 4 x 8.  r=2:
    #   q: W1 8x8 full (decompose_both off) = 64; W2 8x8, r=2 < 8/2 -> 8x2 + 2x8 = 32  => 96
    #   v: W1 4x8 full = 32;                       W2 8x8 -> 8x2 + 2x8 = 32            => 64
    job = surgeon.apply(f"inject lokr r=2 into {QV}", tiny_llama())
    assert sum(p.numel() for p in job.trainable_parameters().values()) == 2 * (96 + 64) == job.plan.added_parameters
    q = job.model.model.layers[0].self_attn.q_proj
    assert {n: tuple(p.shape) for n, p in q.named_parameters() if n.startswith("lokr")} == {
        "lokr_w1": (8, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    # factor=16, decompose_both: 64 = 16 x 4, 32 = 16 x 2.  r=2:
    #   q: W1 16x16, r=2 < 16/2 -> 16x2 + 2x16 = 64; W2 4x4, r=2 < 4/2? no -> full 16   => 80
    #   v: W1 16x16 -> 64;                            W2 2x4, r=2 < 2? no -> full 8     => 72
    job = surgeon.apply(f"inject lokr r=2 factor=16 decompose_both=true into {QV}", tiny_llama())
    assert sum(p.numel() for p in job.trainable_parameters().values()) == 2 * (80 + 72) == job.plan.added_parameters
    # GPT-2 c_attn, q and v slices of 64 rows each, input 64, default factor, r=2: 96 per slice
    job = surgeon.apply(f"inject lokr r=2 into {QV}", tiny_gpt2())
    assert sum(p.numel() for p in job.trainable_parameters().values()) == 2 * 2 * 96


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_step_zero_equals_the_original_and_only_the_factors_train(arch):
    model = BUILDERS[arch]()
    original = clone(model)
    job = surgeon.apply(f"inject lokr r=2 alpha=4 into {QV}", model, seed=0)
    assert torch.equal(run(model, batch()), run(original, batch()))
    trainable = job.trainable_parameters()
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable.values()}
    # PEFT's init: W1 zero, W2's factors Kaiming-uniform(a=sqrt(5)), bound 1/sqrt(fan_in)
    for name, param in trainable.items():
        if ".lokr_w1" in name:
            assert param.abs().sum() == 0, name
        else:
            bound = param.shape[1] ** -0.5
            assert bound / 2 < param.abs().max() <= bound, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_lowers_the_loss_and_revert_is_exact(arch):
    model = BUILDERS[arch]().train()
    original = clone(model)
    job = surgeon.apply(f"inject lokr r=2 alpha=4 into {QV}", model, seed=0)
    losses = train_losses(model, job.trainable_parameters().values(), steps=8, lr=3e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    job.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize(("arch", "spec"), [
    ("llama", f"inject lokr r=2 alpha=4 into {QV}"),
    ("llama", "inject lokr r=2 factor=4 decompose_both=true into *.mlp.<up,down,gate>"),
    ("gpt2", "inject lokr r=2 alpha=4 into *.attn.<q,v,o>"),
    ("gpt2", "inject lokr r=4 into *.mlp.up"),
    ("bert", f"inject lokr r=8 into {QV}"),
])
def test_merge_equals_unmerged_and_revert_after_merge_is_exact(arch, spec):
    model = BUILDERS[arch]()
    original = clone(model)
    job = surgeon.apply(spec, model, seed=0)
    randomize(job)
    ids = batch()
    unmerged = run(model, ids)
    assert (unmerged - run(original, ids)).abs().max() > 1e-3
    job.merge()
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in model.modules())
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)


def test_gpt2_q_v_slices_get_the_kronecker_delta_and_k_stays_exact():
    model = tiny_gpt2()
    job = surgeon.apply(f"inject lokr r=2 alpha=3 into {QV}", model, seed=0)
    randomize(job)
    wrapper = model.transformer.h[0].attn.c_attn
    d = model.config.n_embd
    x = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = wrapper(x) - wrapper.base(x)
    assert torch.equal(delta[..., d:2 * d], torch.zeros_like(delta[..., d:2 * d]))  # k: bit for bit
    for name, cols in (("q", slice(0, d)), ("v", slice(2 * d, 3 * d))):
        w1 = getattr(wrapper, f"lokr_w1_{name}").detach()
        w2 = (getattr(wrapper, f"lokr_w2_a_{name}") @ getattr(wrapper, f"lokr_w2_b_{name}")).detach()
        by_hand = x @ (torch.kron(w1, w2) * (3 / 2)).T
        assert torch.allclose(delta[..., cols], by_hand, atol=1e-5), name


def test_on_a_quantized_base_it_is_peft_lokr_on_the_dequantized_weights():
    model = tiny_llama()
    original = clone(model)
    quantized_only = clone(model)
    surgeon.apply("quantize base nf4 double compute=fp32", quantized_only)
    job = surgeon.apply(f"quantize base nf4 double compute=fp32\ninject lokr r=2 alpha=4 into {QV}", model, seed=0)
    ids = batch()
    assert torch.equal(run(model, ids), run(quantized_only, ids))  # step 0: the quantized model itself
    assert all(p.dtype == torch.float32 for p in job.trainable_parameters().values())
    randomize(job)
    dequantized = surgeon.apply("quantize base nf4 double compute=fp32", clone(original)).merge()
    reference = run(peft_twin(job, dequantized, PEFT_QV["llama"]), ids)
    unmerged = run(model, ids)
    assert (unmerged - run(quantized_only, ids)).abs().max() > 1e-3
    assert (unmerged - reference).abs().max() <= 1e-5
    job.merge()
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)


def test_a_peft_lokr_adapter_becomes_the_same_statement_and_weights(tmp_path):
    config = peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                             decompose_factor=8, decompose_both=True, rank_pattern={"down_proj": 1})
    peft_model = peft.get_peft_model(tiny_llama(), config).eval()  # init_weights=False: non-zero delta
    peft_model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved_config["peft_type"] == Lokr.peft_type
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path, _, name = key.removeprefix("base_model.model.").rpartition(".")
        by_module.setdefault(path, {})[name] = tensor
    statement = Lokr.statement_from_peft(saved_config, sorted(by_module))
    surgeon.parse_spec(statement)
    ours = tiny_llama()
    job = surgeon.apply(statement, ours)
    assert {r.target.path for r in job.plan.rewrites} == set(by_module)
    added = job.added_tensors()
    with torch.no_grad():
        for rewrite in job.plan.rewrites:
            path = rewrite.target.path
            local = Lokr.from_peft_tensors(rewrite.target, params_of(rewrite), by_module[path])
            assert Lokr.to_peft_tensors(rewrite.target, params_of(rewrite), local) == by_module[path]
            for name, tensor in local.items():
                added[f"{path}.{name}"].copy_(tensor)
    ids = batch()
    reference = run(peft_model, ids)
    assert (reference - run(tiny_llama(), ids)).abs().max() > 1e-3
    assert (run(ours, ids) - reference).abs().max() <= 1e-5


def test_export_refuses_what_peft_lokr_cannot_hold():
    job = surgeon.apply("inject lokr r=2 into <*.attn.<q,v>,h.0.attn.c_proj>", tiny_gpt2())
    by_path = {r.target.path: r for r in job.plan.rewrites}
    sliced, conv1d = by_path["transformer.h.0.attn.c_attn"], by_path["transformer.h.0.attn.c_proj"]
    with pytest.raises(ExportError, match="q/v slice of the fused transformer.h.0.attn.c_attn"):
        Lokr.to_peft_tensors(sliced.target, params_of(sliced), {})
    with pytest.raises(ExportError, match="Conv1D.*no layer"):
        Lokr.to_peft_tensors(conv1d.target, params_of(conv1d), {})
    with pytest.raises(ExportError, match="lokr_t2"):
        Lokr.from_peft_tensors(conv1d.target, params_of(conv1d), {"lokr_t2": torch.zeros(1)})


@pytest.mark.parametrize(("text", "message"), [
    ("inject lokr r=2 factor=7 into *.attn.q",
     "factor=7 does not divide the input width 64 of model.layers.0.self_attn.q_proj (LoKr splits each width "
     "as factor x width/factor); factors that divide every width of this layer (64 input, 64 output): "
     "1, 2, 4, 8, 16, 32, 64"),
    ("inject lokr factor=64 into *.attn.v",
     "factor=64 does not divide the output width 32 of model.layers.0.self_attn.v_proj"),
    ("inject lokr factor=0 into *.attn.q", "factor must be -1 (automatic) or a positive integer"),
    ("inject lokr r=0 into *.attn.q", "bad value 0 for 'r': Input should be greater than or equal to 1"),
    ("inject lokr decompose=true into *.attn.q", "unknown parameter 'decompose' for lokr"),
    ("inject lokr into embed", "is a Embedding (embedding); lokr accepts conv1d, linear"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(text, message):
    model = tiny_llama()
    original = clone(model)
    with pytest.raises(SpecError) as caught:
        surgeon.apply(text, model)
    assert message in str(caught.value)
    assert_same_model(model, original)


def test_gpt2_slice_factor_error_names_the_slice():
    with pytest.raises(SpecError, match=r"factors that divide every width of this layer \(64 input, 64 q slice, "
                                        r"64 v slice\): 1, 2, 4, 8, 16, 32, 64"):
        surgeon.check(f"inject lokr factor=3 into {QV}", tiny_gpt2())
