"""Write a model whose quantized layers are stored in bitsandbytes' 4-bit serialization: the
checkpoint format that transformers loads with `quantization_config` (quant_method "bitsandbytes"),
as `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` writes it.

surgeon's NF4/FP4 codes are bitsandbytes' codes, so the stored tensors are what bitsandbytes would
have written for the same weights: the packed codes as `weight`, then `weight.absmax`,
`weight.quant_map`, for double quantization `weight.nested_absmax` and `weight.nested_quant_map`,
and a JSON blob of the rest under `weight.quant_state.bitsandbytes__<type>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.methods.weights.quantize import QuantizedLinear
from surgeon.models import save_base_model
from surgeon.quant import code_4bit, dynamic_map

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def layer_tensors(path: str, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes' Linear4bit holds for this layer (weight and its state)."""
    prefix = f"{path}.weight"
    state: dict[str, object] = {"quant_type": layer.qtype, "blocksize": layer.blocksize,
                                "dtype": _DTYPE_NAMES[layer.original_dtype], "shape": list(layer.shape)}
    tensors = {prefix: layer.codes.view(-1, 1), f"{prefix}.absmax": layer.absmax,
               f"{prefix}.quant_map": code_4bit(layer.qtype)}
    if layer.double:
        assert layer.absmax_scale is not None and layer.absmax_offset is not None
        tensors[f"{prefix}.nested_absmax"] = layer.absmax_scale
        tensors[f"{prefix}.nested_quant_map"] = dynamic_map()
        state |= {"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": layer.absmax_offset.item()}
    blob = json.dumps(state).encode("utf-8")
    tensors[f"{prefix}.quant_state.bitsandbytes__{layer.qtype}"] = torch.tensor(list(blob), dtype=torch.uint8)
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


def _quantization_config(layers: dict[str, QuantizedLinear], model: nn.Module) -> dict[str, object]:
    kinds = {(m.qtype, m.double, m.compute_dtype) for m in layers.values()}
    if len(kinds) > 1:
        raise SurgeonError("bitsandbytes' format holds one type, one double setting and one compute dtype "
                           f"per model; this one has {len(kinds)} combinations: merge without --requantize")
    (qtype, double, compute), = kinds
    if qtype not in ("nf4", "fp4"):
        raise SurgeonError(f"--requantize writes bitsandbytes' 4-bit format, which has no {qtype}: "
                           "quantize with nf4 or fp4, or merge without --requantize")
    plain = [path for path, m in model.named_modules()
             if path not in layers and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": qtype, "bnb_4bit_use_double_quant": double,
            "bnb_4bit_compute_dtype": _DTYPE_NAMES[compute], "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": plain}


def check_bnb_4bit(model: nn.Module) -> None:
    """Raise SurgeonError when the model's quantized layers cannot be written in bitsandbytes' format."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise SurgeonError("--requantize: the run quantizes nothing")
    _quantization_config(layers, model)


def save_bnb_4bit(model: nn.Module, out_dir: Path) -> None:
    """A Hugging Face directory that transformers (with bitsandbytes installed) loads as 4-bit."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    config = _quantization_config(layers, model)
    if not hasattr(model, "save_pretrained"):
        raise SurgeonError("--requantize writes a Hugging Face checkpoint; this model has no save_pretrained")
    state = dict(model.state_dict())
    for path, layer in layers.items():
        state.update(layer_tensors(path, layer))
    save_base_model(model, out_dir, state_dict=state)
    config_path = out_dir / "config.json"
    written = json.loads(config_path.read_text())
    written["quantization_config"] = config
    config_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
