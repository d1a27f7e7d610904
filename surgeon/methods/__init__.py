"""One method, one module, grouped by the seam it uses (DESIGN.md):

- `weights/`: wrap a layer or train its own tensors (LoRA and its family, IA3, BitFit,
  `train weights`, quantize);
- `inputs/`: change what the model sees before its first layer (prompt tuning, p-tuning, MPT);
- `attention/`: change what attention sees (prefix tuning);
- `data_path/`: modules in each layer's data path (bottleneck adapters, AdapterFusion, UniPELT's gates);
- `positions/`: where tokens are (RoPE scaling).

`base.py` is the protocol every method follows. Importing this package imports every module in
it, which registers each method with the registry: adding a method is adding a file.
"""

import importlib
import pkgutil

for _module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
    _leaf = _module.name.rpartition(".")[2]
    if _leaf != "base" and not _leaf.startswith("_"):
        importlib.import_module(_module.name)
