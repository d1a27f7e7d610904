"""The LongLoRA recipe as one spec (specs/longlora.peft) on a tiny Llama trained at 64 tokens:
it trains at 4x the length (S2-Attn in training), saves and loads as a run, merges to a stock
checkpoint whose config carries the new rope_parameters (transformers loads it and gives the same
logits), and reverts bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from conftest import assert_same_model, clone

import surgeon

SPEC = (Path(__file__).parent.parent / "specs" / "longlora.peft").read_text()
TRAINED, LONG = 64, 256


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=TRAINED,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def test_the_longlora_spec_trains_long_saves_merges_to_a_stock_checkpoint_and_reverts(tmp_path):
    model = tiny()
    original = clone(model)
    job = surgeon.apply(SPEC, model, seed=0)
    pattern = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(1))
    ids = pattern.repeat(2, LONG // 32)  # 4x the trained length; groups of 64
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # 4.85 -> 4.00 when written
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits

    job.save(tmp_path / "run")
    fresh = tiny()
    loaded = surgeon.load(tmp_path / "run", fresh)
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - trained).abs().max() <= 1e-6
    loaded.revert()
    assert_same_model(fresh, original)

    job.merge()
    with surgeon.whole_model(model):
        model.save_pretrained(tmp_path / "merged")
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert stock.config.rope_parameters["rope_type"] == "linear" and stock.config.rope_parameters["factor"] == 4.0
    with torch.no_grad():
        assert (stock(input_ids=ids).logits - trained).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)
    assert model.config._attn_implementation == "sdpa"
