"""surgeon: declarative, config-compiled model surgery for parameter-efficient fine-tuning."""

from surgeon import decoding
from surgeon.checkpoints import whole_model
from surgeon.errors import SurgeonError
from surgeon.job import Job, apply, apply_checkpoint, check, import_peft, load
from surgeon.language import parse_spec

__all__ = ["Job", "SurgeonError", "apply", "decoding", "apply_checkpoint", "check", "import_peft", "load", "parse_spec", "whole_model"]
__version__ = "0.1.0"
