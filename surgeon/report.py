"""The plan as people read it: the table and totals `surgeon check` prints, `job.summary()` and `--json`."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from surgeon.graph import dtype_size
from surgeon.planner import Plan, method_of, params_of


def plan_summary(the_plan: Plan) -> dict[str, Any]:
    """What `surgeon check --json` prints: every rewrite, trainable counts per method, totals."""
    rewrites = [
        {
            "target": r.target.path,
            "role": r.target.role,
            "method": _said(r.verb, r.method),
            "name": r.label,
            "type": r.target.type_name,
            "slices": list(r.target.slices),
            "weight_shape": r.target.weight_shape,
            "params": r.params,
            "added": {k: list(v) for k, v in r.added.items()},
            "added_count": r.added_count,
            "trained": {k: list(v) for k, v in r.trained.items()},
            "trained_count": r.trained_count,
            "bytes_before": r.bytes_before,
            "bytes_after": r.bytes_after,
        }
        for r in the_plan.rewrites
    ]
    added_bytes = sum(r.added_count * dtype_size(r.target.dtype or "float32") for r in the_plan.rewrites)
    shrunk = [r for r in the_plan.rewrites if r.bytes_after != r.bytes_before]
    shrunk_numel = sum(math.prod(r.target.weight_shape or ()) for r in shrunk)
    return {
        "ok": True,
        "rewrites": rewrites,
        "per_method": _per_method(the_plan),
        "changes": _changes(the_plan),
        "totals": {
            "rewrites": len(rewrites),
            "trainable_parameters": the_plan.trainable_parameters,
            "base_parameters": the_plan.base_parameters,
            "trainable_share": the_plan.trainable_parameters / max(1, the_plan.base_parameters),
            "added_bytes": added_bytes,
            "memory_before": the_plan.base_bytes,
            "memory_after": the_plan.base_bytes + added_bytes + sum(r.bytes_after - r.bytes_before for r in shrunk),
            "quantized_bits_per_parameter": 8 * sum(r.bytes_after for r in shrunk) / shrunk_numel if shrunk else None,
        },
    }


def _per_method(the_plan: Plan) -> dict[str, int]:
    """Trainable parameters each method brings (added plus the base's own it trains)."""
    counts: dict[str, int] = {}
    for r in the_plan.rewrites:
        key = _said(r.verb, r.method)
        counts[key] = counts.get(key, 0) + r.added_count + r.trained_count
    return counts


def _changes(the_plan: Plan) -> list[str]:
    """What the methods say changes beyond added tensors, each line once."""
    lines = (method_of(r).describe(r.target, params_of(r)) for r in the_plan.rewrites)
    return list(dict.fromkeys(line for line in lines if line))


def _said(verb: str, method: str) -> str:
    """How a statement says the method: `inject lora`, `quantize` and `fuse` (registered under their verb)."""
    return verb if method == verb else f"{verb} {method}"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _trainable_cell(r: dict[str, Any]) -> str:
    """`1,024 new (lora_A 4x64, ...)` and/or `192 own (bias 192)`; `-` when the rewrite trains nothing."""
    parts = []
    for count, shapes, label in ((r["added_count"], r["added"], "new"), (r["trained_count"], r["trained"], "own")):
        if shapes:
            listed = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items())
            parts.append(f"{count:,} {label} ({listed})")
    return "; ".join(parts) or "-"


def print_plan(summary: dict[str, Any], out: Console) -> None:
    """The table and totals `surgeon check` prints."""
    table = Table(title="plan", title_justify="left")
    for column in ("target", "role", "method", "shape", "trainable"):
        table.add_column(column, no_wrap=column != "trainable")
    for r in summary["rewrites"]:
        shape = "x".join(map(str, r["weight_shape"] or ()))
        if r["slices"]:
            shape += f" [{','.join(r['slices'])}]"
        role = ",".join(r["slices"]) if r["slices"] else r["role"] or ""
        method = f"{r['method']} as {r['name']}" if r.get("name") else r["method"]
        table.add_row(escape(r["target"]), escape(role), escape(method), escape(shape), escape(_trainable_cell(r)))
    out.print(table)
    out.print("per method: " + "; ".join(f"{method} {count:,}" for method, count in summary["per_method"].items()))
    totals = summary["totals"]
    out.print(
        f"{totals['rewrites']} rewrites; trainable parameters {totals['trainable_parameters']:,} "
        f"of {totals['base_parameters']:,} ({100 * totals['trainable_share']:.4f}%); "
        f"added memory {_human_bytes(totals['added_bytes'])}"
    )
    if totals["memory_after"] != totals["memory_before"] + totals["added_bytes"]:
        out.print(f"memory {_human_bytes(totals['memory_before'])} -> {_human_bytes(totals['memory_after'])}; "
                  f"quantized weights at {totals['quantized_bits_per_parameter']:.3f} bits per parameter")
    for line in summary.get("changes", []):
        out.print(escape(line), highlight=False)
