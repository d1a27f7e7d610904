"""A run directory is untrusted input: nothing in it is executed or used as a path outside it, only
safetensors are read, what it records must match the plan its spec gives, and every refusal is a
clear message with exit status 2 that leaves the model and every file as they were."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_files, tiny_llama
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import surgeon
from surgeon.cli import app
from surgeon.errors import ManifestError, SurgeonError

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def reseal(run: Path, mutate) -> None:
    """Edit manifest.json as an attacker would: change it, then recompute the unkeyed checksum."""
    path = run / "manifest.json"
    data = json.loads(path.read_text())
    mutate(data)
    body = {k: v for k, v in data.items() if k != "checksum"}
    data["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    path.write_text(json.dumps(data))


def cli_fails(args: list, *expected: str, unchanged: Path) -> str:
    before = tree_digest(unchanged)
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for words in expected:
        assert words in result.output, result.output
    assert tree_digest(unchanged) == before
    return result.output


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "tiny-llama", tmp_path / "model")
    result = runner.invoke(app, ["apply", str(ROOT / "specs" / "lora-qv.peft"), str(tmp_path / "model"),
                                 "--out", str(tmp_path / "run"), "--seed", "0"])
    assert result.exit_code == 0, result.output
    return tmp_path


@pytest.fixture
def memory_qlora_run(tmp_path: Path) -> Path:
    """A QLoRA run made from a model in memory: its replaced originals are spilled into the run."""
    job = surgeon.apply("quantize base nf4\ninject lora r=2 into *.attn.q", tiny_llama(), seed=0)
    job.save(tmp_path / "run")
    assert (tmp_path / "run" / "originals").is_dir()
    tiny_llama().save_pretrained(tmp_path / "model")
    return tmp_path


def test_a_factory_named_by_a_manifest_is_never_run(workspace):
    marker = workspace / "ran"
    (workspace / "evil_factory.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\ndef build():\n    return None\n")
    sys.path.insert(0, str(workspace))
    try:
        reseal(workspace / "run", lambda m: (m["source"].update(kind="factory", location="evil_factory:build", files={}),
                                             m.update(originals={"kind": "none", "location": None})))
        for command in ("revert", "merge", "export", "fold"):
            cli_fails([command, workspace / "run", "--out", workspace / "out"],
                      "surgeon does not run code that a run directory names", "--model evil_factory:build",
                      unchanged=workspace)
        assert not marker.exists() and "evil_factory" not in sys.modules
    finally:
        sys.path.remove(str(workspace))


def test_a_factory_the_user_names_is_run(tmp_path):
    (tmp_path / "good_factory.py").write_text(
        "import torch\ndef build():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Linear(8, 8))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        result = runner.invoke(app, ["apply", "inject lora r=2 into 0", "good_factory:build", "--out",
                                     str(tmp_path / "run")])
        assert result.exit_code == 0, result.output
        cli_fails(["revert", tmp_path / "run", "--out", tmp_path / "out"], "--model good_factory:build",
                  unchanged=tmp_path)
        result = runner.invoke(app, ["revert", str(tmp_path / "run"), "--model", "good_factory:build", "--out",
                                     str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.parametrize("location", ["/anywhere", "../../outside", "originals/../../x", ""])
def test_spilled_originals_must_lie_inside_the_run(memory_qlora_run, location):
    work = memory_qlora_run
    reseal(work / "run", lambda m: m["originals"].update(location=location))
    cli_fails(["revert", work / "run", "--model", work / "model", "--out", work / "out"],
              "is not a path inside the run directory", unchanged=work)
    assert not Path("/anywhere").exists() and not (work.parent / "outside").exists()


def test_a_symlink_out_of_the_run_is_refused(memory_qlora_run, tmp_path_factory):
    work = memory_qlora_run
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.move(work / "run" / "originals", elsewhere / "originals")
    (work / "run" / "originals").symlink_to(elsewhere / "originals")
    with pytest.raises(ManifestError, match="leads outside the run directory"):
        surgeon.load(work / "run", tiny_llama())


def test_a_saved_run_is_only_read(memory_qlora_run):
    """Re-applying a saved QLoRA run never writes into its originals folder."""
    work = memory_qlora_run
    gone = sorted((work / "run" / "originals").iterdir())[0]
    gone.unlink()
    before = tree_digest(work)
    with pytest.raises(SurgeonError, match="does not hold the original of"):
        surgeon.load(work / "run", tiny_llama())
    assert tree_digest(work) == before


def test_checkpoint_originals_must_be_the_source(workspace, tmp_path_factory):
    run = workspace / "qrun"
    result = runner.invoke(app, ["apply", str(ROOT / "specs" / "qlora.peft"), str(workspace / "model"),
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    reseal(run, lambda m: m["originals"].update(location=str(tmp_path_factory.mktemp("other"))))
    cli_fails(["revert", run, "--out", workspace / "out"], "which is not that checkpoint", unchanged=workspace)


@pytest.mark.parametrize("target", ["../../etc/passwd", "model.nope", "model.layers.0.self_attn.k_proj"])
@pytest.mark.parametrize("command", ["revert", "merge"])
def test_patch_targets_must_match_the_plan(workspace, target, command):
    reseal(workspace / "run", lambda m: m["patches"][0].update(target=target))
    cli_fails([command, workspace / "run", "--out", workspace / "out"], "is not in the plan its spec gives",
              unchanged=workspace)


def test_patch_parameters_must_match_the_plan(workspace):
    reseal(workspace / "run", lambda m: m["patches"][1]["params"].update(r=4))
    cli_fails(["revert", workspace / "run", "--out", workspace / "out"], "other slices or parameters",
              unchanged=workspace)


def test_unknown_manifest_fields_are_refused(workspace):
    reseal(workspace / "run", lambda m: m.update(extra_field=1))
    cli_fails(["revert", workspace / "run", "--out", workspace / "out"], "manifest.json is corrupt: extra_field",
              unchanged=workspace)
    reseal(workspace / "run", lambda m: (m.pop("extra_field"), m["patches"][0].update(hidden=True)))
    cli_fails(["revert", workspace / "run", "--out", workspace / "out"], "patches.0.hidden", unchanged=workspace)


def _resave_adapters(run: Path, mutate) -> None:
    tensors = load_file(str(run / "adapters.safetensors"))
    mutate(tensors)
    save_file(tensors, str(run / "adapters.safetensors"))
    digest = hashlib.sha256((run / "adapters.safetensors").read_bytes()).hexdigest()
    reseal(run, lambda m: m.update(adapter_sha256=digest))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda t: t.update({"state::abc::x": torch.zeros(1)}), "'state::abc::x', which is no patch state"),
    (lambda t: t.update({"state::0::": torch.zeros(1)}), "which is no patch state"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.lora_A": torch.zeros(1)}),
     "unexpected ['model.layers.0.mlp.up_proj.lora_A']"),
    (lambda t: t.pop(next(iter(t))), "missing ["),
])
def test_adapter_tensors_must_be_exactly_the_runs(workspace, mutate, message):
    _resave_adapters(workspace / "run", mutate)
    cli_fails(["revert", workspace / "run", "--out", workspace / "out"], message, unchanged=workspace)


def test_relora_state_must_fit(tmp_path):
    job = surgeon.apply("inject relora r=2 restart_every=2 into *.attn.q", tiny_llama(), seed=0)
    job.save(tmp_path / "run")
    _resave_adapters(tmp_path / "run", lambda t: t.update({"state::0::base.nope": torch.zeros(2)}))
    model = tiny_llama()
    with pytest.raises(ManifestError, match="does not fit this ReLoRA patch"):
        surgeon.load(tmp_path / "run", model)


@pytest.mark.parametrize("out", ["model", "model/inner", "."])
def test_out_may_not_overlap_what_is_read(workspace, out):
    spec = ROOT / "specs" / "lora-qv.peft"
    cli_fails(["apply", spec, workspace / "model", "--out", workspace / out, "--force"],
              "which this command reads", unchanged=workspace)
    cli_fails(["revert", workspace / "run", "--out", workspace / out.replace("model", "run"), "--force"],
              "which this command reads", unchanged=workspace)


@pytest.mark.parametrize("out", ["/proc/surgeon-x", "/dev/null/x"])
def test_unwritable_out_is_a_clear_error(workspace, out):
    cli_fails(["revert", workspace / "run", "--out", out], "cannot write", unchanged=workspace)


def test_a_factory_that_needs_arguments(tmp_path):
    cli_fails(["check", ROOT / "specs" / "lora-qv.peft", "torch.nn:Linear"], "calling the model factory "
              "'torch.nn:Linear' failed (TypeError", unchanged=tmp_path)


@pytest.mark.parametrize("damage", ["extra-safetensors", "index", "index-outside", "pickle", "pickle-only"])
def test_source_folders_are_read_as_safetensors_only(workspace, damage):
    model = workspace / "model"
    expected = {
        "extra-safetensors": "decoy.safetensors: not a valid safetensors file",
        "index": "model.safetensors.index.json: not a valid shard index",
        "index-outside": "which is not a file in",
        "pickle": "pytorch_model.bin is a pickle",
        "pickle-only": "pytorch_model.bin is a pickle",
    }[damage]
    if damage == "extra-safetensors":
        (model / "decoy.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    elif damage == "index":
        (model / "model.safetensors.index.json").write_text("{not json")
    elif damage == "index-outside":
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../run/adapters.safetensors"}}))
    else:
        torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")
        if damage == "pickle-only":
            (model / "model.safetensors").unlink()
    for args in (["check", ROOT / "specs" / "lora-qv.peft", model],
                 ["apply", ROOT / "specs" / "qlora.peft", model, "--out", workspace / "out"]):
        cli_fails(args, expected, unchanged=workspace)
    # revert first compares the source's files with those the run was made from, then reads them
    changed = {"extra-safetensors": "decoy.safetensors is not the file the run was made from",
               "index": "model.safetensors.index.json is not the file the run was made from",
               "index-outside": "model.safetensors.index.json is not the file the run was made from",
               "pickle-only": "model.safetensors is not the file the run was made from"}.get(damage, expected)
    cli_fails(["revert", workspace / "run", "--out", workspace / "out"], changed, unchanged=workspace)


def test_config_architectures_pick_only_model_classes(workspace):
    config = json.loads((workspace / "model" / "config.json").read_text())
    config["architectures"] = ["set_seed"]  # a transformers function, not a model class
    (workspace / "model" / "config.json").write_text(json.dumps(config))
    from surgeon.models import _hf_class

    assert _hf_class(workspace / "model").__name__ == "AutoModel"


def test_revert_refuses_a_source_that_changed_where_it_did_not_hash(workspace):
    path = workspace / "model" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.k_proj.weight"][0, 0] += 1.0  # a tensor the run did not touch
    save_file(tensors, str(path), metadata={"format": "pt"})
    cli_fails(["revert", workspace / "run", "--out", workspace / "out"],
              "model.safetensors is not the file the run was made from", "--full-fingerprint", unchanged=workspace)


def test_a_full_fingerprint_checks_every_tensor_and_survives_a_copy(workspace):
    run = workspace / "full"
    result = runner.invoke(app, ["apply", str(ROOT / "specs" / "lora-qv.peft"), str(workspace / "model"),
                                 "--out", str(run), "--full-fingerprint"])
    assert result.exit_code == 0, result.output
    os.utime(workspace / "model" / "model.safetensors")  # touched (a copy), same bytes
    result = runner.invoke(app, ["revert", str(run), "--out", str(workspace / "out"), "--verify-all"])
    assert result.exit_code == 0, result.output
    assert_same_files(workspace / "out", workspace / "model")
    path = workspace / "model" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.k_proj.weight"][0, 0] += 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    cli_fails(["revert", run, "--out", workspace / "out2", "--verify-all"],
              "model.layers.0.self_attn.k_proj.weight differs from the original (sha256 mismatch)", unchanged=workspace)
    cli_fails(["revert", workspace / "run", "--out", workspace / "out2", "--verify-all"],
              "--verify-all cannot check", unchanged=workspace)


def test_runs_signed_with_a_key(workspace, monkeypatch, tmp_path):
    monkeypatch.setenv("SURGEON_RUN_KEY", "secret")
    job = surgeon.apply("inject lora r=2 into *.attn.q", tiny_llama(), seed=0)
    job.save(tmp_path / "signed")
    assert json.loads((tmp_path / "signed" / "manifest.json").read_text())["checksum_kind"] == "hmac-sha256"
    surgeon.load(tmp_path / "signed", tiny_llama()).revert()
    with pytest.raises(ManifestError, match="only runs signed with that key are read"):
        surgeon.load(workspace / "run", tiny_llama())  # unsigned
    reseal(tmp_path / "signed", lambda m: m.update(checksum_kind="sha256"))  # an attacker's re-seal
    with pytest.raises(ManifestError, match="is not signed"):
        surgeon.load(tmp_path / "signed", tiny_llama())
    job.save(tmp_path / "signed")
    monkeypatch.setenv("SURGEON_RUN_KEY", "other")
    with pytest.raises(ManifestError, match="is not signed with this SURGEON_RUN_KEY"):
        surgeon.load(tmp_path / "signed", tiny_llama())
    monkeypatch.delenv("SURGEON_RUN_KEY")
    with pytest.raises(ManifestError, match="is signed with a key"):
        surgeon.load(tmp_path / "signed", tiny_llama())


def test_outputs_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        job = surgeon.apply("quantize base nf4\ninject lora r=2 into *.attn.q", tiny_llama(), seed=0)
        job.save(tmp_path / "run")
    finally:
        os.umask(old)
    for path in [tmp_path / "run", *(tmp_path / "run").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_save_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    job = surgeon.apply("inject lora r=2 into *.attn.q", tiny_llama(), seed=0)
    with pytest.raises(SurgeonError, match="holds something other than a saved run"):
        job.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_leftovers_of_a_dead_writer_are_cleaned_or_recovered(tmp_path):
    job = surgeon.apply("inject lora r=2 into *.attn.q", tiny_llama(), seed=0)
    job.save(tmp_path / "run")
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process
    (tmp_path / f".run.surgeon-new-{dead}-abc").mkdir()
    (tmp_path / f".run.surgeon-old-{dead}-abc").mkdir()
    job.save(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (tmp_path / "run").rename(tmp_path / f".run.surgeon-old-{dead}-def")  # died between two renames
    from surgeon.files import write_dir

    def fails(staging: Path) -> None:
        raise RuntimeError("the new write fails")

    with pytest.raises(RuntimeError):
        write_dir(tmp_path / "run", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old run came back
    surgeon.load(tmp_path / "run", tiny_llama())


def test_the_model_the_user_names_serves_the_originals_too(workspace):
    run = workspace / "qrun"
    result = runner.invoke(app, ["apply", str(ROOT / "specs" / "qlora.peft"), str(workspace / "model"),
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    shutil.copytree(workspace / "model", workspace / "moved")  # copy2: the same bytes and mtimes
    shutil.rmtree(workspace / "model")
    cli_fails(["revert", run, "--out", workspace / "out"], "model path not found", unchanged=workspace)
    result = runner.invoke(app, ["revert", str(run), "--model", str(workspace / "moved"), "--out",
                                 str(workspace / "out")])
    assert result.exit_code == 0, result.output
    assert_same_files(workspace / "out", workspace / "moved")


@pytest.mark.parametrize("stars", [20, 10_000])
def test_a_pattern_of_many_stars_fails_at_once(tmp_path, stars):
    """The reproduction: 16 stars took 13-15 s in the backtracking regex, 20 would take hours (the
    matcher's step count is tested linear in tests/test_language.py; no wall clock here)."""
    cli_fails(["check", f"inject lora into {'*' * stars}zzz", ROOT / "examples" / "tiny-llama"],
              "matches no module", unchanged=tmp_path)
