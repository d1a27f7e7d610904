"""ReLoRA: restarts merge B A into the base and reset A, B and their optimizer state; revert gives W0."""

import pytest
import torch
from conftest import assert_same_model, batch, clone, run, tiny_gpt2, tiny_llama

import surgeon
from surgeon.errors import ExportError, SpecError, SurgeonError
from surgeon.methods.base import registry
from surgeon.methods.weights.relora import jagged_cosine_schedule, schedule_for

QV = "inject relora r=2 alpha=4 restart_every=3 into *.attn.<q,v>"


def _train(model, job, steps, lr=1e-2, scheduler=None, after_restart=None):
    """AdamW on the job's parameters; job.step after every optimizer step; returns the losses."""
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=lr)
    ids = batch(shape=(4, 16))
    losses = []
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        job.step(step, optimizer)
        if scheduler is not None:
            scheduler.step()
        if after_restart is not None:
            after_restart(step, optimizer)
        losses.append(loss.item())
    return losses, optimizer


def test_step_zero_is_the_original_and_trainable_count_is_r_times_d_in_plus_d_out(llama):
    original = clone(llama)
    ids = batch()
    job = surgeon.apply(QV, llama, seed=0)
    assert torch.equal(run(llama, ids), run(original, ids))
    c = original.config
    head_dim = c.hidden_size // c.num_attention_heads
    q_out, v_out = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim  # 64, 32
    by_hand = c.num_hidden_layers * 2 * ((c.hidden_size + q_out) + (c.hidden_size + v_out))  # 2*2*(128+96)
    assert by_hand == 896
    assert sum(p.numel() for p in job.trainable_parameters().values()) == by_hand
    assert job.plan.added_parameters == by_hand


def test_two_restarts_give_rank_above_r_and_revert_is_still_bit_exact():
    model = tiny_llama().train()
    original = clone(model)
    w0 = original.model.layers[0].self_attn.q_proj.weight.detach().clone()
    job = surgeon.apply(QV, model, seed=0)
    wrapper = model.model.layers[0].self_attn.q_proj
    seen = {}

    def look(step, optimizer):
        if step % 3 == 0:  # right after a restart
            seen[step] = {
                "moments": [optimizer.state[p][k].abs().max().item() for p in (wrapper.lora_A, wrapper.lora_B)
                            for k in ("exp_avg", "exp_avg_sq")],
                "b": wrapper.lora_B.abs().max().item(),
                "delta": wrapper.base.weight.detach() - w0,
            }

    _train(model, job, 6, lr=2e-2, after_restart=look)
    assert set(seen) == {3, 6}
    for step, found in seen.items():
        assert found["moments"] == [0.0] * 4, step  # Adam's moments of A and B zeroed at the restart
        assert found["b"] == 0.0  # B zero again: the restart does not change the function
    assert torch.linalg.matrix_rank(seen[3]["delta"]).item() == 2  # one cycle: rank r
    rank = torch.linalg.matrix_rank(seen[6]["delta"]).item()
    assert 2 < rank <= 4, rank  # two cycles: above r (up to 2r)
    assert model.model.layers[0].self_attn.q_proj.base.weight is not original.model.layers[0].self_attn.q_proj.weight
    job.revert()
    assert_same_model(model, original)


def test_a_restart_keeps_the_function_and_draws_a_new_a():
    model = tiny_llama()
    job = surgeon.apply("inject relora r=2 alpha=4 restart_every=2 into *.attn.q", model, seed=0)
    _train(model, job, 1, lr=5e-2)  # one step: B is non-zero, no restart yet
    wrapper = model.model.layers[1].self_attn.q_proj
    a_before, ids = wrapper.lora_A.detach().clone(), batch()
    before = run(model, ids)
    optimizer = torch.optim.AdamW(job.trainable_parameters().values())
    job.step(1, optimizer)  # not a multiple of restart_every: nothing happens
    assert torch.equal(wrapper.lora_A, a_before)
    job.step(2, optimizer)
    assert not torch.equal(wrapper.lora_A, a_before) and wrapper.lora_B.abs().max() == 0
    assert (run(model, ids) - before).abs().max() <= 1e-5


def test_training_lowers_the_loss_across_restarts_with_the_jagged_schedule():
    model = tiny_llama().train()
    original = clone(model)
    job = surgeon.apply("inject relora r=4 alpha=8 restart_every=4 warmup=1 min_lr_ratio=0.1 into *.attn.<q,v>",
                        model, seed=0)
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=2e-2)
    scheduler = schedule_for(job, optimizer, total_steps=12)
    assert optimizer.param_groups[0]["lr"] == 0.0  # step 0 of the first warm-up
    ids = batch(shape=(4, 16))
    losses = []
    for step in range(1, 13):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        job.step(step, optimizer)
        scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    job.revert()
    assert_same_model(model, original)


def test_jagged_schedule_matches_a_hand_computed_list():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = jagged_cosine_schedule(optimizer, total_steps=10, restart_every=4, warmup=2, min_lr_ratio=0.2)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    # cosine c(s) = 0.2 + 0.4 * (1 + cos(pi * (s - 2) / 8)) after a 2-step warm-up; after each restart
    # (s = 4, 8) a 2-step ramp from 0 to c(restart + 2)
    by_hand = [
        0.0,                      # s=0: warm-up 0/2
        0.5,                      # s=1: warm-up 1/2
        1.0,                      # s=2: c(2) = 0.2 + 0.4 * 2
        0.2 + 0.4 * 1.9238795,    # s=3: cos(pi/8) = 0.9238795
        0.0,                      # s=4: restart, ramp 0/2
        0.5 * 0.6,                # s=5: ramp 1/2 of c(6) = 0.2 + 0.4 * 1
        0.6,                      # s=6: c(6)
        0.2 + 0.4 * 0.6173166,    # s=7: cos(5 pi/8) = -0.3826834
        0.0,                      # s=8: restart, ramp 0/2
        0.5 * 0.2,                # s=9: ramp 1/2 of c(10) = 0.2
        0.2,                      # s=10: c(10), the floor
    ]
    assert lrs == pytest.approx([0.5 * m for m in by_hand], abs=1e-6)


def test_schedule_rejects_bad_arguments():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(SurgeonError, match="warmup=4 must be shorter than restart_every=4"):
        jagged_cosine_schedule(optimizer, total_steps=10, restart_every=4, warmup=4)


def test_magnitude_reset_prunes_the_smallest_half():
    model = tiny_llama().train()
    job = surgeon.apply("inject relora r=2 restart_every=2 optimizer_reset=magnitude prune_ratio=0.5 "
                        "into model.layers.0.self_attn.q_proj", model, seed=0)
    wrapper = model.model.layers[0].self_attn.q_proj
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=1e-2)
    ids = batch()
    for step in (1, 2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        before = optimizer.state[wrapper.lora_A]["exp_avg"].clone()
        job.step(step, optimizer)
    after = optimizer.state[wrapper.lora_A]["exp_avg"]
    threshold = before.abs().flatten().sort().values[before.numel() // 2 - 1]  # the median, by hand
    assert torch.equal(after, torch.where(before.abs() > threshold, before, torch.zeros_like(before)))
    assert (after == 0).sum().item() == before.numel() // 2


def test_merge_equals_unmerged_after_restarts_and_revert_gives_w0():
    model = tiny_gpt2().train()
    original = clone(model)
    job = surgeon.apply("inject relora r=2 alpha=4 restart_every=2 into *.attn.<q,v>", model, seed=0)
    _train(model, job, 3, lr=2e-2)  # one restart, then one more step: B A is non-zero
    c_attn = model.transformer.h[0].attn.c_attn
    d = model.config.n_embd
    w0 = original.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out); columns d:2d are k
    assert torch.equal(c_attn.base.weight[:, d:2 * d], w0[:, d:2 * d])  # k untouched by the restart
    assert not torch.equal(c_attn.base.weight[:, :d], w0[:, :d])  # q moved
    assert c_attn.lora_B_q.abs().max() > 0
    ids = batch()
    unmerged = run(model.eval(), ids)
    job.merge()
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in model.modules())
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    job.step(4, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))  # merged: no restart any more
    job.revert()
    assert_same_model(model.train(), original)


def test_bad_input_is_a_clear_error(llama):
    before = clone(llama)
    with pytest.raises(SpecError, match=r"1:19: error: bad value 0 for 'restart_every': .*greater than or equal to 1"):
        surgeon.apply("inject relora r=4 restart_every=0 into *.attn.q", llama)
    with pytest.raises(SpecError, match="warmup=9 must be shorter than restart_every=5"):
        surgeon.apply("inject relora r=4 restart_every=5 warmup=9 into *.attn.q", llama)
    with pytest.raises(SpecError, match="relora accepts conv1d, linear"):
        surgeon.apply("inject relora r=4 restart_every=5 into embed", llama)
    assert_same_model(llama, before)


def test_restart_without_the_optimizer_is_an_error(llama):
    job = surgeon.apply("inject relora r=2 restart_every=2 into *.attn.q", llama, seed=0)
    weight = llama.model.layers[0].self_attn.q_proj.base.weight
    job.step(1)  # no restart due: fine without an optimizer
    with pytest.raises(SurgeonError, match="must reset the optimizer's state"):
        job.step(2)
    with pytest.raises(SurgeonError, match="does not hold this ReLoRA's A and B"):
        job.step(2, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    assert llama.model.layers[0].self_attn.q_proj.base.weight is weight  # nothing changed before the error
    job.step(2, torch.optim.AdamW(job.trainable_parameters().values()))  # the same step again, right this time
    assert llama.model.layers[0].self_attn.q_proj.base.weight is not weight


def test_quantized_base_is_rejected_at_plan_time(llama):
    before = clone(llama)
    spec = "quantize base nf4 double compute=fp32\ninject relora r=2 restart_every=3 into *.attn.<q,v>"
    with pytest.raises(SpecError, match=r"2:1: error: 'inject relora' cannot stack on 'quantize quantize' at "
                                        r"model.layers.0.self_attn.q_proj: a restart merges B A into the base"):
        surgeon.apply(spec, llama)
    assert_same_model(llama, before)


def test_a_missing_required_parameter_names_it(llama):
    with pytest.raises(SpecError, match="relora needs parameter 'restart_every'") as info:
        surgeon.apply("inject relora r=2 into *.attn.q", llama)
    assert "restart_every=..." in str(info.value)


def test_relora_has_no_peft_equivalent():
    method = registry()[("inject", "relora")]
    params = method.Params(r=2, restart_every=3)
    target = surgeon.check("inject relora r=2 restart_every=3 into *.attn.q", tiny_llama()).rewrites[0].target
    assert method.peft_type is None
    calls = [lambda: method.peft_config(params), lambda: method.to_peft_tensors(target, params, {}),
             lambda: method.from_peft_tensors(target, params, {}),
             lambda: method.statement_from_peft({}, [target.path])]
    for call in calls:
        with pytest.raises(ExportError, match="relora has no PEFT equivalent"):
            call()


def test_a_run_saved_after_restarts_loads_with_its_folded_weights_and_reverts_to_w0(tmp_path):
    model = tiny_llama().train()
    original = clone(model)
    job = surgeon.apply(QV, model, seed=0)
    _train(model, job, 7, lr=2e-2)  # restarts at 3 and 6, one step into the third cycle
    ids = batch()
    trained = run(model, ids)
    job.save(tmp_path / "run")
    fresh = clone(original)
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert torch.equal(run(fresh, ids), trained)  # the folded cycles came back, bit for bit
    assert not torch.equal(fresh.model.layers[0].self_attn.q_proj.base.weight,
                           original.model.layers[0].self_attn.q_proj.weight)
    loaded.revert()
    assert_same_model(fresh, original)
