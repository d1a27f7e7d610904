"""What crash-safe saving costs: `job.save` (staged in a sibling folder and swapped in) against
writing the same files straight into the run directory, on a run of about 1 GB.

    python benchmarks/atomic_save.py            # ~1 GB of adapters; table + one JSON line
    python benchmarks/atomic_save.py --gb 0.25  # smaller
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import surgeon
from surgeon.manifest import ADAPTER_FILE, sha256_file


def build(gb: float) -> tuple[nn.Module, str]:
    """Eight 4096x4096 layers with LoRA of the rank that makes the adapters `gb` gigabytes (fp32)."""
    width, layers = 4096, 8
    rank = max(1, int(gb * 2**30 / 4 / layers / (2 * width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    return model, f"inject lora r={rank} into *"


def direct_save(job: surgeon.Job, run: Path) -> None:
    """The same files written in place, no staging: what job.save did before it was crash-safe."""
    run.mkdir(parents=True, exist_ok=True)
    save_file(job._tensors_to_save(), str(run / ADAPTER_FILE))
    (run / "spec.peft").write_text(job.manifest.spec_text)
    job.manifest.model_copy(update={"adapter_sha256": sha256_file(run / ADAPTER_FILE)}).write(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model, spec = build(args.gb)
    job = surgeon.apply(spec, model, seed=0)
    size = sum(p.numel() * p.element_size() for p in job.trainable_parameters().values())
    times: dict[str, list[float]] = {"direct, over a run": [], "direct, new folder": [], "job.save, over a run": [],
                                     "job.save, new folder": []}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as work:  # the disk the user's runs are on
        direct, atomic = Path(work) / "direct", Path(work) / "atomic"
        direct_save(job, direct), job.save(atomic)  # warm up; each later save replaces a run
        fresh, fresh_atomic = Path(work) / "fresh", Path(work) / "fresh-atomic"
        variants = [("direct, over a run", direct_save, direct), ("direct, new folder", direct_save, fresh),
                    ("job.save, over a run", lambda j, r: j.save(r), atomic),
                    ("job.save, new folder", lambda j, r: j.save(r), fresh_atomic)]
        for rep in range(args.reps):  # the order rotates, so background load and cache state hit all alike
            for label, save, where in variants[rep % 4:] + variants[:rep % 4]:
                for empty in (fresh, fresh_atomic):  # not timed: the new-folder cases start empty
                    shutil.rmtree(empty, ignore_errors=True)
                start = time.perf_counter()
                save(job, where)
                times[label].append(time.perf_counter() - start)
        shutil.rmtree(direct)
    medians = {label: statistics.median(t) for label, t in times.items()}
    ratio = medians["job.save, over a run"] / medians["direct, over a run"]
    ratio_new = medians["job.save, new folder"] / medians["direct, new folder"]
    result = {"run_bytes": size, "reps": args.reps, "median_s": medians, "raw_s": times, "ratio": ratio,
              "ratio_vs_new_folder": ratio_new}
    if not args.json:
        print(f"run of {size / 2**30:.2f} GiB ({spec}), median of {args.reps}:")
        for label, seconds in medians.items():
            print(f"  {label:<22} {seconds * 1000:9.1f} ms")
        print(f"  crash-safe / direct over a run: {ratio:.3f}x ({100 * (ratio - 1):+.1f}%)")
        print(f"  crash-safe / direct, both into a new folder: {ratio_new:.3f}x ({100 * (ratio_new - 1):+.1f}%)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
