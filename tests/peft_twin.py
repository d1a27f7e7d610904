"""A PEFT model holding a surgeon job's adapter weights, built through the method's own PEFT hooks
(`peft_config`, `to_peft_tensors`): the reference the method tests compare against."""

from __future__ import annotations

import torch
from torch import nn

import surgeon
from surgeon.planner import params_of


def randomize(job: surgeon.Job, seed: int = 3, std: float = 0.2) -> None:
    """Non-zero adapter weights (most methods start with a zero delta, which would prove nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def rewrites_of(job: surgeon.Job, method: str) -> list:
    return [r for r in job.plan.rewrites if r.method == method]  # not the quantize ones


def peft_state(job: surgeon.Job, method: str) -> dict[str, torch.Tensor]:
    """The job's adapters under PEFT's full state-dict names, through the method's own hook."""
    added = job.added_tensors()
    state = {}
    for rewrite in rewrites_of(job, method):
        path, hooks = rewrite.target.path, surgeon.methods.base.registry()[(rewrite.verb, rewrite.method)]
        local = {n.removeprefix(path + "."): p.detach() for n, p in added.items() if n.startswith(path + ".")}
        for name, tensor in hooks.to_peft_tensors(rewrite.target, params_of(rewrite), local).items():
            state[f"base_model.model.{path}.{name}"] = tensor
    return state


def peft_twin(job: surgeon.Job, model: nn.Module, method: str, config_class: type, modules: list[str],
              marker: str) -> nn.Module:
    """PEFT's model built from the method's `peft_config` on `model`, holding the job's weights;
    checks that PEFT made the same tensors (names, shapes) and holds the very values."""
    import peft

    first = rewrites_of(job, method)[0]
    hooks = surgeon.methods.base.registry()[(first.verb, first.method)]
    peft_model = peft.get_peft_model(model, config_class(**hooks.peft_config(params_of(first)), target_modules=modules))
    state = peft_state(job, method)
    result = peft.set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys
    loaded = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if marker in n}
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    return peft_model.eval()


def with_grad(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The main output with autograd on (for gradient comparisons)."""
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def bnb_dequantized(model: nn.Module) -> nn.Module:
    """A copy whose linear layers (not the head) hold bitsandbytes' NF4 round trip of their weights:
    the reference for a method stacked on `quantize base nf4 double`."""
    import copy

    import pytest

    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in reference.named_modules():
            if isinstance(layer, nn.Linear) and not name.endswith("lm_head"):
                q, state = bnb_functional.quantize_4bit(layer.weight.data, blocksize=64, quant_type="nf4",
                                                        compress_statistics=True)
                layer.weight.copy_(bnb_functional.dequantize_4bit(q, state))
    return reference


def with_random_biases(model: nn.Module, seed: int = 5) -> nn.Module:
    """The model with non-zero biases (GPT-2 and BERT start with zero ones, which would hide how a
    method treats a bias)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def named_lora_twin(base: nn.Module, job: surgeon.Job, configs: dict) -> nn.Module:
    """PEFT's model on `base` with one adapter per named LoRA adapter of the job (`configs`: name ->
    peft.LoraConfig, in order), holding the very same tensors; in eval mode."""
    import peft

    twin = None
    for name, config in configs.items():
        if twin is None:
            twin = peft.get_peft_model(base, config, adapter_name=name)
        else:
            twin.add_adapter(name, config)
    ours = job.added_tensors()
    with torch.no_grad():
        for key, param in twin.named_parameters():
            if ".lora_" in key:  # base_model.model.<path>.lora_A.<name>.weight -> <path>[<name>].lora_A
                path, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
                which, name = rest.removeprefix("embedding_").split(".")[:2]  # embeddings: lora_embedding_A.<name>
                param.copy_(ours[f"{path}[{name}].lora_{which}"])
    return twin.eval()
