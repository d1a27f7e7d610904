"""One method, one module. Importing this package registers them all with the registry."""

from surgeon.methods import lora, quantize  # noqa: F401
