"""A run made in Python knows the directory its model was read from, so every CLI command works on it."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from typer.testing import CliRunner

import surgeon
from surgeon.cli import app
from tests.conftest import assert_same_model, batch, clone, run, tiny_llama

LORA = "inject lora r=4 alpha=8 into *.attn.<q,v>"


def saved_base(tmp_path: Path) -> Path:
    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_a_model_read_from_a_directory_records_it_and_the_cli_merges_its_run(tmp_path: Path) -> None:
    base_dir = saved_base(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    job = surgeon.apply(LORA, model, seed=0)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.add_(0.1)
    assert job.manifest.source.kind == "hf" and Path(job.manifest.source.location) == base_dir.resolve()
    job.save(tmp_path / "run")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(run(merged, batch()), run(model, batch()), atol=1e-5)


def test_quantized_originals_are_re_read_from_the_directory_not_spilled(tmp_path: Path) -> None:
    base_dir = saved_base(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    original = clone(model)
    job = surgeon.apply("quantize base nf4\n" + LORA, model, seed=0)
    assert job.manifest.originals.kind == "checkpoint"
    job.revert()
    assert_same_model(model, original)


def test_a_model_changed_after_loading_is_an_in_memory_model(tmp_path: Path) -> None:
    base_dir = saved_base(tmp_path)
    for change in ("norm", "cast"):
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        if change == "norm":  # untouched by the spec: caught by the sample of its values
            with torch.no_grad():
                model.model.norm.weight.mul_(2)
        else:
            model.to(torch.bfloat16)
        job = surgeon.apply(LORA, model, seed=0)
        assert job.manifest.source.kind == "memory", change
        job.revert()


def test_a_touched_tensor_changed_after_loading_is_caught(tmp_path: Path) -> None:
    base_dir = saved_base(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[7, 3] += 1  # one element in the middle
    job = surgeon.apply(LORA, model, seed=0)
    assert job.manifest.source.kind == "memory"
