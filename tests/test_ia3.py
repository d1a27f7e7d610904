"""IA3: parity with PEFT's IA3Config (keys/values scale outputs, the FFN down projection scales its
input), counts by hand, training, GPT-2 slices, merge, exact revert, a quantized base, PEFT
interchange and errors."""

import pytest
import torch
from conftest import (BUILDERS, assert_merge_keeps_outputs_and_reverts, assert_same_model, batch, clone, run,
                      tiny_llama, train_losses)
from peft_twin import bnb_dequantized, with_random_biases
from torch import nn

import surgeon
from surgeon.errors import ExportError, SpecError
from surgeon.methods.weights.ia3 import Ia3
from surgeon.planner import params_of

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

KVF = "inject ia3 into *.attn.<k,v>\ninject ia3 into *.mlp.down"
CASES = [  # arch, surgeon spec, PEFT target_modules, PEFT feedforward_modules, PEFT options
    ("llama", KVF, ["k_proj", "v_proj", "down_proj"], ["down_proj"], {}),
    ("llama", "inject ia3 feedforward=false into *.mlp.down\ninject ia3 feedforward=true into *.mlp.up",
     ["down_proj", "up_proj"], ["up_proj"], {}),
    ("gpt2", "inject ia3 into c_attn\ninject ia3 into *.mlp.down", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"],
     {"fan_in_fan_out": True}),
    ("bert", KVF, r".*\.(key|value|\d+\.output\.dense)", r".*\.\d+\.output\.dense", {}),
]


def _build(arch: str) -> nn.Module:
    return with_random_biases(BUILDERS[arch]())


def _randomize(job: surgeon.Job, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def _into_peft(job: surgeon.Job, peft_model: nn.Module) -> None:
    """Our vectors, through Ia3.to_peft_tensors, loaded with PEFT's own loader."""
    state = {}
    for rewrite, patch in job._surgery.patches:
        if rewrite.method != "ia3":  # the quantize rewrites of a quantized base add nothing
            continue
        local = {n: p.detach() for n, p in patch.added_parameters().items()}
        for name, tensor in Ia3.to_peft_tensors(rewrite.target, params_of(rewrite), local).items():
            state[f"base_model.model.{rewrite.target.path}.{name}"] = tensor.clone()
    result = peft.set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "ia3_" in k]


@pytest.mark.parametrize(("arch", "spec", "modules", "feedforward", "extra"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_same_vectors_same_outputs_as_peft(arch, spec, modules, feedforward, extra):
    ours = _build(arch)
    theirs = clone(ours)
    job = surgeon.apply(spec, ours, seed=0)
    config = peft.IA3Config(target_modules=modules, feedforward_modules=feedforward, **extra)
    peft_model = peft.get_peft_model(theirs, config)
    _randomize(job)
    _into_peft(job, peft_model)
    ids = batch()
    reference = run(peft_model, ids)
    assert (reference - run(_build(arch), ids)).abs().max() > 1e-3  # the vectors are not ones
    assert (run(ours, ids) - reference).abs().max() <= 1e-5
    peft_params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in job.trainable_parameters().values()) == sum(p.numel() for p in peft_params)


def test_feedforward_scales_the_hidden_activation_by_hand():
    model = tiny_llama()
    job = surgeon.apply(KVF, model, seed=0)
    _randomize(job)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 3, model.config.hidden_size)
    with torch.no_grad():
        hidden = nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # after the nonlinearity
        expected = (hidden * mlp.down_proj.ia3_l) @ mlp.down_proj.base.weight.T
        assert (mlp(x) - expected).abs().max() <= 1e-6
    assert mlp.down_proj.ia3_l.shape == (model.config.intermediate_size,)


def _ia3_params_by_hand(model: nn.Module) -> int:
    """d_out of every k and v projection plus d_in of every FFN down projection, from the config."""
    c = model.config
    d = getattr(c, "hidden_size", None) or c.n_embd
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    kv = getattr(c, "num_key_value_heads", None) or heads
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    return layers * (2 * kv * (d // heads) + ffn)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_step0_equals_original_and_counts_by_hand(arch):
    model = _build(arch)
    original = clone(model)
    job = surgeon.apply(KVF, model, seed=0)
    ids = batch()
    assert torch.equal(run(model, ids), run(original, ids))
    count = sum(p.numel() for p in job.trainable_parameters().values())
    assert count == job.plan.added_parameters == _ia3_params_by_hand(original)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(job.trainable_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_lowers_the_loss_and_revert_is_exact(arch):
    model = _build(arch).train()
    original = clone(model)
    job = surgeon.apply(KVF, model, seed=0)
    losses = train_losses(model, job.trainable_parameters().values(), steps=6, lr=5e-2)
    assert losses[-1] < losses[0] - 0.02, losses
    job.revert()
    assert_same_model(model, original)


def test_gpt2_k_and_v_slices_scale_their_columns_only():
    model = _build("gpt2")
    original = clone(model)
    job = surgeon.apply("inject ia3 into *.attn.<k,v>", model, seed=0)
    _randomize(job)
    d = model.config.n_embd
    wrapper, base = model.transformer.h[1].attn.c_attn, original.transformer.h[1].attn.c_attn
    assert set(dict(wrapper.named_parameters(recurse=False))) == {"ia3_l_k", "ia3_l_v"}
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        out, plain = wrapper(x), base(x)
    assert torch.equal(out[..., :d], plain[..., :d])  # q: bit for bit
    assert torch.allclose(out[..., d:2 * d], plain[..., d:2 * d] * wrapper.ia3_l_k, atol=1e-6)
    assert torch.allclose(out[..., 2 * d:], plain[..., 2 * d:] * wrapper.ia3_l_v, atol=1e-6)
    with pytest.raises(ExportError, match="k/v slice.*no PEFT equivalent"):
        rewrite = job.plan.rewrites[1]
        Ia3.to_peft_tensors(rewrite.target, params_of(rewrite), {"ia3_l": wrapper.ia3_l_k})


@pytest.mark.parametrize(("arch", "spec"), [("llama", KVF), ("gpt2", KVF), ("bert", KVF),
                                            ("gpt2", "inject ia3 into c_attn")])
def test_merge_equals_unmerged_and_revert_after_merge_is_exact(arch, spec):
    model = _build(arch)
    original = clone(model)
    job = surgeon.apply(spec, model, seed=0)
    _randomize(job)
    assert_merge_keeps_outputs_and_reverts(model, original, job, batch())


def test_merged_weights_by_hand():
    """Output scaling: rows of W and the bias; input scaling: columns of W, bias untouched (GPT-2 stores W^T)."""
    model = _build("gpt2")
    original = clone(model)
    job = surgeon.apply("inject ia3 into c_attn\ninject ia3 into *.mlp.down", model, seed=0)
    _randomize(job)
    attn, down = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_proj
    l_out, l_in = attn.ia3_l.detach().clone(), down.ia3_l.detach().clone()
    job.merge()
    was_attn, was_down = original.transformer.h[0].attn.c_attn, original.transformer.h[0].mlp.c_proj
    merged_attn, merged_down = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_proj
    assert torch.allclose(merged_attn.weight, was_attn.weight * l_out[None, :], atol=1e-6)
    assert torch.allclose(merged_attn.bias, was_attn.bias * l_out, atol=1e-6)
    assert torch.allclose(merged_down.weight, was_down.weight * l_in[:, None], atol=1e-6)
    assert torch.equal(merged_down.bias, was_down.bias)


QUANTIZE = "quantize base nf4 double compute=fp32\n"


def test_on_a_quantized_base_matches_peft_on_the_dequantized_weights():
    model = tiny_llama()
    reference = bnb_dequantized(model)
    quantized_only = clone(model)
    surgeon.apply(QUANTIZE.strip(), quantized_only)
    job = surgeon.apply(QUANTIZE + KVF, model, seed=0)
    ids = batch()
    assert torch.equal(run(model, ids), run(quantized_only, ids))  # step 0: the quantized model's output
    peft_model = peft.get_peft_model(reference, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                               feedforward_modules=["down_proj"]))
    _randomize(job)
    _into_peft(job, peft_model)
    expected = run(peft_model, ids)
    assert (expected - run(quantized_only, ids)).abs().max() > 1e-3
    assert (run(model, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # GPT-2: biases on a quantized base, and slices
def test_on_a_quantized_base_trains_merges_and_reverts_exactly(arch):
    model = _build(arch).train()
    original = clone(model)
    job = surgeon.apply(QUANTIZE + KVF, model, seed=0)
    losses = train_losses(model, job.trainable_parameters().values(), steps=6, lr=5e-2)
    assert losses[-1] < losses[0] - 0.02, losses
    ids = batch(shape=(4, 16))  # the training batch
    model.eval()
    unmerged = run(model, ids)
    job.merge()
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)


def test_peft_hooks_round_trip_layouts_and_statement():
    model = tiny_llama()
    job = surgeon.apply(KVF, model, seed=0)
    _randomize(job)
    c = model.config
    for rewrite, patch in job._surgery.patches:
        ours = {n: p.detach() for n, p in patch.added_parameters().items()}
        params = params_of(rewrite)
        exported = Ia3.to_peft_tensors(rewrite.target, params, ours)
        down = rewrite.target.path.endswith("down_proj")
        assert exported["ia3_l"].shape == ((1, c.intermediate_size) if down else (32, 1))  # PEFT's layouts
        back = Ia3.from_peft_tensors(rewrite.target, params, exported)
        assert set(back) == {"ia3_l"} and torch.equal(back["ia3_l"], ours["ia3_l"])
    targets = [r.target.path for r in job.plan.rewrites]
    feedforward = set()
    for index in range(2):
        rewrites = [r for r in job.plan.rewrites if r.statement == index]
        config = Ia3.peft_target_config(params_of(rewrites[0]), [r.target for r in rewrites])
        feedforward |= set(config["feedforward_modules"])
    assert feedforward == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    config = peft.IA3Config(**Ia3.peft_config(params_of(job.plan.rewrites[0])), target_modules=targets,
                            feedforward_modules=sorted(feedforward)).to_dict()
    for statement in (Ia3.statement_from_peft(config, targets),
                      Ia3.statement_from_peft({**config, "feedforward_modules": r".*\.mlp\.down_proj"}, targets)):
        surgeon.parse_spec(statement)
        again = surgeon.apply(statement, tiny_llama())
        shapes = {r.target.path: r.added["ia3_l"] for r in again.plan.rewrites}
        assert shapes == {r.target.path: r.added["ia3_l"] for r in job.plan.rewrites}


def test_bad_inputs_give_clear_errors():
    model = _build("gpt2")
    pristine = clone(model)
    with pytest.raises(SpecError, match=r"1:12.*bad value 'maybe' for 'feedforward'.*valid boolean"):
        surgeon.apply("inject ia3 feedforward=maybe into *.attn.k", model)
    with pytest.raises(SpecError, match="feedforward=true scales the input of transformer.h.0.attn.c_attn"):
        surgeon.apply("inject ia3 feedforward=true into *.attn.<k,v>", model)
    with pytest.raises(SpecError, match="wte is a Embedding.*ia3 accepts conv1d, linear"):
        surgeon.apply("inject ia3 into embed", model)
    with pytest.raises(SpecError, match="(?s)unknown parameter 'feed_forward'.*did you mean 'feedforward'"):
        surgeon.apply("inject ia3 feed_forward=true into *.mlp.down", model)
    assert_same_model(model, pristine)


def test_save_and_load_into_a_fresh_model(tmp_path):
    model = _build("gpt2")
    job = surgeon.apply(KVF, model, seed=0)
    _randomize(job)
    ids = batch()
    expected = run(model, ids)
    job.save(tmp_path / "run")
    fresh = _build("gpt2")
    pristine = clone(fresh)
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert torch.equal(run(fresh, ids), expected)
    loaded.revert()
    assert_same_model(fresh, pristine)


EXPORTS = [("llama", KVF), ("gpt2", "inject ia3 into c_attn\ninject ia3 into *.mlp.down"),
           ("llama", "inject ia3 feedforward=true into *.mlp.up")]


@pytest.mark.parametrize(("arch", "spec"), EXPORTS)
def test_an_exported_run_loads_in_peft_and_imports_back(tmp_path, arch, spec):
    model = _build(arch)
    fresh = clone(model)
    job = surgeon.apply(spec, model, seed=0)
    _randomize(job)
    job.save(tmp_path / "adapter", format="peft")
    loaded = peft.PeftModel.from_pretrained(clone(fresh), tmp_path / "adapter").eval()
    ids = batch()
    assert (run(model, ids) - run(fresh, ids)).abs().max() > 1e-3
    assert (run(loaded, ids) - run(model, ids)).abs().max() <= 1e-5
    # and PEFT's adapter imported back: the same statements' effect, PEFT's outputs
    fresh.save_pretrained(tmp_path / "base")
    imported = surgeon.job.import_peft(tmp_path / "adapter", str(tmp_path / "base"))
    shapes = {r.target.path: r.added for r in job.plan.rewrites}
    assert {r.target.path: r.added for r in imported.plan.rewrites} == shapes
    assert (run(imported.model, ids) - run(loaded, ids)).abs().max() <= 1e-5


def test_gpt2_slices_refuse_export(tmp_path):
    job = surgeon.apply(KVF, _build("gpt2"), seed=0)
    with pytest.raises(ExportError, match="k/v slice of the fused transformer.h.0.attn.c_attn has no PEFT equivalent"):
        job.save(tmp_path / "adapter", format="peft")
