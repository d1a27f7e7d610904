"""Every user mistake: a clear message that says where and what, exit status 2, nothing changed."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_same_model, clone, tiny_gpt2, tiny_llama
from typer.testing import CliRunner

import surgeon
from surgeon.cli import app
from surgeon.errors import SpecError, SurgeonError

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "tiny-llama", tmp_path / "model")
    return tmp_path


def fails(workspace: Path, spec_text: str, *expected: str, command: str = "check") -> str:
    """Run the CLI on a spec that must fail; check message, status, and that no file changed."""
    spec = workspace / "bad.peft"
    spec.write_text(spec_text)
    before = tree_digest(workspace)
    args = [command, str(spec), str(workspace / "model")]
    if command == "apply":
        args += ["--out", str(workspace / "run")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for words in expected:
        assert words in result.output, result.output
    assert tree_digest(workspace) == before
    return result.output


SPEC_ERRORS = [
    # spec text, expected fragments
    ("inject lora r=8 into *.attn.<q,v> extra", [":1:35: error: unexpected 'extra'", "^~"]),
    ("inject lora r=8 into\n*.attn.q", [":1:21: error: unexpected end of line", "expected a module pattern"]),
    ("injekt lora r=8 into *.attn.q", [":1:1: error: unknown verb 'injekt'", "did you mean 'inject'?"]),
    ("inject lorra r=8 into *.attn.q", [":1:8: error: unknown method 'inject lorra'", "did you mean 'lora'"]),
    ("inject lora r=8 alpah=16 into *.attn.q", [":1:17: error: unknown parameter 'alpah' for lora", "did you mean 'alpha'?"]),
    ("inject lora r=0 into *.attn.q", [":1:13: error: bad value 0 for 'r'", "greater than or equal to 1"]),
    ("inject lora dropout=1.5 into *.attn.q", ["bad value 1.5 for 'dropout'"]),
    ("inject lora init=xavier into *.attn.q", ["bad value 'xavier' for 'init'", "'gaussian' or 'kaiming'"]),
    ("inject lora init=kaiming_uniform into *.attn.q", ["bad value 'kaiming_uniform' for 'init'", "did you mean 'kaiming'?"]),
    ("inject lora r=8 r=4 into *.attn.q", ["parameter 'r' is given twice"]),
    ("inject lora r=8 into *.atn.q", [":1:17: error: pattern '*.atn.q' matches no module", "nearest module names: attn.q"]),
    ("inject lora r=8 into *.attn.<q,v", ["bad pattern: '<' is never closed"]),
    ("inject lora r=8 into *.norm", ["is a LlamaRMSNorm (norm); lora accepts conv1d, conv2d, embedding, linear",
                                     "add 'except PATTERN'"]),
    ("inject lora r=8 into *.attn.q\ninject lora r=4 into layers.0.attn.<q,k>",
     [":2:1: error: model.layers.0.self_attn.q_proj is targeted twice", "(line 1)", "(line 2)"]),
    ("inject lora r=128 into *.attn.v", ["r=128 is larger than model.layers.0.self_attn.v_proj allows (at most 32)"]),
    ("inject lora r=8 after *.attn.q", ["lora does not take 'after'", "use 'into'"]),
    ("inject lora r=8", ["lora needs a target: 'into PATTERN'"]),
    ("inject lora r=8 into *.attn.q except *.attn.q", ["nothing is left to patch after 'except'"]),
]


@pytest.mark.parametrize(("text", "expected"), SPEC_ERRORS, ids=[t[:30] for t, _ in SPEC_ERRORS])
def test_spec_errors_in_check_and_apply(workspace, text, expected):
    for command in ("check", "apply"):
        fails(workspace, text, *expected, command=command)
    assert not (workspace / "run").exists()


def test_spec_errors_leave_a_python_model_untouched():
    model = tiny_llama()
    original = clone(model)
    for text, expected in SPEC_ERRORS:
        with pytest.raises(SurgeonError) as info:
            surgeon.apply(text, model)
        assert expected[0].split("error: ")[-1] in str(info.value)
        assert_same_model(model, original)


def test_tied_weights_need_saying_so():
    model = tiny_gpt2()
    original = clone(model)
    with pytest.raises(SpecError, match=r"transformer.wte shares its weights with lm_head \(tied weights\)") as info:
        surgeon.apply("inject lora r=4 into embed", model)
    assert "add tied=true" in str(info.value)
    assert_same_model(model, original)
    job = surgeon.apply("inject lora r=4 tied=true into embed", model)
    assert "transformer.wte.lora_A" in job.trainable_parameters()


def test_model_errors(workspace):
    spec = ROOT / "specs" / "lora-qv.peft"
    result = runner.invoke(app, ["check", str(spec), str(workspace / "nope")])
    assert result.exit_code == 2 and "model path not found" in result.output
    (workspace / "empty").mkdir()
    result = runner.invoke(app, ["check", str(spec), str(workspace / "empty")])
    assert result.exit_code == 2 and "not a Hugging Face model directory (no config.json)" in result.output
    (workspace / "model" / "model.safetensors").write_bytes(b"\x00garbage")
    before = tree_digest(workspace)
    result = runner.invoke(app, ["apply", str(spec), str(workspace / "model"), "--out", str(workspace / "run")])
    assert result.exit_code == 2 and "cannot read checkpoint" in result.output, result.output
    assert tree_digest(workspace) == before
    result = runner.invoke(app, ["check", str(workspace / "missing.peft"), str(workspace / "model")])
    assert result.exit_code == 2 and "spec file not found" in result.output
    result = runner.invoke(app, ["check", str(spec), "nosuchpackage.mod:factory"])
    assert result.exit_code == 2 and "cannot import model factory 'nosuchpackage.mod:factory'" in result.output


@pytest.fixture
def applied(workspace) -> Path:
    result = runner.invoke(app, ["apply", str(ROOT / "specs" / "lora-qv.peft"), str(workspace / "model"),
                                 "--out", str(workspace / "run")])
    assert result.exit_code == 0, result.output
    return workspace


def _revert_fails(workspace: Path, *expected: str) -> None:
    before = tree_digest(workspace)
    result = runner.invoke(app, ["revert", str(workspace / "run"), "--out", str(workspace / "restored")])
    assert result.exit_code == 2, result.output
    for words in expected:
        assert words in result.output, result.output
    assert tree_digest(workspace) == before
    assert not (workspace / "restored").exists()


def test_corrupt_manifest(applied):
    (applied / "run" / "manifest.json").write_text("{not json")
    _revert_fails(applied, "manifest.json is corrupt")


def test_edited_manifest(applied):
    manifest = json.loads((applied / "run" / "manifest.json").read_text())
    manifest["patches"][0]["params"]["r"] = 4
    (applied / "run" / "manifest.json").write_text(json.dumps(manifest))
    _revert_fails(applied, "was edited or corrupted after surgeon wrote it")


def test_tampered_adapters(applied):
    path = applied / "run" / "adapters.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    _revert_fails(applied, "adapters.safetensors does not match the sha256 in the manifest")


def test_missing_manifest_and_run(applied):
    (applied / "run" / "manifest.json").unlink()
    _revert_fails(applied, "has no manifest.json: not a surgeon run directory")
    shutil.rmtree(applied / "run")
    _revert_fails(applied, "run directory not found")


def test_changed_source_model_is_named(applied):
    from safetensors.torch import load_file, save_file

    path = applied / "model" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.self_attn.v_proj.weight"][0, 0] += 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    _revert_fails(applied, "model.safetensors is not the file the run was made from")


def test_out_must_be_new(applied):
    (applied / "restored").mkdir()
    (applied / "restored" / "keep.txt").write_text("mine")
    before = tree_digest(applied)
    result = runner.invoke(app, ["revert", str(applied / "run"), "--out", str(applied / "restored")])
    assert result.exit_code == 2 and "already exists and is not empty" in result.output
    assert tree_digest(applied) == before


def test_memory_run_cannot_be_reverted_from_the_cli(tmp_path):
    job = surgeon.apply("inject lora r=2 into *.attn.q", tiny_llama())
    job.save(tmp_path / "run")
    result = runner.invoke(app, ["revert", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "does not record a model directory it was read from; pass its base model" in result.output


# PEFT's parameter names -> surgeon's: the hint names surgeon's spelling (difflib alone finds
# nothing for `rank` or `target_modules`); the caret stays on the parameter PEFT named
PEFT_SPELLINGS = [
    ("inject lora rank=8 into *.attn.q", ":1:13:", "unknown parameter 'rank' for lora", "did you mean 'r'?"),
    ("inject lora r=8 lora_r=8 into *.attn.q", ":1:17:", "unknown parameter 'lora_r'", "did you mean 'r'?"),
    ("inject lora r=8 lora_alpha=16 into *.attn.q", ":1:17:", "unknown parameter 'lora_alpha'",
     "did you mean 'alpha'?"),
    ("inject lora lora_dropout=0.1 into *.attn.q", ":1:13:", "unknown parameter 'lora_dropout'",
     "did you mean 'dropout'?"),
    ("inject lora init_lora_weights=gaussian into *.attn.q", ":1:13:", "unknown parameter 'init_lora_weights'",
     "did you mean 'init'?"),
    ("inject lora r=8 target_modules=[q_proj, v_proj]", ":1:17:", "unknown parameter 'target_modules'",
     "write the targets after 'into': `inject lora r=8 into <q_proj,v_proj>`"),
    ("inject lora r=8 into *.attn.q\ninject lora target_modules=\"q|v\" r=4", ":2:13:",
     "unknown parameter 'target_modules'", "write the targets after 'into': `inject lora r=4 into *.attn.<q,v>`"),
    ("train bias target_modules=q_proj", ":1:12:", "unknown parameter 'target_modules' for bias",
     "write the targets after 'in': `train bias in q_proj`"),
    ("inject lora r=8 modules_to_save=[lm_head] into *.attn.q", ":1:17:", "unknown parameter 'modules_to_save'",
     "use `train weights in PATTERN`"),
]


@pytest.mark.parametrize(("text", "where", "message", "hint"), PEFT_SPELLINGS, ids=[t[:36] for t, *_ in PEFT_SPELLINGS])
def test_peft_spellings_suggest_surgeons_names(workspace, text, where, message, hint):
    output = fails(workspace, text, f"{where} error: {message}", hint)
    line = int(where.split(":")[1])
    caret_line = output.splitlines()[output.splitlines().index(f"  {text.splitlines()[line - 1]}") + 1]
    key = message.split("'")[1]
    column = int(where.split(":")[2])
    assert caret_line == "  " + " " * (column - 1) + "^" + "~" * (len(key) - 1)  # under the key PEFT spells
    assert text.splitlines()[line - 1][column - 1:].startswith(key)
    model = tiny_llama()
    original = clone(model)
    with pytest.raises(SpecError) as err:
        surgeon.apply(text, model)
    assert err.value.location.line == line and err.value.location.column == column
    assert hint in str(err.value)
    assert_same_model(model, original)


def test_a_wrong_name_that_is_no_peft_name_keeps_difflib():
    with pytest.raises(SpecError, match="did you mean 'alpha'"):
        surgeon.check("inject lora alpah=8 into *.attn.q", tiny_llama())


def test_an_unknown_parameter_is_named_before_a_missing_one():
    """`rank=3` beside a missing total_steps: the unknown key is the likely cause of both."""
    with pytest.raises(SpecError, match="unknown parameter 'rank' for adalora"):
        surgeon.check("inject adalora rank=3 into *.attn.q", tiny_llama())
