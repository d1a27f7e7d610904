"""The command line end to end on Hugging Face directories: check, apply, revert, merge, inspect."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_files, batch, run
from safetensors.torch import load_file
from typer.testing import CliRunner

import surgeon
from surgeon.cli import app
from surgeon.models import load_model

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    target = tmp_path / "tiny-llama"
    shutil.copytree(ROOT / "examples" / "tiny-llama", target)
    return target


@pytest.fixture
def gpt2_dir(tmp_path: Path) -> Path:
    target = tmp_path / "tiny-gpt2"
    shutil.copytree(ROOT / "examples" / "tiny-gpt2", target)
    return target


def test_check_prints_plan_and_totals(llama_dir):
    result = cli("check", ROOT / "specs" / "lora-qv.peft", llama_dir)
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj" in result.output and "inject lora" in result.output
    # 2 layers x r=8 x ((64+64) + (64+32)) by hand
    assert "trainable parameters 3,584" in result.output


def test_check_json(gpt2_dir):
    result = cli("check", ROOT / "specs" / "lora-qv.peft", gpt2_dir, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["ok"] is True
    first = summary["rewrites"][0]
    assert first["target"] == "transformer.h.0.attn.c_attn" and first["slices"] == ["q", "v"]
    assert summary["totals"]["trainable_parameters"] == 2 * 2 * 8 * (64 + 64)
    base = sum(t.numel() for n, t in load_file(str(gpt2_dir / "model.safetensors")).items())
    assert summary["totals"]["base_parameters"] == base
    assert summary["totals"]["added_bytes"] == summary["totals"]["trainable_parameters"] * 4


def test_apply_train_revert_round_trip_is_bit_exact(llama_dir, tmp_path):
    result = cli("apply", ROOT / "specs" / "lora-qv.peft", llama_dir, "--out", tmp_path / "run", "--seed", "0")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "manifest.json").is_file() and (tmp_path / "run" / "adapters.safetensors").is_file()
    # train the run in Python and save it again: revert must still give the source back
    model, _ = load_model(str(llama_dir))
    job = surgeon.load(tmp_path / "run", model)
    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=1e-2)
    ids = batch(shape=(2, 16))
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    job.save(tmp_path / "trained")
    result = cli("revert", tmp_path / "trained", "--out", tmp_path / "restored")
    assert result.exit_code == 0, result.output
    assert "tensors verified by sha256" in result.output
    assert_same_files(tmp_path / "restored", llama_dir)


def test_merge_loads_in_stock_transformers(gpt2_dir, tmp_path):
    import transformers

    model, source = load_model(str(gpt2_dir))
    job = surgeon.apply(ROOT / "specs" / "lora-qv.peft", model, seed=0, source=source)
    with torch.no_grad():
        for p in job.trainable_parameters().values():
            p.normal_(0, 0.1)
    ids = batch()
    patched = run(model, ids)
    job.save(tmp_path / "run")
    result = cli("merge", tmp_path / "run", "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    stock = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert (run(stock, ids) - patched).abs().max() <= 1e-5
    assert (run(stock, ids) - run(transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval(), ids)).abs().max() > 1e-3


def test_inspect_tree_and_pattern(gpt2_dir):
    result = cli("inspect", gpt2_dir)
    assert result.exit_code == 0 and "c_attn" in result.output and "slices q,k,v" in result.output
    result = cli("inspect", gpt2_dir, "*.attn.<q,v>", "--json")
    assert result.exit_code == 0
    matches = json.loads(result.output)["matches"]
    assert matches == [{"path": f"transformer.h.{i}.attn.c_attn", "slices": ["q", "v"]} for i in range(2)]


def test_factory_model_reference(tmp_path):
    result = cli("check", ROOT / "specs" / "lora-qv.peft", "conftest:tiny_llama", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["totals"]["rewrites"] == 4


def test_real_process_prints_no_traceback_and_exits_2(tmp_path):
    bad = tmp_path / "bad.peft"
    bad.write_text("inject lora r=8 into *.attn.<q,v>\ninject lorra r=4 into *.mlp.up\n")
    done = subprocess.run([sys.executable, "-m", "surgeon", "check", str(bad), str(ROOT / "examples" / "tiny-llama")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert f"{bad}:2:8: error: unknown method 'inject lorra'" in done.stderr
    assert "did you mean 'lora'" in done.stderr


@pytest.mark.parametrize("spec", sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.peft")),
                         ids=lambda p: p.name)
def test_every_bundled_spec_checks_on_the_bundled_models(spec):
    """The specs in specs/ are documentation: each must plan on the example Llama and GPT-2."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    for model in ("tiny-llama", "tiny-gpt2"):
        if spec.name == "bitfit-lora.peft" and model == "tiny-llama":
            continue  # Llama has no biases: the spec's comment says so
        result = runner.invoke(app, ["check", str(spec), str(examples / model), "--json"])
        if spec.name == "longlora.peft" and model == "tiny-gpt2":  # PI needs RoPE; GPT-2 learns its positions
            assert result.exit_code == 2 and "no rotary position embedding" in result.output
            continue
        assert result.exit_code == 0, (model, result.output)
        assert json.loads(result.output)["totals"]["trainable_parameters"] > 0


def test_methods_lists_every_registered_method_and_one_methods_parameters():
    from surgeon.methods.base import registry

    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    listed = {row["statement"] for row in json.loads(result.output)}
    assert listed == {verb if verb == name else f"{verb} {name}" for verb, name in registry()}
    result = runner.invoke(app, ["methods", "relora", "--json"])
    (row,) = json.loads(result.output)
    assert row["parameters"]["restart_every"]["required"] and row["parameters"]["r"]["default"] == 8
    result = runner.invoke(app, ["methods", "lorra"])
    assert result.exit_code == 2 and "did you mean 'lora'" in result.output
