"""BitFit: only (chosen) biases train; revert restores their values and flags, and removes added ones."""

import pytest
import torch
from conftest import assert_same_model, batch, clone, run, tiny_bert, tiny_gpt2, tiny_llama, train_losses

import surgeon
from surgeon.errors import ExportError, SpecError
from surgeon.methods.base import registry


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _gpt2_biases(c):
    """Every bias of GPT2LMHeadModel, by name, with its size, from the config (lm_head has none)."""
    d, inner = c.n_embd, c.n_inner or 4 * c.n_embd
    found = {"transformer.ln_f.bias": d}
    for i in range(c.n_layer):
        found |= {f"transformer.h.{i}.ln_1.bias": d, f"transformer.h.{i}.attn.c_attn.bias": 3 * d,
                  f"transformer.h.{i}.attn.c_proj.bias": d, f"transformer.h.{i}.ln_2.bias": d,
                  f"transformer.h.{i}.mlp.c_fc.bias": inner, f"transformer.h.{i}.mlp.c_proj.bias": d}
    return found


def _bert_biases(c):
    d, inner = c.hidden_size, c.intermediate_size
    found = {"embeddings.LayerNorm.bias": d, "pooler.dense.bias": d}
    for i in range(c.num_hidden_layers):
        layer = f"encoder.layer.{i}"
        found |= {f"{layer}.attention.self.query.bias": d, f"{layer}.attention.self.key.bias": d,
                  f"{layer}.attention.self.value.bias": d, f"{layer}.attention.output.dense.bias": d,
                  f"{layer}.attention.output.LayerNorm.bias": d, f"{layer}.intermediate.dense.bias": inner,
                  f"{layer}.output.dense.bias": d, f"{layer}.output.LayerNorm.bias": d}
    return found


@pytest.mark.parametrize("builder, biases, total", [(tiny_gpt2, _gpt2_biases, 2 * 11 * 64 + 64),
                                                     (tiny_bert, _bert_biases, 64 + 2 * (7 * 64 + 128) + 64)])
def test_every_bias_and_nothing_else_trains(builder, biases, total):
    model = builder()
    original = clone(model)
    ids = batch()
    job = surgeon.apply("train bias", model)
    expected = biases(original.config)
    assert sum(expected.values()) == total  # the config's figures agree with the hand count
    trainable = job.trainable_parameters()
    assert set(trainable) == set(expected) == _trainable(model)
    assert {n: p.numel() for n, p in trainable.items()} == expected
    assert torch.equal(run(model, ids), run(original, ids))
    job.revert()
    assert_same_model(model, original)


def test_only_q_v_picks_those_biases():
    bert = tiny_bert()
    job = surgeon.apply("train bias only=<q,v>", bert)
    assert set(job.trainable_parameters()) == {f"encoder.layer.{i}.attention.self.{n}.bias"
                                               for i in range(2) for n in ("query", "value")}
    assert sum(p.numel() for p in job.trainable_parameters().values()) == 2 * 2 * 64
    gpt2 = tiny_gpt2()
    job = surgeon.apply("train bias only=<q,v>", gpt2)  # the fused c_attn bias, as a whole
    assert set(job.trainable_parameters()) == {"transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"}
    assert sum(p.numel() for p in job.trainable_parameters().values()) == 2 * 3 * 64


def test_only_mlp_norm_and_a_target_clause():
    bert = tiny_bert()
    job = surgeon.apply("train bias in encoder.layer.1.** only=<mlp,norm>", bert)
    layer = "encoder.layer.1"
    assert set(job.trainable_parameters()) == {f"{layer}.intermediate.dense.bias", f"{layer}.output.dense.bias",
                                               f"{layer}.attention.output.LayerNorm.bias",
                                               f"{layer}.output.LayerNorm.bias"}
    gpt2 = tiny_gpt2()
    job = surgeon.apply("train bias only=o", gpt2)  # one role without the brackets
    assert set(job.trainable_parameters()) == {f"transformer.h.{i}.attn.c_proj.bias" for i in range(2)}


def test_training_lowers_the_loss_changes_only_biases_and_revert_is_exact():
    model = tiny_gpt2().train()
    model.transformer.wpe.weight.requires_grad_(False)  # a mix of flags for revert to restore
    original = clone(model)
    job = surgeon.apply("train bias", model)
    losses = train_losses(model, job.trainable_parameters().values(), steps=8, lr=5e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    before, now = original.state_dict(), model.state_dict(keep_vars=True)
    biases = set(_gpt2_biases(original.config))
    for name, tensor in before.items():
        if name in biases:
            assert not torch.equal(now[name], tensor), name
        else:
            assert torch.equal(now[name], tensor), name
    job.revert()
    assert_same_model(model, original)
    assert not model.transformer.wpe.weight.requires_grad and model.transformer.wte.weight.requires_grad


def test_llama_without_biases_is_a_clear_error_and_changes_nothing(llama):
    before = clone(llama)
    with pytest.raises(SpecError, match=r"the model has no biases in model\.layers\.0\.self_attn\.q_proj "
                                        r"\(Linear\); add=true adds zero biases"):
        surgeon.apply("train bias", llama)
    with pytest.raises(SpecError, match=r"no biases in model\.layers\.0\.input_layernorm \(LlamaRMSNorm\)"):
        surgeon.apply("train bias only=<norm> add=true", llama)
    assert_same_model(llama, before)


def test_llama_add_true_adds_zero_biases_that_train_and_revert_removes():
    model = tiny_llama().train()
    original = clone(model)
    ids = batch(shape=(4, 16))
    job = surgeon.apply("train bias add=true", model)
    c = original.config
    per_layer = {"self_attn.q_proj": 64, "self_attn.k_proj": 32, "self_attn.v_proj": 32, "self_attn.o_proj": 64,
                 "mlp.gate_proj": 128, "mlp.up_proj": 128, "mlp.down_proj": 64}
    expected = {f"model.layers.{i}.{m}.bias": n for i in range(c.num_hidden_layers) for m, n in per_layer.items()}
    trainable = job.trainable_parameters()
    assert {n: p.numel() for n, p in trainable.items()} == expected
    assert sum(expected.values()) == job.plan.added_parameters == 1024
    assert set(model.state_dict(keep_vars=True)) - set(original.state_dict()) == set(expected)
    assert torch.equal(run(model.eval(), ids), run(original.eval(), ids))  # zero biases: same outputs
    model.train()
    optimizer = torch.optim.AdamW(trainable.values(), lr=5e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.equal(run(model.eval(), ids), run(original.eval(), ids))
    job.revert()
    assert model.model.layers[0].self_attn.q_proj._parameters["bias"] is None
    assert_same_model(model, original)


def test_save_load_merge_and_revert_with_added_biases(tmp_path):
    model = tiny_llama()
    job = surgeon.apply("train bias add=true only=<q,v>", model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator))
    ids = batch()
    expected = run(model, ids)
    job.save(tmp_path / "run")
    fresh = tiny_llama()
    pristine = clone(fresh)
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert torch.equal(run(fresh, ids), expected)
    loaded.merge()
    assert torch.equal(run(fresh, ids), expected)
    loaded.revert()
    assert_same_model(fresh, pristine)


@pytest.mark.parametrize("builder, spec", [
    (tiny_gpt2, "quantize base nf4 double compute=fp32\ntrain bias"),
    (tiny_llama, "quantize base nf4 double compute=fp32\ntrain bias add=true"),  # bias on a QuantizedLinear
    (tiny_bert, "inject lora r=2 into *.attn.<q,v>\ntrain bias only=<q,v,norm>"),  # biases under a LoRA
    (tiny_llama, "inject relora r=2 restart_every=1 into *.attn.q\ntrain bias add=true only=q"),  # and restarts
])
def test_stacks_on_quantize_and_lora_and_reverts_exactly(builder, spec):
    model = builder().train()
    original = clone(model)
    job = surgeon.apply(spec, model, seed=0)
    biases = {n: p for n, p in job.trainable_parameters().items() if n.endswith(".bias")}
    assert biases and not any(n.endswith(".base.bias") for n in biases)  # the original model's names
    at_start = {n: p.detach().clone() for n, p in biases.items()}
    ids = batch(shape=(2, 16))
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=5e-2)
    for step in (1, 2):
        if builder is tiny_bert:
            loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
        else:
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        job.step(step, optimizer)  # ReLoRA restarts under the added bias
    assert all(not torch.equal(p, at_start[n]) for n, p in biases.items())
    job.revert()
    assert_same_model(model, original)


def test_bitfit_has_no_peft_equivalent():
    method = registry()[("train", "bias")]
    params = method.Params()
    target = surgeon.check("train bias", tiny_gpt2()).rewrites[0].target
    assert method.peft_type is None
    calls = [lambda: method.peft_config(params), lambda: method.to_peft_tensors(target, params, {}),
             lambda: method.from_peft_tensors(target, params, {}),
             lambda: method.statement_from_peft({}, [target.path])]
    for call in calls:
        with pytest.raises(ExportError, match="train bias has no PEFT equivalent"):
            call()


def test_check_counts_the_biases_it_makes_trainable(tmp_path):
    """`surgeon check` totals: BitFit adds nothing, it trains the base's own biases; count them."""
    import json

    from typer.testing import CliRunner

    from surgeon.cli import app
    from conftest import tiny_bert

    model = tiny_bert()
    expected = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    plan = surgeon.check("train bias", model)
    assert plan.added_parameters == 0 and plan.trainable_parameters == expected
    spec = tmp_path / "bitfit.peft"
    spec.write_text("train bias only=<q,v>")
    model.save_pretrained(tmp_path / "bert")
    result = CliRunner().invoke(app, ["check", str(spec), str(tmp_path / "bert"), "--json"])
    assert result.exit_code == 0, result.output
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    summary = json.loads(result.output)
    assert summary["totals"]["trainable_parameters"] == 2 * hidden * layers
    assert summary["per_method"] == {"train bias": 2 * hidden * layers}
    assert {r["target"].rsplit(".", 1)[-1] for r in summary["rewrites"]} == {"query", "value"}  # only the chosen


@pytest.mark.parametrize("method", ["lora r=2", "dora r=2", "loha r=2", "lokr r=2", "ia3", "relora r=2 restart_every=5",
                                    "adalora init_r=4 target_r=2 total_steps=10"])
def test_bitfit_beside_a_weight_delta_method_trains_merges_and_reverts(method):
    """`train bias` on the layers another method wraps: the bias under the wrapper trains, the merged
    model computes what the patched one does, and revert gives every tensor back."""
    model = tiny_gpt2().train()
    original = clone(model)
    job = surgeon.apply(f"inject {method} into *.attn.<q,v>\ntrain bias only=<q,v>", model, seed=0)
    biases = {n for n in job.trainable_parameters() if n.endswith("c_attn.bias")}
    assert biases == {f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)}
    losses = train_losses(model, job.trainable_parameters().values(), steps=4, lr=1e-2)  # moves every delta off 0
    assert losses[-1] < losses[0]
    assert not torch.equal(model.transformer.h[0].attn.c_attn.base.bias, original.transformer.h[0].attn.c_attn.bias)
    ids = batch()
    model.eval()
    unmerged = run(model, ids)
    job.merge()
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model.train(), original)
