"""One method, one module. Importing this package imports every module in it, which registers
each method with the registry: adding a method is adding a file."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
