"""LoRA through the whole pipeline: apply, train, save/load, merge, revert — on several architectures."""

import math

import pytest
import torch
from conftest import (BUILDERS, assert_merge_keeps_outputs_and_reverts, assert_same_model, batch, clone, run,
                      tiny_gpt2, tiny_llama)
from torch import nn

import surgeon

ARCHS = ["llama", "gpt2", "bert", "t5", "qwen2", "mistral", "bert_mlm", "bert_cls"]


def qv_params_by_hand(model: nn.Module, r: int) -> int:
    """r*(d_in+d_out) summed over every q and v projection, read off the config, not off surgeon."""
    c = model.config
    d = c.hidden_size if hasattr(c, "hidden_size") else c.d_model
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    if getattr(c, "model_type", "") == "t5":
        head_dim, kv = c.d_kv, heads
    q_out, v_out = heads * head_dim, kv * head_dim
    layers = c.num_hidden_layers if c.model_type != "t5" else c.num_layers + c.num_decoder_layers
    return layers * r * ((d + q_out) + (d + v_out))


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_keeps_outputs_and_trains_only_lora(arch):
    model = BUILDERS[arch]()
    original = clone(model)
    ids = batch()
    job = surgeon.apply("inject lora r=4 alpha=8 into *.attn.<q,v>", model, seed=0)
    assert torch.equal(run(model, ids), run(original, ids))
    trainable = job.trainable_parameters()
    assert sum(p.numel() for p in trainable.values()) == qv_params_by_hand(original, 4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if any(p is q for q in trainable.values())}
    assert job.plan.added_parameters == qv_params_by_hand(original, 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_training_lowers_the_loss_and_revert_is_exact(arch):
    model = BUILDERS[arch]().train()
    original = clone(model)
    job = surgeon.apply("inject lora r=4 alpha=8 into *.attn.<q,v>", model, seed=0)
    ids = batch(shape=(4, 16))
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=1e-2)
    losses = []
    for _ in range(8):
        kwargs = {"decoder_input_ids": ids} if arch == "t5" else {}
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.equal(run(model.eval(), ids), run(original.eval(), ids))
    job.revert()
    assert_same_model(model, original)


def test_gpt2_k_slice_stays_exact_through_training(gpt2):
    original = clone(gpt2)
    job = surgeon.apply("inject lora r=4 into *.attn.<q,v>", gpt2, seed=0)
    optimizer = torch.optim.SGD(job.trainable_parameters().values(), lr=0.5)
    ids = batch(shape=(2, 16))
    for _ in range(3):
        gpt2.zero_grad()
        gpt2(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    captured = {}
    d = gpt2.config.n_embd
    handles = [m.register_forward_hook(lambda mod, i, o, key=key: captured.__setitem__(key, o.detach()))
               for key, m in (("patched", gpt2.transformer.h[0].attn.c_attn), ("original", original.transformer.h[0].attn.c_attn))]
    x = torch.randn(2, 5, d)
    patched_out = gpt2.transformer.h[0].attn.c_attn(x)
    original_out = original.transformer.h[0].attn.c_attn.base(x) if hasattr(original.transformer.h[0].attn.c_attn, "base") else original.transformer.h[0].attn.c_attn(x)
    for h in handles:
        h.remove()
    assert torch.equal(patched_out[..., d:2 * d], original_out[..., d:2 * d])  # k: bit for bit
    assert not torch.allclose(patched_out[..., :d], original_out[..., :d])  # q trained
    assert not torch.allclose(patched_out[..., 2 * d:], original_out[..., 2 * d:])  # v trained
    # and the delta on q is exactly (alpha/r) x A^T B^T, computed by hand
    wrapper = gpt2.transformer.h[0].attn.c_attn
    by_hand = x @ wrapper.lora_A_q.T @ wrapper.lora_B_q.T * 1.0
    assert torch.allclose(patched_out[..., :d] - original_out[..., :d], by_hand, atol=1e-5)


def _randomize(job: surgeon.Job, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "bert_mlm", "bert_cls"])
def test_merge_equals_unmerged_and_revert_after_merge_is_exact(arch):
    model = BUILDERS[arch]()
    original = clone(model)
    job = surgeon.apply("inject lora r=4 alpha=8 into *.attn.<q,v>", model, seed=0)
    _randomize(job)
    assert_merge_keeps_outputs_and_reverts(model, original, job, batch())


def test_rslora_and_dropout_and_kaiming_options(llama):
    ids = batch()
    job = surgeon.apply("inject lora r=4 alpha=8 rslora=true dropout=0.5 init=kaiming into *.attn.q", llama, seed=0)
    wrapper = llama.model.layers[0].self_attn.q_proj
    assert wrapper.scale == pytest.approx(8 / math.sqrt(4))
    bound = 1 / math.sqrt(llama.config.hidden_size)  # kaiming_uniform(a=sqrt(5)) bound for fan_in=64
    assert wrapper.lora_A.abs().max() <= bound and wrapper.lora_A.abs().max() > bound / 2
    _randomize(job)
    llama.train()
    assert not torch.equal(run(llama, ids), run(llama, ids))  # dropout is active in training
    llama.eval()
    assert torch.equal(run(llama, ids), run(llama, ids))


def test_gaussian_init_is_std_one_over_r():
    model = tiny_llama()
    surgeon.apply("inject lora r=4 into *.mlp.<up,gate>", model, seed=0)
    a = torch.cat([model.model.layers[i].mlp.up_proj.lora_A.flatten() for i in range(2)])
    assert a.std().item() == pytest.approx(1 / 4, rel=0.1)
    assert model.model.layers[0].mlp.up_proj.lora_B.abs().sum() == 0


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, 16, 8)
        x = x.transpose(1, 2).reshape(-1, 8, 4, 4)
        return self.head(self.conv(x).mean((2, 3)))


def test_embedding_and_conv2d_merge_equals_forward():
    torch.manual_seed(0)
    model = ConvNet()
    original = clone(model)
    ids = torch.randint(0, 20, (3, 16))
    job = surgeon.apply("inject lora r=2 alpha=4 into <embed,conv>", model, seed=0)
    assert torch.equal(model(ids), original(ids))
    _randomize(job)
    patched = model(ids)
    assert not torch.allclose(patched, original(ids))
    # by hand: the embedding delta is (alpha/r) * A^T[ids] B^T
    wrapper = model.embed
    by_hand = original.embed(ids) + (wrapper.lora_A.T[ids] @ wrapper.lora_B.T) * 2.0
    assert torch.allclose(model.embed(ids), by_hand, atol=1e-6)
    job.merge()
    assert (model(ids) - patched).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)


def test_bias_lora_only_trains_target_bias_and_revert_restores_it():
    model = tiny_gpt2()
    original = clone(model)
    job = surgeon.apply("inject lora r=2 bias=lora_only into *.attn.o", model, seed=0)
    names = set(job.trainable_parameters())
    assert "transformer.h.0.attn.c_proj.bias" in names
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.base.bias.add_(1.0)
    job.revert()
    assert_same_model(model, original)


def test_save_and_load_into_a_fresh_model(tmp_path):
    model = tiny_llama()
    job = surgeon.apply("inject lora r=4 into *.attn.<q,v>", model, seed=0)
    _randomize(job)
    ids = batch()
    expected = run(model, ids)
    job.save(tmp_path / "run")
    fresh = tiny_llama()
    pristine = clone(fresh)
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert torch.equal(run(fresh, ids), expected)
    assert set(loaded.trainable_parameters()) == set(job.trainable_parameters())
    loaded.revert()
    assert_same_model(fresh, pristine)


def test_merged_run_saved_and_loaded_stays_merged(tmp_path):
    model = tiny_llama()
    job = surgeon.apply("inject lora r=4 into *.attn.<q,v>", model, seed=0)
    _randomize(job)
    ids = batch()
    expected = run(model, ids)
    job.merge()
    job.save(tmp_path / "run")
    fresh = tiny_llama()
    pristine = clone(fresh)
    loaded = surgeon.load(tmp_path / "run", fresh)
    assert isinstance(fresh.model.layers[0].self_attn.q_proj, nn.Linear)
    assert (run(fresh, ids) - expected).abs().max() <= 1e-5
    assert loaded.trainable_parameters() == {}
    loaded.revert()
    assert_same_model(fresh, pristine)


def test_load_refuses_a_different_base_model(tmp_path):
    model = tiny_llama(seed=0)
    surgeon.apply("inject lora r=4 into *.attn.<q,v>", model).save(tmp_path / "run")
    other = tiny_llama(seed=1)
    pristine = clone(other)
    with pytest.raises(surgeon.SurgeonError, match="not the base model.*sha256"):
        surgeon.load(tmp_path / "run", other)
    assert_same_model(other, pristine)


def test_meta_device_apply_is_cheap_and_structural():
    import transformers

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=8, vocab_size=1000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    job = surgeon.apply("inject lora r=8 into *.attn.<q,v>", model)
    assert all(p.device.type == "meta" for p in job.trainable_parameters().values())
    assert len(job.trainable_parameters()) == 4 * 2 * 2
