"""Export surgeon adapter runs to AdapterHub's format, for the library itself to check.

Runs in the PROJECT venv (transformers 5.x), from anywhere; step 1 of 2:

    .venv/bin/python tests/scripts/adapterhub/make_exports.py                              # this script
    /work/venvs/adapterhub/bin/python tests/scripts/adapterhub/check_export.py             # the library's verdict

For each case (bert/llama/gpt2/t5 x pfeiffer/houlsby/parallel, two runs on some layers only, which
become AdapterHub's `leave_out`, and runs with explicit size/reduction, activation and scale) it
loads the fixture base model (tests/data/adapterhub/<model>/base, eager attention), applies the
spec, randomises every adapter tensor (seeded N(0, 0.05^2)), saves the run, and exports it with
`surgeon export RUN --format adapterhub` (the CLI, in-process). It writes into
tests/data/adapterhub/export_check/:

- `<case>/adapter/`: the export (adapter_config.json + adapter.safetensors);
- `<case>/surgeon.safetensors`: per input variant (`nopad.`, `pad.`) the inputs and the logits the
  patched surgeon model computed (`<variant>.logits`);
- `cases.json`: the cases; `results.json` (check_export.py's output) is removed, being stale.

Byte-identical from run to run (fixed seeds). tests/test_adapterhub_export.py re-exports the same
runs with the current code and compares them with these files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = Path("tests/data/adapterhub")  # relative to ROOT: the export's model_name is this path
OUT = FIXTURES / "export_check"
CLASSES = {"bert": transformers.BertForMaskedLM, "llama": transformers.LlamaForCausalLM,
           "gpt2": transformers.GPT2LMHeadModel, "t5": transformers.T5ForConditionalGeneration}
LOAD_AS = "exported"  # the name check_export.py loads each export under (the export's own: "adapter")
CASES: list[dict[str, str]] = (
    [{"name": f"{model}-{config}", "model_type": model, "spec": f"inject adapter config={config}"}
     for model in CLASSES for config in ("pfeiffer", "houlsby", "parallel")]
    + [
        {"name": "gpt2-parallel-layer1", "model_type": "gpt2", "spec": "inject adapter config=parallel in layers.[1]"},
        # T5: layers.[1] is encoder block 1 and decoder block 1; leave_out [0, 2] (decoder i is n_enc + i)
        {"name": "t5-houlsby-layer1", "model_type": "t5", "spec": "inject adapter config=houlsby in layers.[1]"},
        {"name": "llama-options", "model_type": "llama",
         "spec": "inject adapter config=pfeiffer size=6 act=gelu scale=0.5"},
        {"name": "bert-options", "model_type": "bert",
         "spec": "inject adapter config=houlsby reduction=32 act=tanh scale=2"},
        {"name": "t5-options", "model_type": "t5", "spec": "inject adapter config=parallel size=5 act=silu scale=1.5"},
    ])


def base_dir(model_type: str) -> Path:
    return FIXTURES / model_type / "base"


def fixture_model(model_type: str) -> nn.Module:
    return CLASSES[model_type].from_pretrained(ROOT / base_dir(model_type), attn_implementation="eager").eval()


def inputs_of(model_type: str) -> dict[str, dict[str, torch.Tensor]]:
    """The fixture's unpadded and right-padded inputs (no loss weights, no base logits)."""
    keep = ("input_ids", "attention_mask", "decoder_input_ids")
    return {variant: {k: v for k, v in load_file(str(ROOT / FIXTURES / model_type / f"inputs_{variant}.safetensors")).items()
                      if k in keep} for variant in ("nopad", "pad")}


@torch.no_grad()
def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def randomise(params: dict[str, nn.Parameter], seed: int) -> None:
    """Every adapter tensor non-zero (surgeon's default init zeroes the up-projection)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(params):
            params[name].copy_(torch.randn(params[name].shape, generator=generator) * 0.05)


def make_run(case: dict[str, str], run_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """Apply the case's spec to its fixture model, randomise, save the run to run_dir; the
    inputs and the logits of the patched model, by `<variant>.<name>`."""
    import surgeon

    model = fixture_model(case["model_type"])
    job = surgeon.apply(case["spec"], model, seed=seed)
    randomise(job.trainable_parameters(), seed)
    job.save(run_dir)
    found: dict[str, torch.Tensor] = {}
    for variant, inputs in inputs_of(case["model_type"]).items():
        found |= {f"{variant}.{k}": v.contiguous() for k, v in inputs.items()}
        found[f"{variant}.logits"] = logits_of(model, inputs).contiguous()
    return found


def export(run_dir: Path, out_dir: Path, model_type: str, *extra: str):
    """`surgeon export RUN --format adapterhub --out OUT --model <fixture base>` in-process (cwd must
    be ROOT: the base is named relative to it, which is what the export records as model_name)."""
    from typer.testing import CliRunner

    from surgeon.cli import app

    args = ["export", str(run_dir), "--format", "adapterhub", "--out", str(out_dir),
            "--model", str(base_dir(model_type)), *extra]
    return CliRunner().invoke(app, args)


def seed_of(index: int) -> int:
    return 1000 + index


def main() -> None:
    os.chdir(ROOT)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and sidesteps thread-pool stalls on a busy machine
    for stale in [*OUT.glob("*/"), OUT / "cases.json", OUT / "results.json"]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    listed = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, case in enumerate(CASES):
            run_dir = Path(scratch) / case["name"]
            outputs = make_run(case, run_dir, seed_of(index))
            result = export(run_dir, OUT / case["name"] / "adapter", case["model_type"])
            if result.exit_code != 0:
                sys.exit(f"{case['name']}: surgeon export failed:\n{result.output}")
            save_file(outputs, str(OUT / case["name"] / "surgeon.safetensors"))
            listed.append(case | {"seed": seed_of(index), "base_dir": str(base_dir(case["model_type"])),
                                  "adapter_dir": f"{case['name']}/adapter", "outputs": f"{case['name']}/surgeon.safetensors",
                                  "load_as": LOAD_AS, "variants": ["nopad", "pad"]})
            print(case["name"], "->", result.output.strip(), flush=True)
    (OUT / "cases.json").write_text(json.dumps({"generator": "tests/scripts/adapterhub/make_exports.py",
                                                "checker": "tests/scripts/adapterhub/check_export.py",
                                                "cases": listed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
