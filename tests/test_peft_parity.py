"""Parity with Hugging Face PEFT: the same LoRA weights give the same outputs (fp32, <= 1e-5)."""

import pytest
import torch
from conftest import BUILDERS, batch, clone, run

import surgeon

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

CASES = [
    # arch, surgeon spec, PEFT target_modules, PEFT extra options
    ("llama", "inject lora r=4 alpha=8 into *.attn.<q,v>", ["q_proj", "v_proj"], {}),
    ("llama", "inject lora r=4 alpha=8 rslora=true into *.mlp.<up,down,gate>", ["up_proj", "down_proj", "gate_proj"],
     {"use_rslora": True}),
    ("gpt2", "inject lora r=4 alpha=16 into c_attn", ["c_attn"], {"fan_in_fan_out": True}),
    ("bert", "inject lora r=4 alpha=8 into *.attn.<q,v>", ["query", "value"], {}),
    ("bert_mlm", "inject lora r=4 alpha=8 into *.attn.<q,v>", ["query", "value"], {}),
    ("bert_cls", "inject lora r=4 alpha=8 into *.attn.<q,v>", ["query", "value"], {}),
    ("t5", "inject lora r=4 alpha=8 into **.<attn,cross_attn>.<q,v>", ["q", "v"], {}),
]


@pytest.mark.parametrize(("arch", "spec", "modules", "extra"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_same_weights_same_outputs_as_peft(arch, spec, modules, extra):
    ours = BUILDERS[arch]()
    theirs = clone(ours)
    job = surgeon.apply(spec, ours, seed=0)
    r, alpha = 4, (16 if arch == "gpt2" else 8)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, **extra)
    peft_model = peft.get_peft_model(theirs, config)
    peft_weights = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    ours_weights = job.trainable_parameters()
    assert len(peft_weights) == len(ours_weights) > 0
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in ours_weights.items():
            path, _, local = name.rpartition(".")
            peft_name = f"base_model.model.{path}.{local}.default.weight"
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            assert peft_weights[peft_name].shape == param.shape
            peft_weights[peft_name].copy_(param)
    ids = batch()
    reference = run(peft_model, ids)
    plain = run(BUILDERS[arch](), ids)
    assert (reference - plain).abs().max() > 1e-3  # the delta is not zero, so parity means something
    assert (run(ours, ids) - reference).abs().max() <= 1e-5
    assert sum(p.numel() for p in ours_weights.values()) == sum(p.numel() for p in peft_weights.values())
