"""AdapterFusion's two stages with runs: two adapters trained in two runs, fused in a third spec
that loads both (`load adapters "RUN" as NAME`); only the fusion trains, the loss falls, the fused
run saves, loads and reverts, and the first runs stay as they were on disk. Bad loads and fusions
are refused where they are written, before anything changes."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_same_model, batch, clone, run, tiny_gpt2, tiny_llama, train_losses

import surgeon
from surgeon.errors import SpecError
from surgeon.language import parse_spec
from surgeon.methods.data_path.fusion import Fusion


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def two_runs(tmp_path: Path) -> Path:
    """Stage one: runs/sentiment and runs/nli, each one pfeiffer adapter trained apart."""
    for name, seed in (("sentiment", 1), ("nli", 2)):
        model = tiny_llama()
        job = surgeon.apply("inject adapter config=pfeiffer init=bert", model, seed=seed)
        train_losses(model, job.trainable_parameters().values(), steps=3)
        job.save(tmp_path / "runs" / name)
    return tmp_path


def test_a_fusion_of_two_loaded_runs_trains_alone_saves_loads_and_reverts(two_runs: Path) -> None:
    on_disk = {name: digests(two_runs / "runs" / name) for name in ("sentiment", "nli")}
    (two_runs / "fuse.peft").write_text('load adapters "runs/sentiment" as sentiment\n'
                                        'load adapters "runs/nli" as nli\n'
                                        "fuse adapters <sentiment,nli> as fusion\n")
    model = tiny_llama()
    original = clone(model)
    job = surgeon.apply(two_runs / "fuse.peft", model, seed=0)
    trainable = job.trainable_parameters()
    assert trainable and all(".adapter_fusion[sentiment,nli]." in name for name in trainable)
    loaded = {name: p for name, p in job.added_tensors().items() if name not in trainable}
    assert loaded and not any(p.requires_grad for p in loaded.values())
    before = {name: p.detach().clone() for name, p in loaded.items()}
    for name in ("sentiment", "nli"):  # the very tensors each run trained
        alone = tiny_llama()
        surgeon.load(two_runs / "runs" / name, alone)
        with job.active(name):
            assert torch.equal(run(model, batch()), run(alone, batch()))  # the fusion off: each adapter alone
    losses = train_losses(model, trainable.values(), steps=8)
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[n], p) for n, p in loaded.items())  # the loaded adapters did not move
    fused = run(model, batch())
    job.save(two_runs / "fused")
    fresh = tiny_llama()
    again = surgeon.load(two_runs / "fused", fresh)
    assert torch.equal(run(fresh, batch()), fused)
    assert set(again.trainable_parameters()) == set(trainable)
    saved = parse_spec((two_runs / "fused" / "spec.peft").read_text(), "spec.peft")
    assert [s.verb.text for s in saved.statements] == ["inject", "inject", "fuse"]  # the fused run holds it all
    again.revert()
    job.revert()
    assert_same_model(model, original)
    assert_same_model(fresh, original)
    assert {name: digests(two_runs / "runs" / name) for name in on_disk} == on_disk


def test_trainable_true_trains_the_loaded_adapter_too(two_runs: Path) -> None:
    model = tiny_llama()
    job = surgeon.apply(f'load adapters "{two_runs / "runs" / "nli"}" trainable=true as nli', model)
    assert job.manifest.frozen == [] and len(job.trainable_parameters()) == len(job.added_tensors())
    job.revert()


def test_the_temperature_a_fused_run_reached_is_what_it_loads_with(tmp_path: Path) -> None:
    model = tiny_llama()
    job = surgeon.apply("inject adapter init=bert as a\ninject adapter init=bert as b\n"
                        "fuse adapters <a,b> temperature=true", model, seed=0)
    with torch.no_grad():
        for _ in range(7):
            run(model, batch())
    reached = [f.temperature for f in model.modules() if isinstance(f, Fusion)]
    assert reached == [50.0 - 7 * 0.05] * 2 or all(abs(t - 49.65) < 1e-9 for t in reached)
    job.save(tmp_path / "run")
    fresh = tiny_llama()
    surgeon.load(tmp_path / "run", fresh)
    assert [f.temperature for f in fresh.modules() if isinstance(f, Fusion)] == reached
    assert torch.equal(run(fresh, batch()), run(model, batch()))


@pytest.mark.parametrize(("spec", "expected"), [
    ("inject adapter in layers.0 as a\ninject adapter as b\nfuse adapters <a,b>", "sit at different places"),
    ("inject adapter as a\ninject adapter as b\nfuse adapters <a,c>", "no adapter named 'c' before this statement"),
    ("inject adapter as sentiment\ninject adapter as b\nfuse adapters <sentimnt,b>", "did you mean 'sentiment'"),
    ("inject lora into *.attn.q as a\ninject adapter as b\nfuse adapters <a,b>", "'a' is 'inject lora'"),
    ("inject adapter config=houlsby as a\ninject adapter config=houlsby as b\nfuse adapters <a,b>",
     "'a' is 'inject adapter config=houlsby'"),
    ("inject adapter as a\nfuse adapters <a>", "at least two named adapters"),
    ("inject adapter as a\ninject adapter as b\nfuse adapters <a,b> into layers.0", "takes no target clause"),
    ("inject adapter as a\ninject adapter as b\nfuse <a,b>", "fuse takes 'adapters <a,b,...>'"),
])
def test_a_fusion_that_does_not_compose_is_refused_where_it_is_written(spec: str, expected: str) -> None:
    model = tiny_llama()
    original = clone(model)
    with pytest.raises(SpecError, match=expected) as err:
        surgeon.apply(spec, model)
    assert ":3:" in str(err.value) or ":2:" in str(err.value)  # located on the fuse statement
    assert_same_model(model, original)


def test_bad_loads_are_refused_at_the_path_and_change_nothing(two_runs: Path) -> None:
    runs = two_runs / "runs"
    tampered = two_runs / "tampered"
    shutil.copytree(runs / "nli", tampered)
    data = bytearray((tampered / "adapters.safetensors").read_bytes())
    data[-1] ^= 1
    (tampered / "adapters.safetensors").write_bytes(bytes(data))
    quantized = tiny_llama()
    surgeon.apply("quantize base nf4\ninject lora into *.attn.q", quantized).save(two_runs / "qlora")
    gpt2 = tiny_gpt2()
    surgeon.apply("inject adapter", gpt2).save(two_runs / "gpt2")
    cases = [
        (f'load adapters "{runs / "missing"}" as x', "run directory not found"),
        (f'load adapters "{tampered}" as x', "does not match the sha256 in the manifest"),
        (f'load adapters "{two_runs / "qlora"}" as x', "quantizes its base: load adapters brings in added adapters"),
        (f'load adapters "{two_runs / "gpt2"}" as x', "was trained on another base model"),
        (f'load adapters "{runs / "nli"}"', "load needs a name"),
        (f'load adapters {runs / "nli"} as x', "expected .*a quoted string"),
        (f'load adapters "{runs / "nli"}" as x\ninject lora into *.attn.q as x', "the name 'x' is taken twice"),
        (f'load adapters "{runs / "nli"}" frozen=true as x', "no parameter but trainable"),
    ]
    for spec, expected in cases:
        model = tiny_llama()
        original = clone(model)
        with pytest.raises(SpecError, match=expected):
            surgeon.apply(spec, model)
        assert_same_model(model, original)


def test_surgeon_check_plans_a_spec_that_loads_runs(two_runs: Path) -> None:
    """`surgeon check` (the model on the meta device, no weights read) plans the loaded statements."""
    import json

    from typer.testing import CliRunner

    from surgeon.cli import app

    (two_runs / "fuse.peft").write_text('load adapters "runs/sentiment" as sentiment\n'
                                        'load adapters "runs/nli" as nli\nfuse adapters <sentiment,nli>\n')
    result = CliRunner().invoke(app, ["check", str(two_runs / "fuse.peft"), "conftest:tiny_llama", "--json"])
    assert result.exit_code == 0, result.output
    methods = [r["method"] for r in json.loads(result.output)["rewrites"]]
    assert methods.count("inject adapter") == 4 and methods.count("fuse") == 2
