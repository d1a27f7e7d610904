"""Small random-weight models of the architectures surgeon must serve, and model comparisons."""

from __future__ import annotations

import copy
import gc
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

_SCRATCH_BEFORE = set(Path(tempfile.gettempdir()).glob("surgeon-originals-*"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No test leaves spilled originals in the temp folder (jobs remove theirs when they end)."""
    gc.collect()
    left = set(Path(tempfile.gettempdir()).glob("surgeon-originals-*")) - _SCRATCH_BEFORE
    if left:
        print(f"\nspilled originals left in the temp folder: {sorted(map(str, left))[:3]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _bert_config(**extra: object) -> transformers.BertConfig:
    return transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   vocab_size=128, max_position_embeddings=64, **extra)


def tiny_bert_mlm(seed: int = 0) -> nn.Module:
    """BertForMaskedLM: its decoder's weight is tied to the word embeddings and its bias to
    cls.predictions.bias."""
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(_bert_config()).eval()


def tiny_bert_cls(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(_bert_config(num_labels=3)).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128,
                                   decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


def tiny_qwen2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.Qwen2ForCausalLM(config).eval()


def tiny_mistral(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.MistralForCausalLM(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "t5": tiny_t5,
            "qwen2": tiny_qwen2, "mistral": tiny_mistral, "bert_mlm": tiny_bert_mlm, "bert_cls": tiny_bert_cls}


@torch.no_grad()
def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's main output for a batch of token ids (logits or last hidden state).

    Under no_grad: with grad enabled, SDPA on CPU picks its kernel by which inputs need grad, and
    freezing the base changes that choice (a 1e-6 difference on T5 that has nothing to do with us)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return model(input_ids=ids, decoder_input_ids=ids).logits
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def batch(seed: int = 1, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(1, 128, shape, generator=torch.Generator().manual_seed(seed))


def _every_tensor(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}


def assert_same_model(model: nn.Module, original: nn.Module) -> None:
    """Bit-identical tensors, same module classes, hooks, attributes and requires_grad flags.

    `original` is an independent deep copy taken before surgery, so this never trusts surgeon's own
    fingerprint."""
    # keep_vars: a patched model's plain state_dict() holds only its run (surgeon/checkpoints.py)
    now, before = _every_tensor(model), _every_tensor(original)
    assert list(now) == list(before)
    for name in before:
        a, b = now[name], before[name]
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, name
        assert torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point else a,
                           b.view(torch.uint8) if b.dtype.is_floating_point else b), f"{name} differs"
    modules_now = dict(model.named_modules(remove_duplicate=False))
    modules_before = dict(original.named_modules(remove_duplicate=False))
    assert list(modules_now) == list(modules_before)
    for path, module in modules_before.items():
        current = modules_now[path]
        assert type(current) is type(module), path
        assert set(vars(current)) == set(vars(module)), f"{path}: attributes differ"
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
                      "_load_state_dict_pre_hooks"):
            assert len(getattr(current, hooks)) == len(getattr(module, hooks)), f"{path}.{hooks}"
    flags_now = {n: p.requires_grad for n, p in model.named_parameters()}
    flags_before = {n: p.requires_grad for n, p in original.named_parameters()}
    assert flags_now == flags_before


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def gpt2() -> nn.Module:
    return tiny_gpt2()


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def assert_same_files(a: Path, b: Path) -> None:
    """Every tensor in a's safetensors equals b's, bit for bit (compared as raw bytes)."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert ta[name].contiguous().view(torch.uint8).equal(tb[name].contiguous().view(torch.uint8)), name


def train_losses(model: nn.Module, params, steps: int = 8, lr: float = 1e-2,
                 shape: tuple[int, int] = (4, 16)) -> list[float]:
    """AdamW on `params` for `steps` steps of causal-LM loss on one fixed batch; the losses. Seeded,
    so dropout draws the same masks whatever ran before (a seeded apply leaves torch's RNG alone)."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(params, lr=lr)
    ids = batch(shape=shape)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_merge_keeps_outputs_and_reverts(model: nn.Module, original: nn.Module, job, ids: torch.Tensor) -> None:
    """merge(): only plain torch/transformers modules remain and the outputs stay within 1e-5;
    revert() after it gives `original` back exactly."""
    unmerged = run(model, ids)
    job.merge()
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in model.modules())
    assert (run(model, ids) - unmerged).abs().max() <= 1e-5
    job.revert()
    assert_same_model(model, original)
