"""The planner's graph checks and the surgery's rollback, exercised through the method protocol."""

from typing import ClassVar

import pytest
import torch
from conftest import BUILDERS, assert_same_model, clone, tiny_llama
from torch import nn

import surgeon
from surgeon.errors import SpecError, SurgeryError
from surgeon.graph import build_module_graph
from surgeon.methods import base
from surgeon.methods.weights.lora import Lora


class _Scale(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.base = inner
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.gain


def _dummy(name: str, stacks_on: frozenset[str]) -> type[base.Method]:
    class Dummy(base.Method):
        verb = "test"
        kinds = frozenset({"linear"})
        applied: ClassVar[list[str]] = []

        @classmethod
        def added_shapes(cls, target, params):
            return {"gain": ()}

        @classmethod
        def apply(cls, model, target, params, ctx):
            cls.applied.append(f"{cls.name}:{target.path}")
            parent, attr, original = base.locate(model, target.path)
            return base.WrapPatch(parent, attr, original, _Scale(original))

    Dummy.name = name
    Dummy.stacks_on = stacks_on
    return Dummy


@pytest.fixture
def dummies():
    registry = base.registry()
    first, second = _dummy("first", frozenset()), _dummy("second", frozenset({"first"}))
    loop_a, loop_b = _dummy("loop_a", frozenset({"loop_b"})), _dummy("loop_b", frozenset({"loop_a"}))
    for method in (first, second, loop_a, loop_b):
        base.register(method)
    yield first, second
    for method in (first, second, loop_a, loop_b):
        registry.pop((method.verb, method.name))


def test_stacking_order_follows_the_rewrite_graph_not_the_text(dummies):
    first, second = dummies
    model = tiny_llama()
    original = clone(model)
    job = surgeon.apply("test second into layers.0.attn.q\ntest first into layers.0.attn.q", model)
    assert [r.method for r in job.plan.rewrites] == ["first", "second"]
    outer = model.model.layers[0].self_attn.q_proj
    assert isinstance(outer, _Scale) and isinstance(outer.base, _Scale)
    job.revert()
    assert_same_model(model, original)


def test_cycles_in_the_rewrite_graph_are_rejected(dummies):
    model = tiny_llama()
    original = clone(model)
    with pytest.raises(SpecError, match="targeted twice|cycle"):
        surgeon.apply("test loop_a into layers.0.attn.q\ntest loop_b into layers.0.attn.q", model)
    assert_same_model(model, original)


def test_a_failure_halfway_rolls_back_everything(monkeypatch):
    model = tiny_llama()
    original = clone(model)
    calls = []
    real_apply = Lora.apply.__func__

    def flaky(cls, model, target, params, ctx):
        calls.append(target.path)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_apply(cls, model, target, params, ctx)

    monkeypatch.setattr(Lora, "apply", classmethod(flaky))
    with pytest.raises(SurgeryError, match=r"patching model.layers.1.self_attn.q_proj failed .*disk on fire.*2 patches"):
        surgeon.apply("inject lora r=2 into *.attn.<q,v>", model)
    assert len(calls) == 3
    assert_same_model(model, original)


def test_check_changes_nothing():
    model = tiny_llama()
    original = clone(model)
    the_plan = surgeon.check("inject lora r=2 into *.attn.<q,v>", model)
    assert len(the_plan.rewrites) == 4
    assert_same_model(model, original)


ROLE_EXPECTATIONS = {
    "llama": {"layers.0.attn.q": "model.layers.0.self_attn.q_proj", "layers.1.mlp.gate": "model.layers.1.mlp.gate_proj",
              "embed": "model.embed_tokens", "head": "lm_head", "layers.0.attn.o": "model.layers.0.self_attn.o_proj"},
    "gpt2": {"layers.0.attn.qkv": "transformer.h.0.attn.c_attn", "layers.0.attn.o": "transformer.h.0.attn.c_proj",
             "layers.0.mlp.up": "transformer.h.0.mlp.c_fc", "layers.0.mlp.down": "transformer.h.0.mlp.c_proj",
             "embed": "transformer.wte", "head": "lm_head"},
    "bert": {"encoder.layers.1.attn.v": "encoder.layer.1.attention.self.value",
             "encoder.layers.0.attn.o": "encoder.layer.0.attention.output.dense",
             "encoder.layers.0.mlp.up": "encoder.layer.0.intermediate.dense",
             "encoder.layers.0.mlp.down": "encoder.layer.0.output.dense", "embed": "embeddings.word_embeddings"},
    "t5": {"encoder.layers.0.attn.q": "encoder.block.0.layer.0.SelfAttention.q",
           "decoder.layers.1.cross_attn.k": "decoder.block.1.layer.1.EncDecAttention.k",
           "decoder.layers.0.mlp.down": "decoder.block.0.layer.2.DenseReluDense.wo", "embed": "shared"},
}


@pytest.mark.parametrize("arch", sorted(ROLE_EXPECTATIONS))
def test_roles_resolve_per_architecture(arch):
    graph = build_module_graph(BUILDERS[arch]())
    by_role = {}
    for info in graph.modules.values():
        for role_path in info.role_paths:
            by_role.setdefault(role_path, info.path)
    for role_path, path in ROLE_EXPECTATIONS[arch].items():
        assert by_role.get(role_path) == path, role_path


def test_gpt2_fused_slices_follow_the_config():
    graph = build_module_graph(BUILDERS["gpt2"]())
    assert graph.modules["transformer.h.0.attn.c_attn"].slices == {"q": (0, 64), "k": (64, 128), "v": (128, 192)}
