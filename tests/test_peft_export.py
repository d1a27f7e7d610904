"""PEFT interchange: a surgeon run exported with `job.save(dir, format="peft")` / `surgeon export`
loads in peft.PeftModel.from_pretrained with the same outputs, and a PEFT adapter imported with
`surgeon import` gives a run whose spec says the same thing and whose outputs are PEFT's."""

import json
from pathlib import Path

import pytest
import torch
from conftest import BUILDERS, batch, clone, run, tiny_gpt2, tiny_llama
from typer.testing import CliRunner

import surgeon
from surgeon.cli import app
from surgeon.errors import ExportError

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
runner = CliRunner()

EXPORTS = [
    ("llama", "inject lora r=4 alpha=8 into *.attn.<q,v>\ninject lora r=2 alpha=6 into *.mlp.down"),
    ("llama", "inject lora r=4 alpha=8 dropout=0.1 rslora=true into *.mlp.<up,gate>"),
    ("gpt2", "inject lora r=4 alpha=8 bias=lora_only into c_attn\ninject lora r=4 alpha=8 bias=lora_only tied=true into wte"),
    ("bert", "inject lora r=3 alpha=6 into *.attn.<q,v>"),
    ("t5", "inject lora r=4 alpha=8 into **.<attn,cross_attn>.<q,v>"),
]


def randomize(job: surgeon.Job, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize(("arch", "spec"), EXPORTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(EXPORTS)])
def test_an_exported_run_loads_in_peft_with_the_same_outputs(tmp_path, arch, spec):
    model = BUILDERS[arch]()
    fresh = clone(model)
    job = surgeon.apply(spec, model, seed=0)
    randomize(job)
    job.save(tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    model.eval()
    ids = batch()
    assert (run(model, ids) - run(BUILDERS[arch]().eval(), ids)).abs().max() > 1e-3  # a real delta
    assert (run(loaded, ids) - run(model, ids)).abs().max() <= 1e-5
    peft_trainable = sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n)
    ours = sum(p.numel() for n, p in job.trainable_parameters().items() if ".lora_" in n)
    assert peft_trainable == ours


def test_two_ranks_become_peft_rank_and_alpha_patterns(tmp_path):
    job = surgeon.apply(EXPORTS[0][1], tiny_llama(), seed=0)
    job.save(tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {f"model.layers.{i}.mlp.down_proj": 2 for i in range(2)}
    assert config["alpha_pattern"] == {f"model.layers.{i}.mlp.down_proj": 6 for i in range(2)}


def test_what_peft_cannot_hold_is_refused_with_the_reason(tmp_path):
    job = surgeon.apply("inject lora r=4 into *.attn.<q,v>", tiny_gpt2(), seed=0)
    with pytest.raises(ExportError, match="q/v slice of the fused transformer.h.0.attn.c_attn has no PEFT equivalent"):
        job.save(tmp_path / "adapter", format="peft")
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()
    mixed = surgeon.apply("inject lora r=4 into *.attn.q\ninject lora r=4 dropout=0.1 into *.attn.v", tiny_llama())
    with pytest.raises(ExportError, match="disagree on PEFT's 'lora_dropout'"):
        mixed.save(tmp_path / "adapter2", format="peft")


def _peft_adapter(tmp_path: Path) -> tuple[torch.nn.Module, Path, Path]:
    """A PEFT LoRA adapter with random non-zero weights on a tiny Llama saved as a HF directory."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 2}, lora_dropout=0.0)
    model = peft.get_peft_model(clone(base), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    return model.eval(), tmp_path / "base", tmp_path / "adapter"


def test_import_from_peft_and_export_back(tmp_path):
    peft_model, base_dir, adapter_dir = _peft_adapter(tmp_path)
    result = runner.invoke(app, ["import", str(adapter_dir), "--model", str(base_dir), "--out", str(tmp_path / "run"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    spec = json.loads(result.output)["spec"]
    assert "inject lora r=4 alpha=8 into <q_proj,v_proj>" in spec
    assert "inject lora r=2 alpha=8 into down_proj" in spec
    from surgeon.models import load_model

    fresh, _ = load_model(str(base_dir))
    job = surgeon.load(tmp_path / "run", fresh)
    ids = batch()
    assert (run(fresh, ids) - run(peft_model, ids)).abs().max() <= 1e-5
    # and back to PEFT through the CLI
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--format", "peft", "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    reloaded = peft.PeftModel.from_pretrained(load_model(str(base_dir))[0], tmp_path / "again").eval()
    assert (run(reloaded, ids) - run(peft_model, ids)).abs().max() <= 1e-5
    job.revert()
    assert (run(fresh, ids) - run(load_model(str(base_dir))[0], ids)).abs().max() == 0


def test_import_errors_are_clear_and_write_nothing(tmp_path):
    _, base_dir, adapter_dir = _peft_adapter(tmp_path)
    tiny_gpt2().save_pretrained(tmp_path / "other")
    bad_type = tmp_path / "vera"
    bad_type.mkdir()
    (bad_type / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA"}))
    (bad_type / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "empty", str(base_dir), "has no adapter_config.json: not a PEFT adapter directory"),
        (adapter_dir, str(tmp_path / "other"), "belongs to no module of this model"),
        (bad_type, str(base_dir), "PEFT type VERA has no surgeon method"),
        (adapter_dir, str(tmp_path / "missing"), "model path not found"),
    ]
    for source, model, message in cases:
        result = runner.invoke(app, ["import", str(source), "--model", model, "--out", str(tmp_path / "run")])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "run").exists()


def test_export_refusal_from_the_cli_writes_nothing(tmp_path):
    from surgeon.models import load_model

    import shutil

    shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "tiny-gpt2", tmp_path / "model")
    model, source = load_model(str(tmp_path / "model"))
    surgeon.apply("inject lora r=2 into *.attn.<q,v>", model, source=source).save(tmp_path / "run")
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "adapter")])
    assert result.exit_code == 2
    assert "has no PEFT equivalent" in result.output and not (tmp_path / "adapter").exists()
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "the export formats are 'peft' and 'adapterhub'" in result.output


def test_qlora_exports_its_lora_only(tmp_path):
    job = surgeon.apply("quantize base nf4 double compute=fp32\ninject lora r=4 alpha=8 into *.attn.<q,v>", tiny_llama())
    job.save(tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]  # as a PEFT user writes them: they pick the same modules


def test_target_modules_stay_full_paths_where_short_names_would_pick_more(tmp_path):
    job = surgeon.apply("inject lora r=2 into layers.0.attn.q", tiny_llama())
    job.save(tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


ROUND_TRIPS = [  # every method PEFT has, on Llama and on BERT (GPT-2's whole c_attn for LoRA above)
    ("llama", "inject lora r=4 alpha=8 into *.attn.<q,v>", "LORA"),
    ("llama", "inject dora r=4 alpha=8 into *.attn.<q,v>", "LORA"),
    ("llama", "inject adalora init_r=6 target_r=4 tinit=1 tfinal=1 total_steps=10 into *.attn.<q,v>", "ADALORA"),
    ("llama", "inject loha r=4 alpha=8 into *.attn.<q,v>", "LOHA"),
    ("llama", "inject lokr r=4 alpha=8 into *.mlp.<up,down>", "LOKR"),
    ("llama", "inject ia3 into *.attn.<k,v>\ninject ia3 into *.mlp.down", "IA3"),
    ("bert", "inject dora r=4 alpha=8 into *.attn.<q,v>", "LORA"),
    ("bert", "inject loha r=2 alpha=4 into *.attn.<q,v>", "LOHA"),
    ("bert", "inject lokr r=2 alpha=4 into *.attn.<q,v>", "LOKR"),
    ("bert", "inject ia3 into *.attn.<k,v>", "IA3"),
]


@pytest.mark.parametrize(("arch", "spec", "peft_type"), ROUND_TRIPS,
                         ids=[f"{a}-{s.split()[1]}" for a, s, _ in ROUND_TRIPS])
def test_every_method_round_trips_through_peft_both_ways(tmp_path, arch, spec, peft_type):
    """surgeon -> PEFT (PeftModel.from_pretrained) -> surgeon (surgeon import): one function throughout."""
    from surgeon.models import load_model

    BUILDERS[arch]().save_pretrained(tmp_path / "base")
    model, source = load_model(str(tmp_path / "base"))
    job = surgeon.apply(spec, model, seed=0, source=source)
    randomize(job)
    model.eval()
    ids = batch()
    ours = run(model, ids)
    assert (ours - run(load_model(str(tmp_path / "base"))[0].eval(), ids)).abs().max() > 1e-3
    job.save(tmp_path / "adapter", format="peft")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == peft_type
    theirs = peft.PeftModel.from_pretrained(load_model(str(tmp_path / "base"))[0], tmp_path / "adapter").eval()
    assert (run(theirs, ids) - ours).abs().max() <= 1e-5
    result = runner.invoke(app, ["import", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"),
                                 "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    fresh = load_model(str(tmp_path / "base"))[0].eval()
    surgeon.load(tmp_path / "run", fresh)
    assert (run(fresh, ids) - ours).abs().max() <= 1e-5


PROMPT_ROUND_TRIPS = [  # PEFT's prompt learning: one top-level tensor set, a task type
    ("llama", "inject prompt tokens=4 into embed", "PROMPT_TUNING", "prompt"),
    ("gpt2", "inject prompt tokens=3 into embed", "PROMPT_TUNING", "prompt"),
    ("llama", "inject ptuning tokens=4 encoder=mlp hidden=32 into embed", "P_TUNING", "prompt"),
    ("llama", "inject prefix tokens=3 into *.attn", "PREFIX_TUNING", "prefix"),
    ("llama", "inject prefix tokens=3 projection=16 into *.attn", "PREFIX_TUNING", "prefix"),
    ("gpt2", "inject prefix tokens=3 into *.attn", "PREFIX_TUNING", "prefix"),
]


@pytest.mark.parametrize(("arch", "spec", "peft_type", "imported_as"), PROMPT_ROUND_TRIPS,
                         ids=[f"{a}-{s.split()[1]}-{i}" for i, (a, s, _, _) in enumerate(PROMPT_ROUND_TRIPS)])
def test_prompt_methods_round_trip_through_peft_both_ways(tmp_path, arch, spec, peft_type, imported_as):
    """PEFT holds what a prompt encoder produces, not the encoder: P-tuning imports as prompt tuning
    and a projected prefix as the plain prefix, with the same outputs."""
    from surgeon.models import load_model

    BUILDERS[arch]().save_pretrained(tmp_path / "base")
    model, source = load_model(str(tmp_path / "base"))
    job = surgeon.apply(spec, model, seed=0, source=source)
    randomize(job)
    model.eval()
    ids = batch()
    ours = model(input_ids=ids).logits.detach()
    job.save(tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["task_type"] == "CAUSAL_LM"
    theirs = peft.PeftModel.from_pretrained(load_model(str(tmp_path / "base"))[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - ours).abs().max() <= 1e-5
    result = runner.invoke(app, ["import", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"),
                                 "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    assert f"inject {imported_as} tokens=" in json.loads(result.output)["spec"]
    fresh = load_model(str(tmp_path / "base"))[0].eval()
    surgeon.load(tmp_path / "run", fresh)
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - ours).abs().max() <= 1e-5


def test_multitask_prompt_round_trips_through_peft_with_task_ids(tmp_path):
    from surgeon.models import load_model

    BUILDERS["llama"]().save_pretrained(tmp_path / "base")
    model, source = load_model(str(tmp_path / "base"))
    job = surgeon.apply("inject mpt tokens=4 tasks=3 rank=2 into embed", model, seed=0, source=source)
    randomize(job)
    model.eval()
    ids, tasks = batch(), torch.tensor([2, 0])
    with torch.no_grad():
        ours = model(input_ids=ids, task_ids=tasks).logits
    job.save(tmp_path / "adapter", format="peft")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "MULTITASK_PROMPT_TUNING"
    theirs = peft.PeftModel.from_pretrained(load_model(str(tmp_path / "base"))[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (theirs(input_ids=ids, task_ids=tasks).logits - ours).abs().max() <= 1e-5
    result = runner.invoke(app, ["import", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"),
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    fresh = load_model(str(tmp_path / "base"))[0].eval()
    surgeon.load(tmp_path / "run", fresh)
    with torch.no_grad():
        assert (fresh(input_ids=ids, task_ids=tasks).logits - ours).abs().max() <= 1e-5


def test_cli_exports_a_prompt_run(tmp_path):
    import shutil

    from surgeon.models import load_model

    shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "tiny-llama", tmp_path / "model")
    model, source = load_model(str(tmp_path / "model"))
    surgeon.apply("inject prompt tokens=3 into embed", model, seed=0, source=source).save(tmp_path / "run")
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["peft_type"] == "PROMPT_TUNING" and report["target_modules"] is None
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "adapter2")])
    assert result.exit_code == 0 and "wrote a PEFT PROMPT_TUNING adapter to" in result.output
