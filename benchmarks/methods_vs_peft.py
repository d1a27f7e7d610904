"""Train-step time of every weight-delta method, surgeon vs PEFT's same method, in one run.

    python benchmarks/methods_vs_peft.py                 # table + one JSON line
    python benchmarks/methods_vs_peft.py --steps 4       # a quick run
    python benchmarks/methods_vs_peft.py --methods lora,dora

For each method, one Llama (512 hidden, 8 layers, 32k vocab; fp32; batch 4 x 128) is patched by
surgeon; PEFT's model is built from the same initial weights by exporting the surgeon run
(`job.save(dir, format="peft")`) and loading it with `PeftModel.from_pretrained(..., is_trainable=True)`,
so both carry the very same adapter weights. Before timing, their logits must agree within 1e-4.
A step is forward + backward + AdamW step (+ AdaLoRA's orthogonality term and rank allocation, in
both). 2 warm-up steps each, then `--steps` timed steps, surgeon and PEFT alternating (the order
swaps every step) so machine noise hits both alike; medians reported, and surgeon / PEFT.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import surgeon  # noqa: E402
from surgeon.methods.base import registry  # noqa: E402

SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000)
BATCH, SEQ = 4, 128
TOLERANCE = 1e-4
SPECS = {
    "lora": "inject lora r=8 alpha=16 into *.attn.<q,v>",
    "dora": "inject dora r=8 alpha=16 into *.attn.<q,v>",
    "adalora": "inject adalora init_r=12 target_r=8 tinit=2 tfinal=2 total_steps=100 into *.attn.<q,v>",
    "loha": "inject loha r=8 alpha=16 into *.attn.<q,v>",
    "lokr": "inject lokr r=8 alpha=16 into *.attn.<q,v>",
    "ia3": "inject ia3 into *.attn.<k,v>\ninject ia3 into *.mlp.down",
}


def llama(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**SMALL)
    return transformers.LlamaForCausalLM(config).train()


def randomize(job: surgeon.Job) -> None:
    """Non-zero adapter weights (most methods start with a zero delta), so both compute something."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)


def pair(name: str) -> tuple[surgeon.Job, nn.Module, nn.Module]:
    """surgeon's patched model and PEFT's, with the same base and adapter weights."""
    import peft

    ours = llama()
    theirs = llama()
    job = surgeon.apply(SPECS[name], ours, seed=0)
    randomize(job)
    with tempfile.TemporaryDirectory() as folder:
        job.save(folder, format="peft")
        peft_model = peft.PeftModel.from_pretrained(theirs, folder, is_trainable=True)
    return job, ours, peft_model.train()


def logits_difference(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor) -> float:
    ours.eval(), theirs.eval()
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    ours.train(), theirs.train()
    return diff


def stepper(name: str, model: nn.Module, params: list[nn.Parameter], ids: torch.Tensor, job=None):
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    state = {"step": 0}

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        if name == "adalora":
            loss = loss + (job.regularization() if job is not None else 0)
        loss.backward()
        optimizer.step()
        if name == "adalora":
            if job is not None:
                job.step(state["step"], optimizer)
            else:
                model.base_model.update_and_allocate(state["step"])
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1

    return step


def bench(name: str, steps: int, ids: torch.Tensor) -> dict[str, object]:
    job, ours, theirs = pair(name)
    diff = logits_difference(ours, theirs, ids)
    if diff > TOLERANCE:
        raise SystemExit(f"{name}: surgeon and PEFT disagree by {diff:.2e} before timing")
    ours_params = list(job.trainable_parameters().values())
    theirs_params = [p for p in theirs.parameters() if p.requires_grad]
    variants = {"surgeon": stepper(name, ours, ours_params, ids, job),
                "peft": stepper(name, theirs, theirs_params, ids)}
    times: dict[str, list[float]] = {"surgeon": [], "peft": []}
    for _ in range(2):
        for run in variants.values():
            run()
    for index in range(steps):
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for key in order:
            start = time.perf_counter()
            variants[key]()
            times[key].append((time.perf_counter() - start) * 1e3)
    ours_ms, theirs_ms = statistics.median(times["surgeon"]), statistics.median(times["peft"])
    result = {"method": name, "logits_max_abs_diff": diff, "trainable": sum(p.numel() for p in ours_params),
              "peft_trainable": sum(p.numel() for p in theirs_params), "surgeon_ms": ours_ms, "peft_ms": theirs_ms,
              "ratio": ours_ms / theirs_ms}
    del job, ours, theirs, variants
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train-step time of each method, surgeon vs PEFT")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    parser.add_argument("--methods", default=",".join(SPECS), help="comma-separated subset of " + ",".join(SPECS))
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    names = [n for n in args.methods.split(",") if n]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(SPECS)}")
    available = {name for _, name in registry()}
    ids = torch.randint(0, SMALL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in names:
        if name not in available:
            rows.append({"method": name, "skipped": "not registered"})
            continue
        if not args.json:
            print(f"{name}: 2 warm-up + {args.steps} timed steps each ...", flush=True)
        rows.append(bench(name, args.steps, ids))
    if not args.json:
        print(f"\n{'method':<8} {'trainable':>10} {'surgeon ms':>11} {'PEFT ms':>9} {'ratio':>6} {'logits diff':>11}")
        for row in rows:
            if "skipped" in row:
                print(f"{row['method']:<8} skipped: {row['skipped']}")
                continue
            print(f"{row['method']:<8} {row['trainable']:>10,} {row['surgeon_ms']:>11.1f} {row['peft_ms']:>9.1f} "
                  f"{row['ratio']:>5.2f}x {row['logits_max_abs_diff']:>11.1e}")
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
