"""DoRA: parity with PEFT's LoraConfig(use_dora=True) (outputs and gradients), the magnitude's
initialisation, trainable counts by hand, training, merge, exact revert, QLoRA-style composition,
PEFT interchange and errors."""

import pytest
import torch
from conftest import (BUILDERS, assert_merge_keeps_outputs_and_reverts, assert_same_model, batch, clone, run,
                      tiny_llama, train_losses)
from peft_twin import bnb_dequantized, with_random_biases
from torch import nn

import surgeon
from surgeon.errors import ExportError, SpecError
from surgeon.methods.weights.dora import Dora
from surgeon.planner import params_of

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

CASES = [  # arch, surgeon spec, PEFT target_modules, PEFT options
    ("llama", "inject dora r=4 alpha=8 into *.attn.<q,v>", ["q_proj", "v_proj"], {"lora_alpha": 8}),
    ("llama", "inject dora r=4 alpha=8 rslora=true into *.mlp.down", ["down_proj"],
     {"lora_alpha": 8, "use_rslora": True}),
    ("gpt2", "inject dora r=4 alpha=16 into c_attn", ["c_attn"], {"lora_alpha": 16, "fan_in_fan_out": True}),
    ("bert", "inject dora r=4 into *.attn.<q,v>", ["query", "value"], {"lora_alpha": 4}),
]


def _build(arch: str) -> nn.Module:
    return with_random_biases(BUILDERS[arch]())


def _randomize(job: surgeon.Job, seed: int = 3) -> None:
    """Non-zero A and B; magnitudes moved off their initial norms (kept positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in job.trainable_parameters().items():
            noise = torch.randn(param.shape, generator=generator)
            if "magnitude" in name:
                param.mul_(1 + 0.3 * noise.tanh())
            else:
                param.copy_(noise * 0.2)


def _into_peft(job: surgeon.Job, peft_model: nn.Module) -> None:
    """Our tensors, through Dora.to_peft_tensors, loaded with PEFT's own loader."""
    state = {}
    for rewrite, patch in job._surgery.patches:
        if rewrite.method != "dora":  # the quantize rewrites of a quantized base add nothing
            continue
        local = {n: p.detach() for n, p in patch.added_parameters().items()}
        for name, tensor in Dora.to_peft_tensors(rewrite.target, params_of(rewrite), local).items():
            state[f"base_model.model.{rewrite.target.path}.{name}"] = tensor.clone()
    result = peft.set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]


def _peft_twin(arch: str, spec: str, modules: list[str], extra: dict):
    """(our job, our model, PEFT's model) on two copies of one model, the same non-zero weights in both."""
    ours = _build(arch)
    theirs = clone(ours)
    job = surgeon.apply(spec, ours, seed=0)
    config = peft.LoraConfig(r=4, target_modules=modules, use_dora=True, **{"lora_dropout": 0.0, **extra})
    peft_model = peft.get_peft_model(theirs, config)
    _randomize(job)
    _into_peft(job, peft_model)
    return job, ours, peft_model


@pytest.mark.parametrize(("arch", "spec", "modules", "extra"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_same_weights_same_outputs_and_gradients_as_peft(arch, spec, modules, extra):
    job, ours, peft_model = _peft_twin(arch, spec, modules, extra)
    ids = batch()
    reference = run(peft_model, ids)
    assert (reference - run(_build(arch), ids)).abs().max() > 1e-3  # the delta is not zero
    assert (run(ours, ids) - reference).abs().max() <= 1e-5
    peft_params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in job.trainable_parameters().values()) == sum(p.numel() for p in peft_params.values())
    # the same gradients: the norm is detached in both (a norm with gradient gives other magnitude grads)
    for model in (ours, peft_model):
        out = model(input_ids=ids)
        (out.logits if hasattr(out, "logits") else out.last_hidden_state).square().mean().backward()
    for name, param in job.trainable_parameters().items():
        path, _, local = name.rpartition(".")
        theirs = peft_params[f"base_model.model.{path}.{local}.default.weight"]
        assert (param.grad - theirs.grad).abs().max() <= 1e-5 * max(1.0, theirs.grad.abs().max().item()), name


def test_dropout_in_training_matches_peft():
    """PEFT applies the dropped input to the W0 x term as well; the same random masks give the same outputs."""
    spec = "inject dora r=4 alpha=8 dropout=0.3 into *.attn.<q,v>"
    job, ours, peft_model = _peft_twin("llama", spec, ["q_proj", "v_proj"], {"lora_alpha": 8, "lora_dropout": 0.3})
    ours.train(), peft_model.train()
    ids = batch()
    outputs = []
    for model in (ours, peft_model):
        torch.manual_seed(11)
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5
    torch.manual_seed(12)
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - outputs[0]).abs().max() > 1e-4  # dropout does act


def _dora_params_by_hand(model: nn.Module, r: int) -> int:
    """r*(d_in+d_out) + d_out over every q and v projection, from the config."""
    c = model.config
    d = getattr(c, "hidden_size", None) or c.n_embd
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    kv = getattr(c, "num_key_value_heads", None) or heads
    q_out, v_out = d, kv * (d // heads)
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    return layers * (r * (d + q_out) + q_out + r * (d + v_out) + v_out)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_step0_equals_original_and_counts_by_hand(arch):
    model = _build(arch)
    original = clone(model)
    job = surgeon.apply("inject dora r=4 into *.attn.<q,v>", model, seed=0)
    ids = batch()
    assert torch.equal(run(model, ids), run(original, ids))
    count = sum(p.numel() for p in job.trainable_parameters().values())
    assert count == job.plan.added_parameters == _dora_params_by_hand(original, 4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(job.trainable_parameters())


def test_magnitude_starts_at_the_row_norms_of_w0():
    model = tiny_llama()
    original = clone(model)
    surgeon.apply("inject dora r=4 init=kaiming into *.attn.q", model, seed=0)
    wrapper = model.model.layers[1].self_attn.q_proj
    w0 = original.model.layers[1].self_attn.q_proj.weight
    assert torch.allclose(wrapper.lora_magnitude_vector, w0.norm(dim=1), rtol=1e-6)
    assert wrapper.lora_B.abs().sum() == 0 and wrapper.lora_A.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_lowers_the_loss_and_revert_is_exact(arch):
    model = _build(arch).train()
    original = clone(model)
    job = surgeon.apply("inject dora r=4 alpha=8 into *.attn.<q,v>", model, seed=0)
    losses = train_losses(model, job.trainable_parameters().values(), steps=8, lr=5e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in job.trainable_parameters().values())
    job.revert()
    assert_same_model(model, original)


def test_gpt2_slices_leave_k_exact_and_follow_the_formula():
    model = _build("gpt2")
    original = clone(model)
    job = surgeon.apply("inject dora r=4 alpha=8 into *.attn.<q,v>", model, seed=0)
    _randomize(job)
    d = model.config.n_embd
    wrapper, base = model.transformer.h[0].attn.c_attn, original.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        out, plain = wrapper(x), base(x)
        assert torch.equal(out[..., d:2 * d], plain[..., d:2 * d])  # k: bit for bit
        # q by hand: x (m * (W0 + s B A) / ||W0 + s B A||_c)^T + b, with W0 the q rows of c_attn
        w0 = base.weight.T[:d]
        directed = w0 + 2.0 * wrapper.lora_B_q @ wrapper.lora_A_q
        merged = wrapper.lora_magnitude_vector_q[:, None] * directed / directed.norm(dim=1, keepdim=True)
        assert (out[..., :d] - (x @ merged.T + base.bias[:d])).abs().max() <= 1e-5
    with pytest.raises(ExportError, match="slice.*no PEFT equivalent"):
        rewrite = job.plan.rewrites[0]
        Dora.to_peft_tensors(rewrite.target, params_of(rewrite), dict(wrapper.named_parameters()))


@pytest.mark.parametrize(("arch", "spec"), [("llama", "inject dora r=4 alpha=8 into *.attn.<q,v>"),
                                            ("gpt2", "inject dora r=4 alpha=8 into *.attn.<q,v>"),
                                            ("bert", "inject dora r=4 alpha=8 into *.mlp.<up,down>")])
def test_merge_equals_unmerged_and_revert_after_merge_is_exact(arch, spec):
    model = _build(arch)
    original = clone(model)
    job = surgeon.apply(spec, model, seed=0)
    _randomize(job)
    assert_merge_keeps_outputs_and_reverts(model, original, job, batch())


def test_merged_weight_is_magnitude_times_direction():
    model = tiny_llama()
    original = clone(model)
    job = surgeon.apply("inject dora r=4 alpha=8 into *.attn.v", model, seed=0)
    _randomize(job)
    wrapper = model.model.layers[0].self_attn.v_proj
    m, a, b = (t.detach().clone() for t in (wrapper.lora_magnitude_vector, wrapper.lora_A, wrapper.lora_B))
    job.merge()
    directed = original.model.layers[0].self_attn.v_proj.weight + 2.0 * b @ a
    expected = m[:, None] * directed / directed.norm(dim=1, keepdim=True)
    assert (model.model.layers[0].self_attn.v_proj.weight - expected).abs().max() <= 1e-6


QDORA = "quantize base nf4 double compute=fp32\ninject dora r=4 alpha=8 into *.attn.<q,v>"


def test_on_a_quantized_base_matches_peft_on_the_dequantized_weights():
    model = tiny_llama()
    reference = bnb_dequantized(model)
    quantized_only = clone(model)
    surgeon.apply("quantize base nf4 double compute=fp32", quantized_only)
    job = surgeon.apply(QDORA, model, seed=0)
    ids = batch()
    assert torch.equal(run(model, ids), run(quantized_only, ids))  # step 0: the quantized model's output
    wrapper = model.model.layers[0].self_attn.q_proj
    assert torch.allclose(wrapper.lora_magnitude_vector, reference.model.layers[0].self_attn.q_proj.weight.norm(dim=1))
    peft_model = peft.get_peft_model(reference, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                use_dora=True))
    _randomize(job)
    _into_peft(job, peft_model)
    expected = run(peft_model, ids)
    assert (expected - run(quantized_only, ids)).abs().max() > 1e-3
    assert (run(model, ids) - expected).abs().max() <= 1e-5


def test_on_a_quantized_base_trains_merges_and_reverts_exactly():
    model = tiny_llama().train()
    original = clone(model)
    job = surgeon.apply(QDORA, model, seed=0)
    losses = train_losses(model, job.trainable_parameters().values(), steps=6, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    ids = batch(shape=(4, 16))  # the training batch
    model.eval()
    unmerged = run(model, ids)
    job.merge()
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)


def test_peft_hooks_round_trip_and_statement():
    model = tiny_llama()
    job = surgeon.apply("inject dora r=4 alpha=8 dropout=0.1 rslora=true into *.attn.<q,v>", model, seed=0)
    _randomize(job)
    for rewrite, patch in job._surgery.patches:
        ours = {n: p.detach() for n, p in patch.added_parameters().items()}
        params = params_of(rewrite)
        exported = Dora.to_peft_tensors(rewrite.target, params, ours)
        assert set(exported) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
        back = Dora.from_peft_tensors(rewrite.target, params, exported)
        assert set(back) == set(ours) and all(torch.equal(back[n], ours[n]) for n in ours)
    params = params_of(job.plan.rewrites[0])
    config = {**Dora.peft_config(params), "peft_type": Dora.peft_type}
    peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}, target_modules=["q_proj"])  # PEFT takes it
    assert config["use_dora"] is True and config["r"] == 4 and config["lora_alpha"] == 8
    targets = [r.target.path for r in job.plan.rewrites]
    statement = Dora.statement_from_peft(config, targets)
    surgeon.parse_spec(statement)
    fresh = tiny_llama()
    again = surgeon.apply(statement, fresh)
    assert [r.target.path for r in again.plan.rewrites] == targets
    assert {(r.method, r.params["r"], r.params["rslora"], r.params["dropout"]) for r in again.plan.rewrites} == {
        ("dora", 4, True, 0.1)}
    assert params_of(again.plan.rewrites[0]).scale == params.scale
    with pytest.raises(ExportError, match="use_dora"):
        Dora.statement_from_peft({**config, "use_dora": False}, targets)


def test_bad_inputs_give_clear_errors():
    model = tiny_llama()
    pristine = clone(model)
    with pytest.raises(SpecError, match=r"1:13.*bad value 0 for 'r'.*greater than or equal to 1"):
        surgeon.apply("inject dora r=0 into *.attn.q", model)
    with pytest.raises(SpecError, match="embed_tokens is a Embedding.*dora accepts conv1d, linear"):
        surgeon.apply("inject dora r=4 into embed", model)
    with pytest.raises(SpecError, match="r=200 is larger than"):
        surgeon.apply("inject dora r=200 into *.attn.v", model)
    assert_same_model(model, pristine)


def test_save_and_load_into_a_fresh_model(tmp_path):
    model = _build("gpt2")
    job = surgeon.apply("inject dora r=4 into *.attn.<q,v>", model, seed=0)
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


EXPORTS = [("llama", "inject dora r=4 alpha=8 into *.attn.<q,v>\ninject dora r=2 alpha=8 into *.mlp.down"),
           ("gpt2", "inject dora r=4 alpha=16 dropout=0.1 into c_attn")]


@pytest.mark.parametrize(("arch", "spec"), EXPORTS)
def test_an_exported_run_loads_in_peft_and_imports_back(tmp_path, arch, spec):
    model = _build(arch)
    fresh = clone(model)
    job = surgeon.apply(spec, model, seed=0)
    _randomize(job)
    job.save(tmp_path / "adapter", format="peft")
    loaded = peft.PeftModel.from_pretrained(clone(fresh), tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].use_dora
    model.eval()
    ids = batch()
    assert (run(model, ids) - run(fresh, ids)).abs().max() > 1e-3
    assert (run(loaded, ids) - run(model, ids)).abs().max() <= 1e-5
    fresh.save_pretrained(tmp_path / "base")
    imported = surgeon.job.import_peft(tmp_path / "adapter", str(tmp_path / "base"))
    assert {r.method for r in imported.plan.rewrites} == {"dora"}
    shapes = {r.target.path: r.added for r in job.plan.rewrites}
    assert {r.target.path: r.added for r in imported.plan.rewrites} == shapes
    assert (run(imported.model, ids) - run(loaded, ids)).abs().max() <= 1e-5


def test_gpt2_slices_refuse_export(tmp_path):
    job = surgeon.apply("inject dora r=4 into *.attn.<q,v>", _build("gpt2"), seed=0)
    with pytest.raises(ExportError, match="q/v slice of the fused transformer.h.0.attn.c_attn has no PEFT equivalent"):
        job.save(tmp_path / "adapter", format="peft")
