"""LoHa (`inject loha`): parity with PEFT's LoHaConfig, counts by hand, step-0 identity, training,
merge, exact revert, a quantized base, the PEFT hooks both ways, and errors."""

import json

import pytest
import torch
from conftest import BUILDERS, assert_same_model, batch, clone, run, tiny_gpt2, tiny_llama, train_losses
from peft_twin import peft_state as state_of, peft_twin as make_twin, randomize, rewrites_of, with_grad
from safetensors.torch import load_file
from torch import nn

import surgeon
from surgeon.errors import ExportError, SpecError
from surgeon.methods.weights.loha import Loha, _HadamardWeight
from surgeon.planner import params_of

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

QV = "*.attn.<q,v>"
PEFT_QV = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


def peft_twin(job: surgeon.Job, model: nn.Module, modules: list[str]) -> nn.Module:
    return make_twin(job, model, "loha", peft.LoHaConfig, modules, "hada_")


def loha_rewrites(job: surgeon.Job) -> list:
    return rewrites_of(job, "loha")


def peft_state(job: surgeon.Job) -> dict[str, torch.Tensor]:
    return state_of(job, "loha")


@pytest.mark.parametrize(("arch", "options"), [("llama", "r=4 alpha=8"), ("bert", "r=3 alpha=6"),
                                               ("llama", "r=2 alpha=5 rank_dropout=0.2 module_dropout=0.1")])
def test_same_weights_same_outputs_and_gradients_as_peft(arch, options):
    ours = BUILDERS[arch]()
    plain = clone(ours)
    job = surgeon.apply(f"inject loha {options} into {QV}", ours, seed=0)
    randomize(job)
    theirs = peft_twin(job, clone(plain), PEFT_QV[arch])
    ids = batch()
    reference = run(theirs, ids)
    assert (reference - run(plain, ids)).abs().max() > 1e-3  # the delta is not zero, so parity means something
    assert (run(ours, ids) - reference).abs().max() <= 1e-5
    peft_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in job.trainable_parameters().values()) == sum(p.numel() for p in peft_params.values())
    # the Hadamard backward (ours is written by hand) gives PEFT's gradients
    with_grad(ours, ids).square().mean().backward()
    with_grad(theirs, ids).square().mean().backward()
    for name, param in job.trainable_parameters().items():
        path, _, local = name.rpartition(".")
        expected = peft_params[f"base_model.model.{path}.{local}.default"].grad
        assert torch.allclose(param.grad, expected, rtol=1e-4, atol=1e-7), name


def test_train_mode_dropouts_drop_what_peft_drops():
    ours = tiny_llama()
    plain = clone(ours)
    job = surgeon.apply(f"inject loha r=4 alpha=8 rank_dropout=0.3 module_dropout=0.3 into {QV}", ours, seed=0)
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


def test_hadamard_backward_is_the_derivative():
    generator = torch.Generator().manual_seed(0)
    factors = [torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
               for shape in ((5, 3), (3, 4), (5, 3), (3, 4))]
    assert torch.autograd.gradcheck(lambda *f: _HadamardWeight.apply(*f, 1.7), factors)


def by_hand_count(model: nn.Module, r: int) -> int:
    """2*r*(d_in+d_out) for every q and v projection, read off the config."""
    c = model.config
    d = c.hidden_size if hasattr(c, "hidden_size") else c.n_embd
    heads = c.num_attention_heads if hasattr(c, "num_attention_heads") else c.n_head
    kv = getattr(c, "num_key_value_heads", None) or heads
    q_out, v_out = d, kv * (d // heads)
    layers = c.num_hidden_layers if hasattr(c, "num_hidden_layers") else c.n_layer
    return layers * 2 * r * ((d + q_out) + (d + v_out))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_step_zero_equals_the_original_and_counts_by_hand(arch):
    model = BUILDERS[arch]()
    original = clone(model)
    job = surgeon.apply(f"inject loha r=4 alpha=8 into {QV}", model, seed=0)
    assert torch.equal(run(model, batch()), run(original, batch()))
    trainable = job.trainable_parameters()
    assert sum(p.numel() for p in trainable.values()) == by_hand_count(original, 4) == job.plan.added_parameters
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable.values()}
    # PEFT's init: w1_a, w1_b, w2_a Kaiming-uniform(a=sqrt(5)), bound 1/sqrt(fan_in); w2_b zero
    for name, param in trainable.items():
        if ".hada_w2_b" in name:
            assert param.abs().sum() == 0, name
        else:
            bound = param.shape[1] ** -0.5
            assert bound / 2 < param.abs().max() <= bound, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_lowers_the_loss_and_revert_is_exact(arch):
    model = BUILDERS[arch]().train()
    original = clone(model)
    job = surgeon.apply(f"inject loha r=4 alpha=8 into {QV}", model, seed=0)
    losses = train_losses(model, job.trainable_parameters().values(), steps=8, lr=3e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    job.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize(("arch", "pattern"), [("llama", QV), ("gpt2", "*.attn.<q,v,o>"), ("gpt2", "*.mlp.up"),
                                               ("bert", QV)])
def test_merge_equals_unmerged_and_revert_after_merge_is_exact(arch, pattern):
    model = BUILDERS[arch]()
    original = clone(model)
    job = surgeon.apply(f"inject loha r=4 alpha=8 into {pattern}", model, seed=0)
    randomize(job)
    ids = batch()
    unmerged = run(model, ids)
    assert (unmerged - run(original, ids)).abs().max() > 1e-3
    job.merge()
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in model.modules())
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)


def test_gpt2_q_v_slices_get_the_hadamard_delta_and_k_stays_exact():
    model = tiny_gpt2()
    job = surgeon.apply(f"inject loha r=4 alpha=6 into {QV}", model, seed=0)
    randomize(job)
    wrapper = model.transformer.h[0].attn.c_attn
    d = model.config.n_embd
    x = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = wrapper(x) - wrapper.base(x)
    assert torch.equal(delta[..., d:2 * d], torch.zeros_like(delta[..., d:2 * d]))  # k: bit for bit
    for name, cols in (("q", slice(0, d)), ("v", slice(2 * d, 3 * d))):
        w1a, w1b, w2a, w2b = (getattr(wrapper, f"hada_{w}_{name}").detach() for w in ("w1_a", "w1_b", "w2_a", "w2_b"))
        by_hand = x @ ((w1a @ w1b) * (w2a @ w2b) * (6 / 4)).T
        assert torch.allclose(delta[..., cols], by_hand, atol=1e-5), name


def test_on_a_quantized_base_it_is_peft_loha_on_the_dequantized_weights():
    model = tiny_llama()
    original = clone(model)
    quantized_only = clone(model)
    surgeon.apply("quantize base nf4 double compute=fp32", quantized_only)
    job = surgeon.apply(f"quantize base nf4 double compute=fp32\ninject loha r=4 alpha=8 into {QV}", model, seed=0)
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


def test_a_peft_loha_adapter_becomes_the_same_statement_and_weights(tmp_path):
    config = peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False,
                             rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    peft_model = peft.get_peft_model(tiny_llama(), config).eval()  # init_weights=False: non-zero delta
    peft_model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved_config["peft_type"] == Loha.peft_type
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path, _, name = key.removeprefix("base_model.model.").rpartition(".")
        by_module.setdefault(path, {})[name] = tensor
    statement = Loha.statement_from_peft(saved_config, sorted(by_module))
    surgeon.parse_spec(statement)
    ours = tiny_llama()
    job = surgeon.apply(statement, ours)
    assert {r.target.path for r in job.plan.rewrites} == set(by_module)
    added = job.added_tensors()
    with torch.no_grad():
        for rewrite in job.plan.rewrites:
            path = rewrite.target.path
            local = Loha.from_peft_tensors(rewrite.target, params_of(rewrite), by_module[path])
            assert Loha.to_peft_tensors(rewrite.target, params_of(rewrite), local) == by_module[path]
            for name, tensor in local.items():
                added[f"{path}.{name}"].copy_(tensor)
    ids = batch()
    reference = run(peft_model, ids)
    assert (reference - run(tiny_llama(), ids)).abs().max() > 1e-3
    assert (run(ours, ids) - reference).abs().max() <= 1e-5


def test_save_and_load_into_a_fresh_model(tmp_path):
    model = tiny_llama()
    job = surgeon.apply(f"inject loha r=4 into {QV}", model, seed=0)
    randomize(job)
    ids = batch()
    expected = run(model, ids)
    job.save(tmp_path / "run")
    fresh = tiny_llama()
    pristine = clone(fresh)
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert torch.equal(run(fresh, ids), expected)
    loaded.revert()
    assert_same_model(fresh, pristine)


def test_export_refuses_what_peft_loha_cannot_hold():
    job = surgeon.apply("inject loha r=2 into <*.attn.<q,v>,h.0.attn.c_proj>", tiny_gpt2())
    by_path = {r.target.path: r for r in job.plan.rewrites}
    sliced, conv1d = by_path["transformer.h.0.attn.c_attn"], by_path["transformer.h.0.attn.c_proj"]
    with pytest.raises(ExportError, match="q/v slice of the fused transformer.h.0.attn.c_attn"):
        Loha.to_peft_tensors(sliced.target, params_of(sliced), {})
    with pytest.raises(ExportError, match="Conv1D.*no layer"):
        Loha.to_peft_tensors(conv1d.target, params_of(conv1d), {})
    with pytest.raises(ExportError, match="hada_t1"):
        Loha.from_peft_tensors(conv1d.target, params_of(conv1d), {"hada_t1": torch.zeros(1)})


@pytest.mark.parametrize(("text", "message"), [
    ("inject loha r=0 into *.attn.q", "bad value 0 for 'r': Input should be greater than or equal to 1"),
    ("inject loha rank_dropout=1 into *.attn.q", "bad value 1 for 'rank_dropout'"),
    ("inject loha dropout=0.1 into *.attn.q", "unknown parameter 'dropout' for loha"),
    ("inject loha into embed", "is a Embedding (embedding); loha accepts conv1d, linear"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(text, message):
    model = tiny_llama()
    original = clone(model)
    with pytest.raises(SpecError) as caught:
        surgeon.apply(text, model)
    assert message in str(caught.value)
    assert_same_model(model, original)
