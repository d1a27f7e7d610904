"""PEFT's spellings of parameters, and what surgeon calls them: the hint for an unknown parameter.

People come from PEFT's `LoraConfig(r=8, lora_alpha=16, target_modules=[...])`; difflib alone
finds `alpha` for `lora_alpha` but not `r` for `rank`, and nothing for `target_modules`, which in
surgeon is no parameter at all but the pattern after `into`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from surgeon.methods.base import Method
from surgeon.spec import Statement

# PEFT's (or a common) name -> surgeon's candidates, the first one the method has wins
RENAMED: dict[str, tuple[str, ...]] = {
    "rank": ("r",),
    "lora_r": ("r",),
    "lora_rank": ("r",),
    "lora_alpha": ("alpha",),
    "lora_dropout": ("dropout",),
    "init_lora_weights": ("init",),
    "use_rslora": ("rslora",),
    "num_virtual_tokens": ("tokens",),
    "prompt_tuning_init": ("init",),
    "prefix_projection": ("projection",),
    "encoder_hidden_size": ("projection", "hidden"),
    "encoder_reparameterization_type": ("encoder",),
    "encoder_num_layers": ("layers",),
    "encoder_dropout": ("dropout",),
    "decompose_factor": ("factor",),
    "feedforward_modules": ("feedforward",),
}

# PEFT options that are no parameter in surgeon: what to write instead ({prep}: the method's clause)
ELSEWHERE: dict[str, str] = {
    "modules_to_save": "PEFT's modules_to_save is a statement of its own here: use `train weights in PATTERN`",
    "exclude_modules": "write the modules to leave out after 'except': `... {prep} PATTERN except PATTERN`",
    "layers_to_transform": "write the layers in the pattern: `... {prep} layers.[0-5].attn.<q,v>`",
    "use_dora": "DoRA is a method of its own: `inject dora ...`",
    "fan_in_fan_out": "surgeon reads the weight layout from the module (transformers' Conv1D): leave it out",
    "task_type": "surgeon needs no task type: leave it out",
}


def peft_hint(method: type[Method], key: str, statement: Statement) -> str | None:
    """The hint for the unknown parameter `key` when it is PEFT's spelling, else None."""
    for name in RENAMED.get(key, ()):
        if name in method.Params.model_fields:
            return f"did you mean '{name}'? (surgeon's name for {key})"
    prep = sorted(method.prepositions)[0] if method.prepositions else "into"
    if key == "target_modules":
        return _targets_hint(method, statement, prep)
    if key in ELSEWHERE:
        return ELSEWHERE[key].format(prep=prep)
    return None


def _targets_hint(method: type[Method], statement: Statement, prep: str) -> str:
    """PEFT's target_modules is surgeon's target clause: the statement as it should be written."""
    if any(clause.preposition != "except" for clause in statement.clauses):
        return f"drop target_modules: the targets are the pattern after '{prep}'"
    given = next(p.value for p in statement.params if p.key == "target_modules")
    others = " ".join(f"{p.key}={_written(p.value)}" for p in statement.params if p.key != "target_modules")
    head = " ".join(part for part in (statement.verb.text, *(w.text for w in statement.words), others) if part)
    return f"write the targets after '{prep}': `{head} {prep} {_pattern(given)}`"


def _pattern(value: Any) -> str:
    """A pattern for PEFT's target_modules value (module names, matched at the end of a path)."""
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    if names and all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_][\w.]*", n) for n in names):
        return names[0] if len(names) == 1 else "<" + ",".join(names) + ">"
    return "*.attn.<q,v>"  # a regex or something else: show the form with roles


def _written(value: Any) -> str:
    """A parameter value as a spec writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_written(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][\w.\-]*", value):
        return json.dumps(value)
    return str(value)
