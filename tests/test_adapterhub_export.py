"""`surgeon export RUN --format adapterhub`: a run of bottleneck adapters as AdapterHub's saved adapter.

The reference is the library itself, in its own venv: tests/scripts/adapterhub/make_exports.py
(project venv) wrote the exports in tests/data/adapterhub/export_check, and check_export.py
(adapters 1.3.0) loaded each with `model.load_adapter` and wrote results.json. Here: those results;
that the current code still writes exactly those files (so a change that breaks the format fails
without the library); that the defaults are the library's own `save_adapter` layout; the round trip
through `surgeon import`; and the refusals.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_qwen2
from safetensors.torch import load_file
from typer.testing import CliRunner

import surgeon
from surgeon.cli import app

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "scripts" / "adapterhub"))
import make_exports  # noqa: E402  (the cases and the code path that made the committed exports)

FIXTURES = ROOT / "tests" / "data" / "adapterhub"
CHECK = FIXTURES / "export_check"
CASES = json.loads((CHECK / "cases.json").read_text())["cases"]
IDS = [c["name"] for c in CASES]
RESULTS = json.loads((CHECK / "results.json").read_text()) if (CHECK / "results.json").is_file() else None
TOL = json.loads((FIXTURES / "index.json").read_text())["tolerances"]["logits"]
runner = CliRunner()


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_cases_are_the_scripts_cases() -> None:
    assert [{k: c[k] for k in ("name", "model_type", "spec")} for c in CASES] == make_exports.CASES


# (a) AdapterHub's verdict on the committed exports


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapterhub_loads_the_export_with_surgeons_logits(case: dict) -> None:
    assert RESULTS is not None, "no results.json: run tests/scripts/adapterhub/check_export.py in the AdapterHub venv"
    assert RESULTS["versions"]["adapters"] == "1.3.0" and RESULTS["attn_implementation"] == "eager"
    found = RESULTS["cases"][case["name"]]
    folder = CHECK / case["adapter_dir"]
    # the results are of these very files, not of an earlier export
    assert found["sha256"] == {"adapter_config.json": sha256(folder / "adapter_config.json"),
                               "adapter.safetensors": sha256(folder / "adapter.safetensors"),
                               "surgeon.safetensors": sha256(CHECK / case["outputs"])}
    assert found["missing_keys"] == [] and found["unexpected_keys"] == []
    assert found["names_match_file"] and found["tensors_equal_file"]
    assert found["name_loaded"] == case["load_as"] and found["active_adapters"] == f"Stack[{case['load_as']}]"
    assert len(found["names_loaded"]) == len(load_file(str(folder / "adapter.safetensors")))
    config = json.loads((folder / "adapter_config.json").read_text())["config"]
    assert found["library_leave_out"] == config["leave_out"]
    assert set(found["max_abs_diff"]) == {"nopad", "pad"}
    for variant, diff in found["max_abs_diff"].items():
        assert diff <= TOL["atol"], (variant, diff)
        assert found["adapter_effect"][variant] > 1e-2  # the adapter acted: a no-op load cannot pass


# (b) the current code writes exactly the committed exports


_SCRATCH: list[Path] = []


@functools.cache
def exported(name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The case's run made again and exported by the CLI now: (its folder, the run's outputs);
    once per case for the tests below."""
    case = CASES[IDS.index(name)]
    scratch = Path(tempfile.mkdtemp(prefix="surgeon-adapterhub-export-"))
    _SCRATCH.append(scratch)
    outputs = make_exports.make_run(case, scratch / "run", case["seed"])
    here = os.getcwd()
    os.chdir(ROOT)  # the base is named relative to ROOT, as make_exports names it (model_name)
    try:
        result = make_exports.export(scratch / "run", scratch / "adapter", case["model_type"])
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    return scratch, outputs


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_cleanup():
    """One torch thread: on these tiny models a thread pool only adds stalls (100x on a busy
    machine), as make_exports.py also runs; restored afterwards, with the scratch folders removed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    exported.cache_clear()
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_fresh_export_equals_the_committed_one(case: dict) -> None:
    scratch, outputs = exported(case["name"])
    committed = CHECK / case["adapter_dir"]
    assert sorted(p.name for p in (scratch / "adapter").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert (scratch / "adapter" / "adapter_config.json").read_bytes() == (committed / "adapter_config.json").read_bytes()
    now, before = load_file(str(scratch / "adapter" / "adapter.safetensors")), load_file(str(committed / "adapter.safetensors"))
    assert list(now) == list(before)
    for name in before:
        assert now[name].dtype == before[name].dtype and torch.equal(now[name], before[name]), name
    stored = load_file(str(CHECK / case["outputs"]))
    assert set(outputs) == set(stored)
    for key, tensor in stored.items():  # the logits the library was compared with are still surgeon's
        torch.testing.assert_close(outputs[key], tensor, **TOL)


DEFAULTS = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn"}
LIBRARY_SAVED = [c for c in CASES if c["spec"].removeprefix("inject adapter config=") in DEFAULTS]


@pytest.mark.parametrize("case", LIBRARY_SAVED, ids=[c["name"] for c in LIBRARY_SAVED])
def test_a_default_export_is_the_librarys_own_save_adapter_layout(case: dict) -> None:
    """Against `model.save_adapter(dir, "a", use_safetensors=True)` of the library (the fixtures'
    saved/): the same config, keys and values, and the same tensor names and shapes."""
    method = DEFAULTS[case["spec"].removeprefix("inject adapter config=")]
    library = FIXTURES / case["model_type"] / method / "saved"
    ours = CHECK / case["adapter_dir"]
    theirs_config = json.loads((library / "adapter_config.json").read_text())
    our_config = json.loads((ours / "adapter_config.json").read_text())
    assert our_config["model_name"] == case["base_dir"] and our_config["name"] == "adapter"
    assert {k: v for k, v in our_config.items() if k not in ("model_name", "name")} == \
        {k: v for k, v in theirs_config.items() if k not in ("model_name", "name")}
    theirs = {k.replace(".adapters.a.", ".adapters.adapter."): t.shape for k, t in
              load_file(str(library / "adapter.safetensors")).items()}
    assert {k: t.shape for k, t in load_file(str(ours / "adapter.safetensors")).items()} == theirs


# (c) export, then `surgeon import`: the same outputs


# every architecture, both sites, every config, the explicit options and the leave_out cases
# (which import as `except LAYER`)
ROUND_TRIP = [c for c in CASES if c["name"] in ("bert-houlsby", "llama-parallel", "gpt2-pfeiffer", "t5-houlsby")
              or c["name"].endswith(("-options", "-layer1"))]


@pytest.mark.parametrize("case", ROUND_TRIP, ids=[c["name"] for c in ROUND_TRIP])
def test_an_export_imports_back_to_the_same_outputs(case: dict) -> None:
    scratch, outputs = exported(case["name"])
    result = cli("import", scratch / "adapter", "--model", ROOT / case["base_dir"], "--out", scratch / "imported",
                 "--json")
    assert result.exit_code == 0, result.output
    config = case["spec"].split()[2]
    assert config in json.loads(result.output)["spec"]
    model = make_exports.fixture_model(case["model_type"])
    surgeon.load(scratch / "imported", model)
    for variant, inputs in make_exports.inputs_of(case["model_type"]).items():
        assert torch.equal(make_exports.logits_of(model, inputs), outputs[f"{variant}.logits"]), variant


# (d) what AdapterHub cannot hold is refused, by the CLI, with nothing written


def _run_of(spec: str, folder: Path, model: torch.nn.Module | None = None) -> Path:
    model = model if model is not None else make_exports.fixture_model("llama")
    surgeon.apply(spec, model, seed=0).save(folder / "run")
    return folder / "run"


def _qwen2(folder: Path) -> torch.nn.Module:
    tiny_qwen2().save_pretrained(folder / "qwen2")
    return transformers.Qwen2ForCausalLM.from_pretrained(folder / "qwen2").eval()


@pytest.mark.parametrize("spec, message, base", [
    ("inject adapter config=pfeiffer\ninject lora r=2 into *.attn.<q,v>",
     "this run also has 'inject lora' (statement 2), which cannot be exported to AdapterHub", "llama"),
    ("inject lora r=2 into *.attn.<q,v>", "this run also has 'inject lora' (statement 1)", "llama"),
    ("inject adapter config=pfeiffer\ndrop adapters in layers.[0]", "'drop adapters' (statement 2)", "llama"),
    ("inject adapter config=pfeiffer in layers.[0]\ninject adapter config=parallel in layers.[1]",
     "statement 2 gives its adapters other settings", "llama"),
    ("inject adapter config=houlsby", "Qwen2DecoderLayer: AdapterHub's adapters 1.3 has no adapters for it", "qwen2"),
    ("inject adapter after *.mlp", "statement 1 places its adapters explicitly ('after PATTERN')", "llama"),
], ids=["adapter+lora", "lora", "adapterdrop", "two-configs", "qwen2", "explicit"])
def test_what_adapterhub_cannot_hold_is_refused_and_nothing_is_written(tmp_path: Path, spec: str, message: str,
                                                                        base: str) -> None:
    run_dir = _run_of(spec, tmp_path, _qwen2(tmp_path) if base == "qwen2" else None)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("export", run_dir, "--format", "adapterhub", "--out", tmp_path / "adapter")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out, no staging folder left


def test_a_non_empty_out_is_kept_unless_forced(tmp_path: Path) -> None:
    run_dir = _run_of("inject adapter config=pfeiffer", tmp_path)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = cli("export", run_dir, "--format", "adapterhub", "--out", out)
    assert result.exit_code == 2 and "already exists and is not empty" in result.output
    assert "Traceback" not in result.output and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "run"]
    result = cli("export", run_dir, "--format", "adapterhub", "--out", out, "--force", "--json")  # the CLI's convention
    assert result.exit_code == 0, result.output
    said = json.loads(result.output)
    assert said["format"] == "adapterhub" and said["config"]["original_ln_before"] is True
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_an_unknown_format_names_the_formats(tmp_path: Path) -> None:
    run_dir = _run_of("inject adapter config=pfeiffer", tmp_path)
    result = cli("export", run_dir, "--format", "adapterhu", "--out", tmp_path / "adapter")
    assert result.exit_code == 2 and "the export formats are 'peft' and 'adapterhub'" in result.output
    assert not (tmp_path / "adapter").exists()


def test_a_run_of_several_named_adapters_is_refused_for_adapterhub(tmp_path) -> None:
    from conftest import tiny_llama

    job = surgeon.apply("inject adapter as a\ninject adapter as b", tiny_llama())
    with pytest.raises(surgeon.SurgeonError, match="holds one adapter; this run has a, b"):
        job.save(tmp_path / "ah", format="adapterhub")
    assert not (tmp_path / "ah").exists()
