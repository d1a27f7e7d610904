"""The attend statements on live models, each against an independent reference: transformers' own
Mistral for the window, a per-pair full-sequence oracle (tests/attention_oracle.py) for sinks,
ReRoPE, ALiBi and log-n, LongLoRA's `forward_noflashattn` (copied below) for S2-Attn, Bloom's
slopes for ALiBi. Llama, Qwen2, Mistral and GPT-NeoX (partial rotary), eager and SDPA, with and
without a KV cache. Revert is exact, `_attn_implementation` back on every config."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from attention_oracle import Pairs, absolute, logits_of
from conftest import assert_same_model, clone, tiny_gpt2
from test_rope import build

import surgeon
from surgeon.errors import SpecError, SurgeonError

KINDS = ["llama", "qwen2", "mistral", "gpt_neox"]
ATTENTIONS = ["sdpa", "eager"]


def ids_of(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def decoded(model: torch.nn.Module, ids: torch.Tensor, prompt: int) -> tuple[torch.Tensor, object]:
    """Logits of a prefill of `prompt` tokens and then one token at a time through the cache."""
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    return torch.cat(steps, dim=1), cache


def implementations(model: torch.nn.Module) -> list:
    return [c.__dict__["_attn_implementation_internal"] for c in {id(m.config): m.config for m in model.modules()
                                                                  if hasattr(m, "config")}.values()]


def applied_and_reverted(model: torch.nn.Module, spec: str, check) -> None:
    """Apply `spec`, run `check(model)`, revert: the model and its configs as they were."""
    original, before, config = clone(model), implementations(model), model.config
    job = surgeon.apply(spec, model, seed=0)
    assert all(i.startswith("surgeon_") for i in implementations(model))
    check(model)
    job.revert()
    assert_same_model(model, original)
    assert implementations(model) == before
    buffers = dict(original.named_buffers())  # non-persistent ones too (inv_freq), which state_dict leaves out
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers()) and len(buffers) == len(dict(
        model.named_buffers()))
    assert model.config.to_dict() == original.config.to_dict()
    assert model.config is config


# --- the oracle itself --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_oracle_with_true_positions_is_the_model(kind):
    model, ids = build(kind, "sdpa"), ids_of(40)
    assert (logits_of(model, ids, absolute) - logits(model, ids)).abs().max() <= 1e-5


# --- attend window --------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_window_on_llama_is_mistral_with_a_sliding_window(attention):
    model = build("llama", attention)
    mistral = build("mistral", attention, sliding_window=8)
    mistral.load_state_dict(model.state_dict())
    ids = ids_of(40)

    def check(patched):
        assert (logits(patched, ids) - logits(mistral, ids)).abs().max() <= 1e-6
        steps, cache = decoded(patched, ids, 12)
        assert (steps - logits(mistral, ids)).abs().max() <= 1e-5
        assert all(layer.keys.shape[-2] == 7 for layer in cache.layers)  # window - 1 kept between steps
        assert cache.get_seq_length() == 40
        prompt = dict(input_ids=ids[:, :10], attention_mask=torch.ones_like(ids[:, :10]), max_new_tokens=30,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(patched.generate(**prompt), mistral.generate(**prompt))

    applied_and_reverted(model, "attend window size=8", check)


def window_pairs(size: int):
    def pairs(length: int) -> Pairs:
        base = absolute(length)
        t = torch.arange(length)
        base.allowed &= t[None, :] > t[:, None] - size
        return base
    return pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_window_equals_the_masked_reference(kind, attention):
    model, ids = build(kind, attention), ids_of(40)
    reference = logits_of(clone(model), ids, window_pairs(8))

    def check(patched):
        assert (logits(patched, ids) - reference).abs().max() <= 1e-5
        assert (decoded(patched, ids, 12)[0] - reference).abs().max() <= 1e-5

    applied_and_reverted(model, "attend window size=8", check)


def test_window_on_some_layers_masks_them_and_keeps_the_cache_whole():
    model, ids = build("llama", "sdpa"), ids_of(30)
    surgeon.apply("attend window size=4 in layers.0.attn", model)
    steps, cache = decoded(model, ids, 10)
    assert cache.layers[0].keys.shape[-2] == 30  # not bounded: not every layer has the window
    plain = build("llama", "sdpa")
    assert (logits(model, ids) - logits(plain, ids)).abs().max() > 1e-3
    assert (steps - logits(model, ids)).abs().max() <= 1e-5


# --- attend sinks ---------------------------------------------------------------------------------


def sink_pairs(tokens: int, window: int):
    """StreamingLLM's positions within the cache: window keys at their true distance t - j, sinks at
    min(t, tokens + window - 1) - j (the query's slot in the cache)."""
    def pairs(length: int) -> Pairs:
        t = torch.arange(length, dtype=torch.float64)
        slot = t.clamp(max=tokens + window - 1)
        sink = t[None, :] < tokens
        key = torch.where(sink, t[None, :], slot[:, None] - (t[:, None] - t[None, :]))
        allowed = (t[None, :] <= t[:, None]) & (sink | (t[None, :] > t[:, None] - window))
        return Pairs(slot, key, allowed)
    return pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_sinks_each_decode_step_equals_the_streaming_reference(kind, attention):
    model, ids = build(kind, attention), ids_of(60, batch=1)
    reference = logits_of(clone(model), ids, sink_pairs(2, 6))

    def check(patched):
        assert (logits(patched, ids) - reference).abs().max() <= 1e-5  # one forward of the whole sequence
        steps, cache = decoded(patched, ids, 5)
        assert (steps - reference).abs().max() <= 1e-5
        assert all(layer.keys.shape[-2] == 2 + 6 - 1 for layer in cache.layers)

    applied_and_reverted(model, "attend sinks tokens=2 window=6", check)


def test_sinks_generate_300_tokens_in_a_cache_of_fixed_size():
    model, ids = build("llama", "sdpa"), ids_of(8, batch=1)
    surgeon.apply("attend sinks tokens=4 window=12", model)
    sizes = []
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        tokens = [ids]
        for _ in range(300):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            out = model(token, cache=cache, use_cache=True)
            sizes.append(sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers))
    assert cache.get_seq_length() == 308
    assert len(set(sizes[10:])) == 1 and cache.layers[0].keys.shape[-2] == 4 + 12 - 1  # flat from early on
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=300, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    assert torch.equal(generated, torch.cat(tokens, dim=1))


# --- attend rerope --------------------------------------------------------------------------------


def rerope_pairs(window: int, leak: float | None):
    def pairs(length: int) -> Pairs:
        base = absolute(length)
        t = base.query_position
        distance = t[:, None] - t[None, :]
        capped = distance.clamp(max=window) if leak is None else \
            torch.where(distance < window, distance, window + (distance - window) / leak)
        base.key_position = t[:, None] - capped
        return base
    return pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("leak", [None, 4.0])
def test_rerope_equals_the_per_pair_reference(kind, attention, leak):
    model, ids = build(kind, attention), ids_of(50)
    reference = logits_of(clone(model), ids, rerope_pairs(8, leak))
    spec = "attend rerope window=8" + (f" leak={leak:g}" if leak else "")

    def check(patched):
        assert (logits(patched, ids) - reference).abs().max() <= 1e-5
        assert (decoded(patched, ids, 20)[0] - reference).abs().max() <= 1e-5
        short = ids[:, :8]  # the whole sequence within the window: plain RoPE
        assert (logits(patched, short) - logits(build(kind, attention), short)).abs().max() <= 1e-6

    applied_and_reverted(model, spec, check)


def test_rerope_needs_a_rotary_embedding():
    model = tiny_gpt2()
    with pytest.raises(SurgeonError, match="rotary"):
        surgeon.apply("attend rerope window=8", model)


# --- attend alibi ---------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", range(1, 65))
def test_alibi_slopes_are_blooms(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from surgeon.methods.attention.alibi import AlibiModifier

    length = 12
    bloom = build_alibi_tensor(torch.ones(1, length), heads, torch.float32)[:, 0]  # (H, T): slope * j
    ours = AlibiModifier(heads).slopes
    t = torch.arange(length)
    bias = -ours[:, None, None] * (t[:, None] - t[None, :]).abs()[None].float()  # what the modifier adds
    for i in range(length):  # equal up to a per-row constant, which softmax ignores
        gap = bias[:, i, :i + 1] - bloom[:, :i + 1]
        assert (gap - gap[:, :1]).abs().max() <= 1e-6


def alibi_pairs(heads: int, rope: bool):
    from surgeon.methods.attention.alibi import alibi_slopes

    slopes = torch.tensor([2 ** (-8 * h / heads) for h in range(1, heads + 1)]) if math.log2(heads).is_integer() \
        else torch.tensor(alibi_slopes(heads))

    def pairs(length: int) -> Pairs:
        base = absolute(length)
        if not rope:
            base.query_position = torch.zeros(length, dtype=torch.float64)
            base.key_position = torch.zeros(length, length, dtype=torch.float64)
        t = torch.arange(length)
        base.bias = -slopes[:, None, None] * (t[:, None] - t[None, :]).float()[None]
        return base
    return pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("rope", [True, False])
def test_alibi_equals_the_biased_reference(kind, attention, rope):
    model, ids = build(kind, attention), ids_of(30)
    reference = logits_of(clone(model), ids, alibi_pairs(4, rope))

    def check(patched):
        assert (logits(patched, ids) - reference).abs().max() <= 1e-5
        assert (decoded(patched, ids, 10)[0] - reference).abs().max() <= 1e-5

    applied_and_reverted(model, "attend alibi" + ("" if rope else " rope=off"), check)


def test_alibi_is_refused_on_a_model_that_has_it():
    torch.manual_seed(0)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=32, n_head=4, n_layer=2,
                                                                   vocab_size=64)).eval()
    original = clone(bloom)
    with pytest.raises(SpecError, match="ALiBi"):
        surgeon.apply("attend alibi", bloom)
    assert_same_model(bloom, original)


# --- attend logn ----------------------------------------------------------------------------------


def qwen_logn(seq_length: int, length: int) -> torch.Tensor:
    """Qwen-1's modeling_qwen.py: logn_list and the slice a full forward takes."""
    logn_list = [math.log(i, seq_length) if i > seq_length else 1 for i in range(1, 32768)]
    logn_tensor = torch.tensor(logn_list)[None, :, None, None]
    key_size, q_len = length, length
    return logn_tensor[:, key_size - q_len:key_size][0, :, 0, 0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_logn_leaves_the_trained_length_alone_and_scales_beyond_as_qwen(kind, attention):
    model, ids = build(kind, attention), ids_of(40)
    plain = clone(model)

    def pairs(length: int) -> Pairs:
        base = absolute(length)
        base.query_scale = qwen_logn(16, length)
        return base
    reference = logits_of(clone(model), ids, pairs)

    def check(patched):
        assert torch.equal(logits(patched, ids[:, :16]), logits(plain, ids[:, :16]))  # bit for bit
        full = logits(patched, ids)
        assert torch.equal(full[:, :16], logits(plain, ids)[:, :16])
        assert (full[:, 16:] - logits(plain, ids)[:, 16:]).abs().max() > 1e-3
        assert (full - reference).abs().max() <= 1e-5
        assert (decoded(patched, ids, 10)[0] - reference).abs().max() <= 1e-5

    applied_and_reverted(model, "attend logn train_len=16", check)


# --- attend s2 ------------------------------------------------------------------------------------


def longlora_forward_noflashattn(query_states, key_states, value_states, group_size_ratio):
    """dvlab-research/LongLoRA at d4eb344, llama_attn_replace.py L225-340, from after the rotary
    embedding and repeat_kv to before o_proj (the causal mask as LlamaModel made it then)."""
    bsz, num_heads, q_len, head_dim = query_states.shape
    group_size = int(q_len * group_size_ratio)
    if q_len % group_size > 0:
        raise ValueError("q_len %d should be divisible by group size %d." % (q_len, group_size))
    num_group = q_len // group_size

    def shift(qkv, bsz, q_len, group_size, num_heads, head_dim):
        qkv[:, num_heads // 2:] = qkv[:, num_heads // 2:].roll(-group_size // 2, dims=2)
        qkv = qkv.transpose(1, 2).reshape(bsz * (q_len // group_size), group_size, num_heads, head_dim).transpose(1, 2)
        return qkv

    query_states = shift(query_states.clone(), bsz, q_len, group_size, num_heads, head_dim)
    key_states = shift(key_states.clone(), bsz, q_len, group_size, num_heads, head_dim)
    value_states = shift(value_states.clone(), bsz, q_len, group_size, num_heads, head_dim)
    attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(head_dim)
    attention_mask = torch.full((q_len, q_len), torch.finfo(attn_weights.dtype).min).triu(1)[None, None]
    attention_mask = attention_mask.expand(bsz, 1, q_len, q_len)
    attention_mask = attention_mask[:, :, :group_size, :group_size].repeat(num_group, 1, 1, 1)
    attn_weights = attn_weights + attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    attn_output = attn_output.reshape(bsz, q_len, num_heads, head_dim)
    attn_output[:, :, num_heads // 2:] = attn_output[:, :, num_heads // 2:].roll(group_size // 2, dims=1)
    return attn_output


@pytest.mark.parametrize(("length", "ratio"), [(16, 0.25), (12, 0.25), (24, 0.5)])
def test_s2_is_longlora_on_tensors(length, ratio):
    from surgeon.methods.attention._seam import AttentionCall
    from surgeon.methods.attention.s2 import S2Modifier

    q, k, v = (torch.randn(2, 4, length, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    module = torch.nn.Module()
    call = AttentionCall(module, q, k, v, None, {"scaling": 8 ** -0.5}, "sdpa", torch.arange(length),
                         torch.arange(length))
    out, _ = S2Modifier(ratio).attend(call, None)
    assert (out - longlora_forward_noflashattn(q, k, v, ratio)).abs().max() <= 1e-6
    module.eval()
    assert S2Modifier(ratio).attend(call, None) is None  # eval: full attention


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_s2_trains_as_longlora_and_evaluates_fully(kind, attention):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    model, ids = build(kind, attention), ids_of(32)
    reference_model = clone(model)

    def reference(module, query, key, value, attention_mask, **kwargs):
        groups = query.shape[1] // key.shape[1]
        return longlora_forward_noflashattn(query, key.repeat_interleave(groups, 1),
                                            value.repeat_interleave(groups, 1), 0.25), None
    AttentionInterface.register("test_longlora", reference)
    AttentionMaskInterface.register("test_longlora", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    reference_model.config._attn_implementation = "test_longlora"
    reference_model.train()
    expected = reference_model(ids, use_cache=False).logits

    def check(patched):
        patched.train()
        assert (patched(ids, use_cache=False).logits - expected).abs().max() <= 1e-5
        with pytest.raises(SurgeonError, match="groups of"):
            patched(ids[:, :30], use_cache=False)  # int(30 * 0.25) = 7 does not divide 30
        patched.eval()
        assert torch.equal(logits(patched, ids), logits(build(kind, attention), ids))

    applied_and_reverted(model, "attend s2 group=0.25", check)


# --- composition, checks, refusals ----------------------------------------------------------------


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_window_alibi_and_logn_compose_on_one_seam(attention):
    model, ids = build("llama", attention), ids_of(40)
    window, alibi = window_pairs(8), alibi_pairs(4, rope=True)

    def pairs(length: int) -> Pairs:
        base = alibi(length)
        base.allowed = window(length).allowed
        base.query_scale = qwen_logn(16, length)
        return base
    reference = logits_of(clone(model), ids, pairs)

    def check(patched):
        assert (logits(patched, ids) - reference).abs().max() <= 1e-5
        assert (decoded(patched, ids, 10)[0] - reference).abs().max() <= 1e-5

    applied_and_reverted(model, "attend logn train_len=16\nattend window size=8\nattend alibi", check)


def test_a_prefix_composes_with_a_window():
    model, ids = build("llama", "sdpa"), ids_of(20)
    alone = clone(model)
    surgeon.apply("inject prefix tokens=4 into *.attn", alone, seed=0)

    def check(patched):
        out = logits(patched, ids)
        assert (out - logits(alone, ids)).abs().max() > 1e-4  # the window changes what the prefix model sees
        short = ids[:, :6]  # within the window: the prefix model alone
        assert (logits(patched, short) - logits(alone, short)).abs().max() <= 1e-5
        assert (decoded(patched, ids, 8)[0] - out).abs().max() <= 1e-5

    applied_and_reverted(model, "inject prefix tokens=4 into *.attn\nattend window size=6", check)


def test_the_config_of_another_model_is_never_written():
    model = build("llama", "sdpa")
    other = build("llama", "sdpa")
    other.config = model.config
    for module in other.modules():
        if "config" in module.__dict__:
            module.config = model.config
    ids = ids_of(30)
    before = logits(other, ids)
    job = surgeon.apply("attend window size=4\nscale rope linear factor=2", model)
    assert model.config is not other.config and other.config._attn_implementation == "sdpa"
    assert torch.equal(logits(other, ids), before)
    job.revert()
    assert model.config is other.config


@pytest.mark.parametrize(("spec", "match"), [
    ("attend sinks tokens=2 window=6\nattend rerope window=8", "cannot stack"),
    ("inject prefix tokens=4 into *.attn\nattend s2 group=0.25", "cannot stack"),
    ("scale rope linear factor=2\nattend alibi rope=off", "rotary position embedding"),
    ("attend window size=100", "longer than the 64 positions"),
    ("attend window size=0", "size"),
    ("attend s2 group=2", "group"),
    ("attend rerope window=8 leak=0.5", "leak"),
    ("attend softmax", "softmax"),
])
def test_what_cannot_be_done_is_refused_before_any_change(spec, match):
    model = build("llama", "sdpa")
    original, before = clone(model), implementations(model)
    with pytest.raises(SpecError, match=match):
        surgeon.apply(spec, model)
    assert_same_model(model, original)
    assert implementations(model) == before


def test_check_says_what_changes():
    from surgeon.report import _changes

    model = build("llama", "sdpa")
    lines = _changes(surgeon.check("attend sinks tokens=4 window=12\nattend logn", model))
    lines += _changes(surgeon.check("attend s2", model))
    assert "attention: 4 sink tokens + a window of 12; KV cache bounded at 16 entries (when every attention layer " \
           "has it)" in lines
    assert "attention: queries past position 64 scaled by log_64(n)" in lines
    assert any("shifted groups of 0.25" in line for line in lines)


def test_a_bounded_cache_refuses_a_left_padded_batch_once_it_has_dropped_keys():
    model, ids = build("llama", "sdpa"), ids_of(12)
    surgeon.apply("attend window size=4", model)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    with pytest.raises(SurgeonError, match="unpadded rows"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    unpadded = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                              pad_token_id=0)
    assert unpadded.shape == (2, 16)
