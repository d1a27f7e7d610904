"""torch.compile on patched models (tiny one-layer Llama): dynamo captures each forward whole (0
graph breaks: QLoRA's dequantize takes a plain-torch path under dynamo), and the compiled model's
outputs and gradients equal eager's.

The equality checks compile with backend="aot_eager": dynamo's capture and AOTAutograd's joint
forward/backward graphs, without inductor's C++ code generation, which takes ~40 s for this model on
a 2-core machine (checked by hand: inductor's outputs and gradients match eager's within 2e-7).
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from conftest import batch
from peft_twin import bnb_dequantized, randomize
from test_quant import bnb_dequantize, bnb_quantize, needs_bnb, same_dequantized, sample
from torch import nn

import surgeon
from surgeon.methods.weights.quantize import QuantizedLinear
from surgeon.quant import dequantize_plain, quantize

pytestmark = pytest.mark.compile

SPECS = {
    "qlora": "quantize base nf4 double\ninject lora r=4 alpha=8 into *.attn.<q,v>",
    "lora": "inject lora r=4 alpha=8 into *.attn.<q,v>",
    "dora": "inject dora r=4 alpha=8 into *.attn.<q,v>",
    "ia3": "inject ia3 into *.attn.<k,v>\ninject ia3 into *.mlp.down",
    "prefix": "inject prefix tokens=4 into *.attn",
}
QLORA_FP32 = "quantize base nf4 double compute=fp32\ninject lora r=4 alpha=8 into *.attn.<q,v>"


def one_layer_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config).eval()


def patched(spec: str) -> tuple[nn.Module, surgeon.Job]:
    model = one_layer_llama()
    job = surgeon.apply(spec, model, seed=0)
    randomize(job, std=0.1)  # non-zero deltas, so the adapters' part of the graph counts
    return model, job


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_and_grads(model: nn.Module, params: dict[str, nn.Parameter], ids: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    for param in params.values():
        param.grad = None
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("name", list(SPECS))
def test_compiles_without_graph_breaks_and_equals_eager_forward_and_backward(name: str) -> None:
    model, job = patched(SPECS[name])
    ids = batch()
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, [r.reason.splitlines()[0] for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    model.train()
    params = job.trainable_parameters()
    logits, loss, grads = loss_and_grads(model, params, ids)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    c_logits, c_loss, c_grads = loss_and_grads(compiled, params, ids)
    torch.testing.assert_close(c_logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=0)
    for param_name, grad in grads.items():
        assert grad.abs().max() > 0, param_name  # the gradient reaches every adapter
        torch.testing.assert_close(c_grads[param_name], grad, atol=1e-5, rtol=0, msg=param_name)


@needs_bnb
def test_compiled_qlora_equals_peft_lora_on_bitsandbytes_dequantized_weights() -> None:
    """An independent reference: PEFT's LoRA over a copy whose linear layers hold bitsandbytes' NF4
    round trip (compute=fp32, so both sides multiply the same fp32 weights)."""
    model = one_layer_llama()
    reference = peft.get_peft_model(bnb_dequantized(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    job = surgeon.apply(QLORA_FP32, model, seed=0)
    randomize(job, std=0.1)
    theirs = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in job.trainable_parameters().items():
            theirs[f"base_model.model.{name}.default.weight"].copy_(param)
    ids = batch()
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=0)
    assert (expected - one_layer_llama()(input_ids=ids).logits).abs().max() > 1e-2  # the adapters count


class _Dequantized(nn.Module):
    """A module whose forward is its quantized layer's dequantized weight (in the compute dtype)."""

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self) -> torch.Tensor:
        return self.layer.dequantized()


@needs_bnb
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 128), (40, 33)], ids=["even", "odd-last-dim-partial-block"])
def test_the_path_taken_under_dynamo_dequantizes_as_bitsandbytes(shape: tuple[int, int], qtype: str) -> None:
    """The plain-torch dequantize (eager, and compiled inside a layer) is bitsandbytes' bit for bit."""
    for double in (False, True):
        x = sample(shape, torch.float32, seed=3)
        packed, state = bnb_quantize(x, qtype, 64, double)
        qt = quantize(x, qtype, blocksize=64, double=double)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            theirs = bnb_dequantize(packed, state, dtype).reshape(shape)
            assert same_dequantized(dequantize_plain(qt, dtype), theirs), (double, dtype)
        torch._dynamo.reset()
        layer = QuantizedLinear(qt, None, torch.bfloat16, "linear")
        compiled = torch.compile(_Dequantized(layer), backend="aot_eager", fullgraph=True)()
        assert same_dequantized(compiled, bnb_dequantize(packed, state, torch.bfloat16).reshape(shape)), double


def test_the_path_taken_under_dynamo_dequantizes_int8_by_its_formula() -> None:
    """int8 is surgeon's own format: code * fp32(absmax / 127), rounded once, computed here by hand."""
    x = sample((40, 33), torch.float32, seed=4)
    qt = quantize(x, "int8", blocksize=64)
    codes = qt.codes.view(torch.int8).float()
    scale = torch.div(qt.absmax, torch.full_like(qt.absmax, 127.0)).repeat_interleave(64)[: codes.numel()]
    for dtype in (torch.float32, torch.bfloat16):
        expected = (codes * scale).to(dtype).view(qt.shape)
        assert torch.equal(dequantize_plain(qt, dtype), expected)
        assert torch.equal(qt.dequantize(dtype), expected)  # and the threaded eager kernel agrees
    layer = QuantizedLinear(qt, None, torch.bfloat16, "linear")
    compiled = torch.compile(_Dequantized(layer), backend="aot_eager", fullgraph=True)()
    assert torch.equal(compiled, expected)
