"""AdaLoRA against Hugging Face PEFT (AdaLoraConfig, RankAllocator): same weights, same outputs;
the same training loop gives the same masks and ranks; budget, counts, merge, revert, errors, interchange."""

import json

import pytest
import torch
from conftest import BUILDERS, assert_same_model, batch, clone, run, tiny_gpt2, tiny_llama
from torch import nn

import surgeon
from surgeon.errors import ExportError, SpecError, SurgeonError
from surgeon.language import parse_spec
from surgeon.methods.weights.adalora import AdaLora, AdaLoraParams, rank_pattern, ranks

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, total_steps=12)
SPEC = "inject adalora init_r=6 target_r=2 tinit=2 tfinal=3 total_steps=12 alpha=12 into *.attn.<q,v>"
CASES = [  # arch, PEFT target_modules, PEFT extra options
    ("llama", ["q_proj", "v_proj"], {}),
    ("gpt2", ["c_attn"], {"fan_in_fan_out": True}),
    ("bert", ["query", "value"], {}),
]


def spec_for(arch: str) -> str:
    return SPEC.replace("*.attn.<q,v>", "c_attn") if arch == "gpt2" else SPEC


def peft_model(model: nn.Module, modules: list[str], **extra) -> nn.Module:
    config = peft.AdaLoraConfig(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=12, lora_alpha=12,
                                target_modules=modules, lora_dropout=0.0, **extra)
    return peft.get_peft_model(model, config)


def peft_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """PEFT's adapter parameters under surgeon's names (`path.lora_A`)."""
    return {n.removeprefix("base_model.model.").replace(".default", ""): p
            for n, p in model.named_parameters() if "lora_" in n}


def by_hand(model: nn.Module, r: int, modules: list[str]) -> int:
    """r*(d_in + d_out) + r for every adapted layer, from the layers' own shapes."""
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in modules:
            d_out, d_in = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
            total += r * (d_in + d_out) + r
    return total


def peft_pattern(model: nn.Module) -> dict[str, list[bool]] | None:
    found = model.peft_config["default"].rank_pattern
    if found is None:
        return None
    return {k.removesuffix(".lora_E.default").removesuffix(".lora_E"): list(v) for k, v in found.items()}


@pytest.mark.parametrize(("arch", "modules", "extra"), CASES, ids=[c[0] for c in CASES])
def test_same_weights_same_outputs_as_peft(arch, modules, extra):
    ours = BUILDERS[arch]()
    theirs = peft_model(clone(ours), modules, **extra)
    ids = batch()
    plain = run(ours, ids)
    job = surgeon.apply(spec_for(arch), ours, seed=0)
    assert torch.equal(run(ours, ids), plain)  # E starts at zero
    reference = peft_params(theirs)
    assert set(reference) == set(job.trainable_parameters())
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in job.trainable_parameters().items():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            reference[name].copy_(param)
    expected = run(theirs, ids)
    assert (expected - plain).abs().max() > 1e-3  # the delta is not zero, so parity means something
    assert (run(ours, ids) - expected).abs().max() <= 1e-5
    assert sum(p.numel() for p in job.trainable_parameters().values()) == by_hand(BUILDERS[arch](), 6, modules)


def test_init_is_peft_s():
    """E zero; A and B drawn from N(0, 0.02^2), as PEFT's reset_lora_parameters."""
    model = tiny_llama()
    surgeon.apply(SPEC, model, seed=0)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_E, torch.zeros(6, 1))
    for weight in (layer.lora_A, layer.lora_B):
        assert abs(weight.std().item() - 0.02) < 0.003 and abs(weight.mean().item()) < 0.003


def _train_both(steps: int, spec: str = SPEC, deltaT: int = 1, probe: bool = True
                ) -> tuple[list, nn.Module, nn.Module, surgeon.Job]:
    """PEFT's documented loop and surgeon's, side by side, from the same initial weights; returns per
    step (loss, PEFT loss, pattern, PEFT pattern, E masks, PEFT E masks, max output difference)."""
    ours = tiny_llama().train()
    # task_type CAUSAL_LM: only then does PeftModel call AdaLoraModel.forward, which adds the orth term
    theirs = peft_model(clone(ours), ["q_proj", "v_proj"], deltaT=deltaT, task_type="CAUSAL_LM")
    job = surgeon.apply(spec, ours, seed=0)
    reference = peft_params(theirs)
    with torch.no_grad():
        for name, param in job.trainable_parameters().items():
            param.copy_(reference[name])
    ours_opt = torch.optim.AdamW(job.trainable_parameters().values(), lr=2e-2)
    theirs_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    ids = batch(shape=(2, 16))
    history = []
    for step in range(steps):
        their_loss = theirs(input_ids=ids, labels=ids).loss  # PEFT adds its orthogonality term here
        their_loss.backward()
        theirs_opt.step()
        theirs.base_model.update_and_allocate(step)
        theirs_opt.zero_grad()

        loss = ours(input_ids=ids, labels=ids).loss + job.regularization()
        loss.backward()
        ours_opt.step()
        job.step(step, ours_opt)
        ours_opt.zero_grad()

        masks = {n.removesuffix(".lora_E"): (p.view(-1) != 0).tolist() for n, p in job.trainable_parameters().items()
                 if n.endswith("lora_E")}
        their_masks = {n.removesuffix(".lora_E"): (p.view(-1) != 0).tolist() for n, p in reference.items()
                       if n.endswith("lora_E")}
        gap = (run(ours, ids) - run(theirs, ids)).abs().max().item() if probe and step % 3 == 0 else 0.0
        history.append((loss.item(), their_loss.item(), rank_pattern(ours), peft_pattern(theirs), masks,
                        their_masks, gap))
    return history, ours, theirs, job


@pytest.fixture(scope="module")
def trained_pair() -> tuple[list, nn.Module, nn.Module, surgeon.Job]:
    """Both loops run past the schedule (total_steps - tfinal = 9) once, for the tests that read them."""
    return _train_both(steps=14)


def test_training_matches_peft_masks_ranks_and_outputs(trained_pair):
    history, ours, theirs, job = trained_pair
    allocations = 0
    for step, (loss, their_loss, pattern, their_pattern, masks, their_masks, gap) in enumerate(history):
        assert loss == pytest.approx(their_loss, abs=1e-4), step
        assert masks == their_masks, step  # the same triplets are zeroed after every step
        if their_pattern is not None:
            allocations += 1
            assert pattern == their_pattern, step
        assert gap <= 1e-4, (step, gap)
    assert allocations >= 8  # steps 3..9 allocate, 9 is the final allocation, 10..13 re-apply it
    # during the budget phase the ranks fall along PEFT's cubic schedule: 24 -> 8 in total
    totals = [sum(sum(kept) for kept in h[3].values()) if h[3] else 24 for h in history]
    assert totals[2] == 24 and totals[3] < 24 and totals == sorted(totals, reverse=True)
    # past total_steps - tfinal the total rank is exactly the budget: target_r per adapted matrix
    final = ranks(ours)
    assert len(final) == 4 and sum(final.values()) == 2 * 4
    kept = sum(int((p != 0).sum()) for n, p in job.trainable_parameters().items() if n.endswith("lora_E"))
    assert kept == 2 * 4
    assert history[-1][0] < history[0][0] - 0.05  # and the loss fell


def test_deltaT_masks_only_every_deltaT_steps():
    spec = SPEC.replace("into", "deltaT=3 into")
    history, *_ = _train_both(steps=9, spec=spec, deltaT=3, probe=False)
    changed = [step for step in range(1, 9) if history[step][3] != history[step - 1][3]]
    assert changed == [3, 6]  # 9 would be the final allocation
    for step, (*_, pattern, their_pattern, masks, their_masks, gap) in enumerate(history):
        assert pattern == (their_pattern or pattern) and masks == their_masks, step


def test_training_lowers_the_loss_and_revert_is_exact():
    model = tiny_llama().train()
    original = clone(model)
    job = surgeon.apply(SPEC, model, seed=0)
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=5e-2)
    ids = batch(shape=(4, 16))
    losses = []
    for step in range(8):  # E starts at zero and A, B are small: AdaLoRA starts slowly
        loss = model(input_ids=ids, labels=ids).loss
        (loss + job.regularization()).backward()
        optimizer.step()
        job.step(step, optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    job.revert()
    assert_same_model(model, original)


def test_regularization_is_peft_s_orthogonality_term():
    model = tiny_llama()
    job = surgeon.apply(SPEC.replace("into", "orth_reg_weight=0.3 into"), model, seed=0)
    norms = []
    for name, p in job.trainable_parameters().items():
        if name.endswith("lora_A"):
            norms.append(torch.linalg.matrix_norm(p @ p.T - torch.eye(6)))
        if name.endswith("lora_B"):
            norms.append(torch.linalg.matrix_norm(p.T @ p - torch.eye(6)))
    assert len(norms) == 8
    assert job.regularization().item() == pytest.approx(0.3 * sum(norms).item() / 8, rel=1e-6)


def test_gpt2_q_v_slices_keep_k_exact_and_share_one_budget():
    model = tiny_gpt2().train()
    original = clone(model)
    spec = "inject adalora init_r=4 target_r=1 tinit=1 tfinal=1 total_steps=5 alpha=4 into *.attn.<q,v>"
    job = surgeon.apply(spec, model, seed=0)
    assert sum(p.numel() for p in job.trainable_parameters().values()) == 2 * 2 * (4 * (64 + 64) + 4)
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=2e-2)
    ids = batch(shape=(2, 16))
    for step in range(7):
        (model(input_ids=ids, labels=ids).loss + job.regularization()).backward()
        optimizer.step()
        job.step(step, optimizer)
        optimizer.zero_grad()
    final = ranks(model)
    assert set(final) == {f"transformer.h.{i}.attn.c_attn.{s}" for i in range(2) for s in "qv"}
    assert sum(final.values()) == 1 * 4
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        patched, plain = model.transformer.h[0].attn.c_attn(x), original.transformer.h[0].attn.c_attn(x)
    assert torch.equal(patched[..., 64:128], plain[..., 64:128])  # k: bit for bit
    assert not torch.allclose(patched[..., :64], plain[..., :64])
    rewrite = job.plan.rewrites[0]
    with pytest.raises(ExportError, match="slice"):
        AdaLora.to_peft_tensors(rewrite.target, AdaLoraParams(**rewrite.params), {})
    job.revert()
    assert_same_model(model, original)


def test_two_statements_keep_two_budgets():
    model = tiny_llama().train()
    spec = ("inject adalora init_r=4 target_r=1 tinit=1 tfinal=1 total_steps=5 into *.attn.q\n"
            "inject adalora init_r=4 target_r=3 tinit=1 tfinal=1 total_steps=5 into *.attn.v")
    job = surgeon.apply(spec, model, seed=0)
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=2e-2)
    ids = batch(shape=(2, 16))
    for step in range(6):
        (model(input_ids=ids, labels=ids).loss + job.regularization()).backward()
        optimizer.step()
        job.step(step, optimizer)
        optimizer.zero_grad()
    final = ranks(model)
    assert sum(v for k, v in final.items() if k.endswith("q_proj")) == 1 * 2
    assert sum(v for k, v in final.items() if k.endswith("v_proj")) == 3 * 2


def test_step_without_gradients_says_when_to_call_it():
    model = tiny_llama()
    job = surgeon.apply(SPEC, model, seed=0)
    with pytest.raises(SurgeonError, match="before optimizer.zero_grad"):
        job.step(0)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(SurgeonError, match="never allocated"):
        job.step(20)  # past total_steps - tfinal with no allocation ever made


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_equals_unmerged_and_revert_after_merge_is_exact(arch):
    model = BUILDERS[arch]()
    original = clone(model)
    job = surgeon.apply(spec_for(arch), model, seed=0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    ids = batch()
    unmerged = run(model, ids)
    assert (unmerged - run(original, ids)).abs().max() > 1e-3
    job.merge()
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in model.modules())
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)


def test_on_a_quantized_base():
    model = tiny_llama().train()
    original = clone(model)
    quantized_only = clone(model)
    surgeon.apply("quantize base nf4 double compute=fp32", quantized_only)
    job = surgeon.apply("quantize base nf4 double compute=fp32\n" + SPEC, model, seed=0)
    ids = batch()
    assert torch.equal(run(model, ids), run(quantized_only, ids))
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=2e-2)
    for step in range(3):
        (model(input_ids=ids, labels=ids).loss + job.regularization()).backward()
        optimizer.step()
        job.step(step, optimizer)
        optimizer.zero_grad()
    unmerged = run(model, ids)
    assert (unmerged - run(quantized_only, ids)).abs().max() > 1e-4
    job.merge()
    assert (run(model, ids) - unmerged).abs().max() <= 1e-4
    job.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize(("spec", "message"), [
    ("inject adalora init_r=4 target_r=8 total_steps=10 into *.attn.q", "target_r=8 is above init_r=4"),
    ("inject adalora tinit=5 tfinal=5 total_steps=10 into *.attn.q", "leaves no budgeting phase"),
    ("inject adalora tinit=8 tfinal=0 total_steps=8 into *.attn.q", "leaves no budgeting phase"),
    ("inject adalora init_r=4 target_r=2 into *.attn.q", "needs total_steps"),
    ("inject adalora init_r=4 beta1=1.5 total_steps=10 into *.attn.q", "beta1"),
    ("inject adalora init_r=100 total_steps=10 into *.attn.v", "init_r=100 is larger"),
    ("inject adalora total_step=10 into *.attn.q", "did you mean 'total_steps'"),
    ("inject adalora init_rank=4 total_steps=10 into *.attn.q", "did you mean 'init_r'"),
])
def test_bad_input_is_refused_at_plan_time(spec, message):
    model = tiny_llama()
    original = clone(model)
    with pytest.raises(SpecError, match=message):
        surgeon.check(spec, model)
    with pytest.raises(SpecError):
        surgeon.apply(spec, model)
    assert_same_model(model, original)


# --- PEFT interchange -----------------------------------------------------------------------------


def _trained_llama(steps: int) -> tuple[nn.Module, surgeon.Job]:
    model = tiny_llama().train()
    job = surgeon.apply(SPEC, model, seed=0)
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=2e-2)
    ids = batch(shape=(2, 16))
    for step in range(steps):
        (model(input_ids=ids, labels=ids).loss + job.regularization()).backward()
        optimizer.step()
        job.step(step, optimizer)
        optimizer.zero_grad()
    return model.eval(), job


def test_peft_saved_names_are_what_to_peft_tensors_writes(tmp_path):
    theirs = peft_model(tiny_llama(), ["q_proj", "v_proj"])
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    model = tiny_llama()
    job = surgeon.apply(SPEC, model, seed=0)
    exported = set()
    for rewrite in job.plan.rewrites:
        local = {n.rsplit(".", 1)[-1]: p for n, p in job.trainable_parameters().items()
                 if n.rsplit(".", 1)[0] == rewrite.target.path}
        names = AdaLora.to_peft_tensors(rewrite.target, AdaLoraParams(**rewrite.params), local)
        exported |= {f"base_model.model.{rewrite.target.path}.{n}" for n in names}
    assert exported == saved
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == AdaLora.peft_type == "ADALORA"


def test_export_to_peft_after_training_gives_the_same_outputs():
    model, job = _trained_llama(steps=11)  # past the schedule: masked triplets hold lambda = 0
    params = AdaLoraParams(**job.plan.rewrites[0].params)
    config = AdaLora.peft_config(params)
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**config, target_modules=["q_proj", "v_proj"]))
    state, trained = {}, job.trainable_parameters()
    for rewrite in job.plan.rewrites:
        local = {n.rsplit(".", 1)[-1]: p.detach() for n, p in trained.items()
                 if n.rsplit(".", 1)[0] == rewrite.target.path}
        exported = AdaLora.to_peft_tensors(rewrite.target, params, local)
        back = AdaLora.from_peft_tensors(rewrite.target, params, exported)
        assert back.keys() == local.keys() and all(torch.equal(back[k], local[k]) for k in local)
        state.update({f"base_model.model.{rewrite.target.path}.{n}": t for n, t in exported.items()})
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not [k for k in result.missing_keys if "lora_" in k]
    ids = batch()
    assert (run(model, ids) - run(tiny_llama(), ids)).abs().max() > 1e-3
    assert (run(theirs.eval(), ids) - run(model, ids)).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore:Adapter 'default'")  # PEFT warns about the layers it cut to rank 0
def test_import_a_peft_adapter_cut_to_its_rank_pattern(tmp_path, trained_pair):
    """PEFT trained past its schedule saves only the kept triplets and a rank_pattern; surgeon pads."""
    theirs = trained_pair[2].eval()
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] is not None
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert min(t.shape[0] for n, t in saved.items() if n.endswith("lora_A")) < 6  # really cut
    model = tiny_llama()
    targets = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    statement = AdaLora.statement_from_peft(config, targets)
    parse_spec(statement, "<peft>")
    job = surgeon.apply(statement, model)
    assert [r.target.path for r in job.plan.rewrites] == targets
    params = AdaLoraParams(**job.plan.rewrites[0].params)
    assert params.init_r == 6 and params.alpha == 12 and params.total_steps == 12 and params.tfinal == 3
    trained = job.trainable_parameters()
    with torch.no_grad():
        for rewrite in job.plan.rewrites:
            prefix = f"base_model.model.{rewrite.target.path}."
            theirs_local = {n.removeprefix(prefix): t for n, t in saved.items() if n.startswith(prefix)}
            for name, tensor in AdaLora.from_peft_tensors(rewrite.target, params, theirs_local).items():
                trained[f"{rewrite.target.path}.{name}"].copy_(tensor)
    ids = batch()
    assert (run(model, ids) - run(tiny_llama(), ids)).abs().max() > 1e-3
    assert (run(model, ids) - run(theirs, ids)).abs().max() <= 1e-5


def test_statement_from_peft_refuses_what_surgeon_lacks():
    with pytest.raises(ExportError, match="alpha_pattern"):
        AdaLora.statement_from_peft({"total_step": 10, "alpha_pattern": {"q_proj": 4}}, ["a.q_proj"])
    with pytest.raises(ExportError, match="bias"):
        AdaLora.statement_from_peft({"total_step": 10, "bias": "all"}, ["a.q_proj"])


def test_saved_run_loads_with_its_masks_and_keeps_them_past_the_schedule(tmp_path):
    model, job = _trained_llama(steps=11)  # past total_steps - tfinal = 9
    job.save(tmp_path / "run")
    pattern = {n: (p.view(-1) != 0).tolist() for n, p in job.trainable_parameters().items() if n.endswith("lora_E")}
    fresh = tiny_llama().train()
    loaded = surgeon.load(tmp_path / "run", fresh)
    ids = batch(shape=(2, 16))
    assert torch.equal(run(fresh.eval(), ids), run(model, ids))
    fresh.train()
    optimizer = torch.optim.AdamW(loaded.trainable_parameters().values(), lr=2e-2)
    (fresh(input_ids=ids, labels=ids).loss + loaded.regularization()).backward()
    optimizer.step()  # revives the masked lambdas for a moment ...
    loaded.step(11, optimizer)  # ... and the final mask, read off the saved zeros, comes back
    after = {n: (p.view(-1) != 0).tolist() for n, p in loaded.trainable_parameters().items() if n.endswith("lora_E")}
    assert after == pattern and sum(sum(v) for v in after.values()) == 2 * 4
    assert ranks(fresh) == ranks(model) and sum(ranks(fresh).values()) == 2 * 4
