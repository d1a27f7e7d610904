"""AdapterHub interchange: a saved adapter directory of `adapters` 1.x (`save_adapter(dir, name,
use_safetensors=True)`: adapter_config.json + adapter.safetensors) as the spec statement that says
the same thing and the tensors under surgeon's names.

A directory is untrusted input: only safetensors are read (`pytorch_adapter.bin`, the library's
default, is a pickle and is refused with how to re-save it), and every option of the config that
surgeon's `inject adapter` does not compute is refused by name rather than dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from surgeon.errors import ExportError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"

# AdapterHub's options at the values surgeon computes (anything else is refused by name)
_NEUTRAL = {"ln_before": False, "ln_after": False, "use_gating": False, "phm_layer": False,
            "inv_adapter": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
            "stochastic_depth": 0.0, "residual_before_ln": True, "adapter_residual_before_ln": False,
            "original_ln_after": True}
# config name -> what makes it that config: (mh_adapter, output_adapter, is_parallel, original_ln_before)
_SHAPES = {(False, True, False, True): "pfeiffer", (True, True, False, False): "houlsby",
           (False, True, True, False): "parallel"}
_ACTS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu", "tanh": "tanh"}


def is_adapterhub_dir(folder: Path) -> bool:
    """An AdapterHub saved adapter (its config names the library's version), not a PEFT adapter."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("version", "")).startswith("adapters.")


def read_adapterhub_dir(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the saved config, the tensors) of an AdapterHub adapter directory."""
    if not (folder / WEIGHTS_FILE).is_file():
        if (folder / PICKLE_FILE).is_file():
            raise ExportError(f"{folder / PICKLE_FILE} is a pickle, which surgeon does not read (loading one can "
                              "run code); re-save the adapter with model.save_adapter(dir, name, "
                              "use_safetensors=True)")
        raise ExportError(f"{folder} holds no {WEIGHTS_FILE}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as err:
        raise ExportError(f"cannot read the AdapterHub adapter in {folder}: {err}") from None
    if not isinstance(config.get("config"), dict) or not isinstance(config.get("name"), str):
        raise ExportError(f"{folder / CONFIG_FILE} is not an AdapterHub adapter config (no 'config' and 'name')")
    return config, tensors


def statement_from_adapterhub(saved: dict[str, Any]) -> str:
    """`inject adapter config=... reduction=... act=... scale=...` for a bottleneck adapter's config."""
    config = saved["config"]
    for key, neutral in _NEUTRAL.items():
        if config.get(key, neutral) != neutral:
            raise ExportError(f"the AdapterHub adapter sets {key}={config[key]!r}, which surgeon's adapters do not "
                              f"compute (they compute {key}={neutral!r})")
    shape = tuple(bool(config.get(k)) for k in ("mh_adapter", "output_adapter", "is_parallel", "original_ln_before"))
    if shape not in _SHAPES:
        raise ExportError("the AdapterHub adapter is not a seq_bn, double_seq_bn or par_bn bottleneck "
                          f"(mh_adapter, output_adapter, is_parallel, original_ln_before = {shape})")
    act = _ACTS.get(str(config.get("non_linearity", "")).lower())
    if act is None:
        raise ExportError(f"the AdapterHub adapter's non_linearity {config.get('non_linearity')!r} is not one surgeon "
                          f"has ({', '.join(sorted(set(_ACTS.values())))})")
    reduction = float(config.get("reduction_factor", 16))
    return (f"inject adapter config={_SHAPES[shape]} reduction={reduction:g} act={act} "
            f"scale={float(config.get('scaling', 1.0)):g}")


def surgeon_name(name: str, adapter: str) -> str:
    """AdapterHub's parameter name -> surgeon's (`<layer>.adapter_output.<the library's own names>`)."""
    tag = re.escape(adapter)
    patterns = (  # T5 first: its sub-layer index says attention (0) or feed-forward (the last)
        (rf"(.*\.block\.\d+)\.layer\.(\d+)\.adapters\.{tag}\.(.+)", lambda m: "attention" if m[2] == "0" else "output"),
        (rf"(.*)\.attention_adapters\.adapters\.{tag}\.(.+)", lambda m: "attention"),
        (rf"(.*)\.output_adapters\.adapters\.{tag}\.(.+)", lambda m: "output"),
        (rf"(.*)\.attention\.output\.adapters\.{tag}\.(.+)", lambda m: "attention"),
        (rf"(.*)\.output\.adapters\.{tag}\.(.+)", lambda m: "output"),
    )
    for pattern, site in patterns:
        match = re.fullmatch(pattern, name)
        if match:
            return f"{match[1]}.adapter_{site(match)}.{match[match.re.groups]}"
    raise ExportError(f"the AdapterHub adapter holds {name}, which is no bottleneck adapter tensor surgeon knows")
