"""Surgeon vs PEFT, side by side in one run: mixed-batch inference, 4 LoRA adapters, a batch of 8.

    python benchmarks/mixed_batch_vs_peft.py             # table + one JSON line
    python benchmarks/mixed_batch_vs_peft.py --json      # the JSON line only
    python benchmarks/mixed_batch_vs_peft.py --reps 5    # a quick run

A small Llama (512 hidden, 8 layers, 4k vocab), fp32, on the CPU; four LoRA adapters (r 8, 16, 8,
4) on q_proj and v_proj, the same random A/B values in both libraries. The batch: 8 rows of 128
tokens naming `a b c d a None c b` (PEFT: `__base__` for None). Timed: one forward under
torch.no_grad with `adapter_names=`, eval mode. 3 warm-up forwards each, then `--reps` rounds in
which each runs once, the order rotating every round so machine noise hits both alike; medians.

Before timing, the two are checked to compute the same function: logits within 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=4096)  # a small head: the layers, where adapters act, dominate
ADAPTERS = {"a": 8, "b": 16, "c": 8, "d": 4}  # name -> r (alpha = 2 r)
NAMES = ["a", "b", "c", "d", "a", None, "c", "b"]
SEQ = 128
TOLERANCE = 1e-4


def build() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(surgeon's patched model, PEFT's model, input ids), holding the very same weights."""
    import peft
    import transformers

    import surgeon

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    reference = copy.deepcopy(base)
    spec = "\n".join(f"inject lora r={r} alpha={2 * r} into *.attn.<q,v> as {name}" for name, r in ADAPTERS.items())
    job = surgeon.apply(spec, base, seed=0)
    generator = torch.Generator().manual_seed(1)
    ours = job.added_tensors()
    with torch.no_grad():
        for p in ours.values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    from peft_twin import named_lora_twin  # tests/: the same twin the mixed-batch parity test checks against

    twin = named_lora_twin(reference, job, {name: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
                                            for name, r in ADAPTERS.items()})
    ids = torch.randint(0, CONFIG["vocab_size"], (len(NAMES), SEQ), generator=generator)
    return base, twin, ids


def variants(ours: torch.nn.Module, theirs: torch.nn.Module, ids: torch.Tensor) -> dict[str, callable]:
    peft_names = [name or "__base__" for name in NAMES]

    def surgeon_mixed() -> torch.Tensor:
        return ours(input_ids=ids, adapter_names=NAMES).logits

    def peft_mixed() -> torch.Tensor:
        return theirs(input_ids=ids, adapter_names=peft_names).logits

    return {"surgeon mixed": surgeon_mixed, "peft mixed": peft_mixed}


def measure(reps: int) -> dict[str, object]:
    ours, theirs, ids = build()
    runs = variants(ours, theirs, ids)
    with torch.no_grad():
        difference = (runs["surgeon mixed"]() - runs["peft mixed"]()).abs().max().item()
        if difference > TOLERANCE:
            raise SystemExit(f"surgeon and PEFT disagree by {difference:.3g} (> {TOLERANCE}): not timing")
        for run in runs.values():
            for _ in range(3):
                run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        order = list(runs)
        for round_ in range(reps):
            for name in order[round_ % len(order):] + order[:round_ % len(order)]:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "benchmark": "mixed_batch_vs_peft",
        "machine": {"cpu_cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "torch": torch.__version__, "python": sys.version.split()[0]},
        "setup": {"adapters": ADAPTERS, "rows": NAMES, "seq": SEQ, "config": CONFIG, "reps": reps},
        "max_abs_logit_difference": difference,
        "median_seconds": medians,
        "ratio_surgeon_over_peft": medians["surgeon mixed"] / medians["peft mixed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    result = measure(args.reps)
    if not args.json:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"mixed-batch forward, 4 LoRA adapters, batch {len(NAMES)} x {SEQ} (medians of {args.reps})")
        table.add_column("variant")
        table.add_column("seconds", justify="right")
        for name, seconds in result["median_seconds"].items():  # type: ignore[union-attr]
            table.add_row(name, f"{seconds:.4f}")
        table.add_row("surgeon / PEFT", f"{result['ratio_surgeon_over_peft']:.3f}x")
        Console().print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
