"""`scale rope TYPE ...` on a live model against the independent reference: the same architecture
built by transformers from a config with that `rope_parameters` and loaded with the same weights.
Llama, Qwen2, Mistral and GPT-NeoX (partial rotary), eager and SDPA, one forward past the trained
length and a cached decode in the same call pattern (dynamic NTK is not causal-consistent, so the
reference decodes alike). Revert is exact, and the config object, which another model may share,
is never written."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import assert_same_model, clone

import surgeon
from surgeon.errors import SpecError

TRAINED = 64  # max_position_embeddings of the tiny models
LONG = 4 * TRAINED - 16


def build(kind: str, attention: str, rope: dict | None = None, **extra: object) -> torch.nn.Module:
    """A tiny model with the default RoPE, or with `rope` (what transformers builds from that config);
    `extra`: more config entries (Mistral's sliding_window)."""
    torch.manual_seed(0)
    parameters = {"rope_theta": 10000.0, "rope_type": "default"} | (rope or {})
    if kind == "gpt_neox":  # partial rotary: a quarter of each head
        parameters["partial_rotary_factor"] = 0.25
    common = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=128,
                  max_position_embeddings=TRAINED, attn_implementation=attention, rope_parameters=parameters) | extra
    if kind == "gpt_neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common)).eval()
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    config_class, model_class = classes[kind]
    return model_class(config_class(**common, num_key_value_heads=2)).eval()


def rotary_dim(kind: str) -> int:
    return 4 if kind == "gpt_neox" else 16  # head_dim 16; GPT-NeoX rotates a quarter of it


def cases(kind: str) -> dict[str, tuple[str, dict]]:
    """statement -> the rope_parameters transformers builds the reference from."""
    d, half = rotary_dim(kind), rotary_dim(kind) // 2
    short, long = [1.0 + 0.1 * i for i in range(half)], [2.0 + 0.5 * i for i in range(half)]
    return {
        "linear": ("scale rope linear factor=4", {"rope_type": "linear", "factor": 4.0}),
        "ntk": ("scale rope ntk factor=4", {"rope_type": "default", "rope_theta": 10000.0 * 4 ** (d / (d - 2))}),
        "dynamic": ("scale rope dynamic factor=4", {"rope_type": "dynamic", "factor": 4.0}),
        "yarn": ("scale rope yarn factor=4", {"rope_type": "yarn", "factor": 4.0}),
        "yarn-options": ("scale rope yarn factor=4 beta_fast=16 beta_slow=2 attention_factor=1",
                         {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.0}),
        "llama3": ("scale rope llama3 factor=8 low_freq_factor=1 high_freq_factor=4",
                   {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": TRAINED}),
        "longrope": (f"scale rope longrope factor=4 short_factor={short} long_factor={long}",
                     {"rope_type": "longrope", "factor": 4.0, "short_factor": short, "long_factor": long,
                      "original_max_position_embeddings": TRAINED}),
    }


def logits_and_decode(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward past the trained length; and a cached decode: a prompt, then 6 tokens one by one."""
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :TRAINED - 4], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(TRAINED - 4, TRAINED + 2):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    return whole, torch.stack(steps, dim=1)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt_neox"])
@pytest.mark.parametrize("case", ["linear", "ntk", "dynamic", "yarn", "yarn-options", "llama3", "longrope"])
def test_scale_rope_equals_the_model_transformers_builds_with_those_rope_parameters(kind: str, attention: str,
                                                                                   case: str) -> None:
    statement, rope = cases(kind)[case]
    model = build(kind, attention)
    original = clone(model)
    config = model.config
    before = dict(config.rope_parameters)
    reference = build(kind, attention, rope)
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, LONG), generator=torch.Generator().manual_seed(1))
    job = surgeon.apply(statement, model)
    assert config.rope_parameters == before  # the original config object is not written
    assert model.config is not config and model.config.rope_parameters == reference.config.rope_parameters
    ours, theirs = logits_and_decode(model, ids), logits_and_decode(reference, ids)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-6, case
    job.revert()
    assert model.config is config
    assert_same_model(model, original)


def test_a_config_shared_with_another_model_is_left_alone() -> None:
    model = build("llama", "eager")
    twin = transformers.LlamaForCausalLM(model.config).eval()  # the very same config object
    twin.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = twin(input_ids=ids).logits
    job = surgeon.apply("scale rope yarn factor=4", model)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, before)
        assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)
    job.revert()


def test_scale_rope_composes_with_lora_and_reverts_exactly() -> None:
    model = build("llama", "sdpa")
    original = clone(model)
    reference = build("llama", "sdpa", {"rope_type": "linear", "factor": 4.0})
    reference.load_state_dict(model.state_dict())
    job = surgeon.apply("scale rope linear factor=4\ninject lora r=4 into *.attn.<q,v>", model, seed=0)
    ids = torch.randint(0, 128, (2, LONG), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)  # LoRA's B starts at zero
    job.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize(("build_model", "spec", "expected"), [
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128)),
     "scale rope linear factor=4", "no rotary position embedding"),
    (lambda: transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                            intermediate_size=64, vocab_size=128)),
     "scale rope yarn factor=4", "BERT's position_embeddings"),
    (lambda: build("llama", "eager"), "scale rope linear factor=0.5", "greater than or equal to 1"),
    (lambda: build("llama", "eager"), "scale rope lineer factor=4", "unknown RoPE scaling 'lineer'"),
    (lambda: build("llama", "eager"), "scale rope linear", "needs factor="),
    (lambda: build("llama", "eager"), "scale rope longrope factor=4", "needs short_factor"),
    (lambda: build("llama", "eager"), "scale rope linear factor=2\nscale rope yarn factor=4",
     "both change the model's rotary position embedding"),
])
def test_a_rope_statement_that_does_not_apply_is_refused_before_any_change(build_model, spec: str, expected: str) -> None:
    model = build_model().eval()
    original = clone(model)
    with pytest.raises(SpecError, match=expected):
        surgeon.apply(spec, model)
    assert_same_model(model, original)


def test_a_merged_run_with_scaled_rope_loads_in_stock_transformers_with_its_rope_parameters(tmp_path) -> None:
    model = build("llama", "eager")
    original = clone(model)
    job = surgeon.apply("scale rope yarn factor=4\ninject lora r=4 into *.attn.<q,v>", model, seed=0)
    with torch.no_grad():
        for p in job.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    ids = torch.randint(0, 128, (2, LONG), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    job.merge()
    with surgeon.whole_model(model):
        model.save_pretrained(tmp_path / "merged")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    assert loaded.config.rope_parameters["rope_type"] == "yarn" and loaded.config.rope_parameters["factor"] == 4.0
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - unmerged).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)


@pytest.mark.parametrize(("spec", "line"), [
    ("scale rope linear factor=4", "positions: 64 -> 256 (linear x4)"),
    ("scale rope yarn factor=8 original=32", "positions: 32 -> 256 (yarn x8)"),
])
def test_surgeon_check_says_what_the_positions_become(spec: str, line: str) -> None:
    from surgeon.report import plan_summary

    assert plan_summary(surgeon.check(spec, build("llama", "eager")))["changes"] == [line]
