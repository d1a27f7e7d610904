"""Runs with several named adapters leave surgeon the ways users take them: PEFT export writes one
sub-directory per adapter, as PEFT's save_pretrained does, and PEFT loads them under their names
with the same outputs; `surgeon merge RUN --adapter NAME` (or NAME=WEIGHT, repeated) writes a stock
checkpoint of those adapters alone; `job.merged(...)` gives every object back on leaving."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import assert_same_model, batch, clone, run, tiny_llama
from typer.testing import CliRunner

import surgeon
from surgeon.cli import app

SPEC = "inject lora r=4 into *.attn.<q,v> as a\ninject lora r=8 alpha=4 into *.attn.<q,k> as b\ninject lora r=2 into *.mlp.up"


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Path]:
    """(the base model's directory, a run of two named LoRA adapters and an unnamed one on it)."""
    tiny_llama().save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    job = surgeon.apply(SPEC, model, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in job.added_tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    job.save(tmp_path / "run")
    return tmp_path / "base", tmp_path / "run"


def loaded(base: Path, run_dir: Path) -> tuple[torch.nn.Module, surgeon.Job]:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    return model, surgeon.load(run_dir, model)


def test_peft_export_writes_one_directory_per_adapter_that_peft_loads_by_name(saved, tmp_path: Path) -> None:
    base, run_dir = saved
    model, job = loaded(base, run_dir)
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "peft"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert sorted(report["adapters"]) == ["a", "b", "default"]
    twin = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                          tmp_path / "peft" / "a", adapter_name="a")
    twin.load_adapter(tmp_path / "peft" / "b", adapter_name="b")
    twin.load_adapter(tmp_path / "peft", adapter_name="default")
    twin.eval()
    for name in ("a", "b"):
        twin.base_model.set_adapter([name, "default"])  # PEFT: the unnamed statements are its default adapter
        with job.active(name), torch.no_grad():
            assert (twin(input_ids=batch()).logits - run(model, batch())).abs().max() <= 1e-5, name


@pytest.mark.parametrize("given", [["b"], ["a", "b"], ["a=0.25", "b=0.75"]])
def test_merge_adapter_writes_a_stock_checkpoint_of_those_adapters(saved, tmp_path: Path, given: list[str]) -> None:
    base, run_dir = saved
    options = [item for name in given for item in ("--adapter", name)]
    result = CliRunner().invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "merged"), *options, "--json"])
    assert result.exit_code == 0, result.output
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    model, job = loaded(base, run_dir)
    weights = {name.partition("=")[0]: float(name.partition("=")[2] or 1) for name in given}
    with job.active(weights):
        expected = run(model, batch())
    assert (run(merged, batch()) - expected).abs().max() <= 1e-5
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in merged.modules())


def test_merged_gives_every_object_back_and_refuses_what_cannot_merge() -> None:
    model = tiny_llama()
    original = clone(model)
    job = surgeon.apply(SPEC + "\ninject prefix tokens=2 into *.attn as p", model, seed=0)
    job.activate(["a", "p"])
    before = run(model, batch())
    with job.merged("b") as merged:
        assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in merged.modules())
        inside = run(merged, batch())
    assert torch.equal(run(model, batch()), before) and job.active_adapters() == ["a", "p"]
    with job.active("b"):
        assert (run(model, batch()) - inside).abs().max() <= 1e-5
    with pytest.raises(surgeon.SurgeonError, match="'inject prefix' .* is not mergeable"):
        with job.merged(["a", "p"]):
            pass
    assert torch.equal(run(model, batch()), before)
    job.revert()
    assert_same_model(model, original)


def test_merge_adapter_with_a_bad_weight_or_name_is_refused(saved, tmp_path: Path) -> None:
    _, run_dir = saved
    for option, expected in (("a=half", "the weight after '=' is a number"), ("zz", "no adapter named 'zz'")):
        result = CliRunner().invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "m"), "--adapter", option])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert not (tmp_path / "m").exists()
