"""Load surgeon's AdapterHub exports into AdapterHub itself and compare its logits with surgeon's.

Runs ONLY in the separate venv of requirements-adapterhub.txt (adapters 1.3.0, transformers 4.57.6),
never in the project venv; step 2 of 2, after make_exports.py:

    .venv/bin/python tests/scripts/adapterhub/make_exports.py                              # the exports
    /work/venvs/adapterhub/bin/python tests/scripts/adapterhub/check_export.py             # this script

For every case of tests/data/adapterhub/export_check/cases.json: the fixture base model
(from_pretrained, eager attention, eval), `adapters.init(model)`, `model.load_adapter(dir,
load_as=..., use_safetensors=True, loading_info=...)`, set active, then the logits on the inputs
stored beside the export, against the logits surgeon computed (`<variant>.logits`). Writes
export_check/results.json: per case the max abs diff per variant, how much the adapter changes the
base model's logits (so a no-op load cannot pass), the names loaded, missing and unexpected keys,
whether every loaded tensor equals the file's, the library's leave_out, and the sha256 of the
files checked (the tests refuse results of other files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

import adapters

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "tests" / "data" / "adapterhub" / "export_check"
CLASSES = {"bert": transformers.BertForMaskedLM, "llama": transformers.LlamaForCausalLM,
           "gpt2": transformers.GPT2LMHeadModel, "t5": transformers.T5ForConditionalGeneration}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def logits_of(model, stored: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    inputs = {k.removeprefix(f"{variant}."): v for k, v in stored.items()
              if k.startswith(f"{variant}.") and not k.endswith(".logits")}
    return model(**inputs).logits


def check(case: dict) -> dict:
    folder = OUT / case["adapter_dir"]
    stored = load_file(str(OUT / case["outputs"]))
    model = CLASSES[case["model_type"]].from_pretrained(ROOT / case["base_dir"], attn_implementation="eager").eval()
    base = {v: logits_of(model, stored, v) for v in case["variants"]}
    adapters.init(model)
    info: dict = {}
    name = model.load_adapter(str(folder), load_as=case["load_as"], set_active=True, use_safetensors=True,
                              loading_info=info)
    model.set_active_adapters(name)
    model.eval()
    active = str(model.active_adapters)
    saved = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter.safetensors"))
    # the file's names under the name loaded: what the library must now hold, equal to the file
    expected = {k.replace(f".adapters.{saved['name']}.", f".adapters.{name}."): t for k, t in tensors.items()}
    params = dict(model.named_parameters())
    loaded = sorted(n for n in params if f".adapters.{name}." in n)
    result = {
        "spec": case["spec"], "name_saved": saved["name"], "name_loaded": name, "active_adapters": active,
        "names_loaded": loaded, "names_match_file": set(loaded) == set(expected),
        "tensors_equal_file": set(loaded) == set(expected) and all(torch.equal(params[n], expected[n]) for n in loaded),
        "missing_keys": sorted(info.get("missing_keys", [])), "unexpected_keys": sorted(info.get("unexpected_keys", [])),
        "library_leave_out": list(model.adapters_config.get(name)["leave_out"]),
        "sha256": {f: sha256(folder / f) for f in ("adapter_config.json", "adapter.safetensors")}
                  | {"surgeon.safetensors": sha256(OUT / case["outputs"])},
        "max_abs_diff": {}, "adapter_effect": {},
    }
    for variant in case["variants"]:
        logits = logits_of(model, stored, variant)
        result["max_abs_diff"][variant] = (logits - stored[f"{variant}.logits"]).abs().max().item()
        result["adapter_effect"][variant] = (logits - base[variant]).abs().max().item()
    return result


def main() -> None:
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    # load_adapter runs with nothing active yet (a warning per case); T5's 4.57 deprecation notices
    logging.getLogger("adapters").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cases = json.loads((OUT / "cases.json").read_text())["cases"]
    results = {"checker": "tests/scripts/adapterhub/check_export.py",
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "adapters": adapters.__version__},
               "attn_implementation": "eager", "cases": {}}
    for case in cases:
        found = check(case)
        results["cases"][case["name"]] = found
        print(f"{case['name']:24s} max abs diff {max(found['max_abs_diff'].values()):.3g} "
              f"(adapter effect {min(found['adapter_effect'].values()):.3g}), {len(found['names_loaded'])} tensors, "
              f"missing {len(found['missing_keys'])}, unexpected {len(found['unexpected_keys'])}", flush=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
