"""SIGKILL `job.save` over an existing run at random moments; after each kill the run directory
must load, holding either the previous run or the new one. Prints one JSON line of counts.

usage: python kill_saves.py WORK_DIR KILLS SEED
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import tiny_llama  # noqa: E402

import surgeon  # noqa: E402

SPEC = "inject lora r=8 into *.attn.<q,v>\ninject ia3 into *.mlp.down"


def stamp(job: surgeon.Job, version: int) -> None:
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.fill_(float(version))


def saved_version(run: Path, model: torch.nn.Module) -> int:
    loaded = surgeon.load(run, model)
    values = {float(p.detach().flatten()[0]) for p in loaded.trainable_parameters().values()}
    loaded.revert()
    assert len(values) == 1, f"a run mixes versions {sorted(values)}"
    return int(values.pop())


def timed_save(job: surgeon.Job, run: Path) -> float:
    """Seconds from fork to the end of a save in the child (what a kill delay is drawn against)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        job.save(run)
        os._exit(0)
    os.waitpid(pid, 0)
    return time.perf_counter() - start


def main() -> None:
    work, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    rng = random.Random(seed)
    run = work / "run"
    job = surgeon.apply(SPEC, tiny_llama(), seed=0)
    base = tiny_llama()
    stamp(job, 0)
    job.save(run)
    span = max(timed_save(job, run) for _ in range(3))
    counts = {"kills": 0, "loadable": 0, "old": 0, "new": 0, "save_ms": round(1000 * span, 2)}
    current = 0
    for version in range(1, kills + 1):
        stamp(job, version)
        pid = os.fork()
        if pid == 0:
            try:
                job.save(run)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 1.1 * span))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        counts["kills"] += 1
        found = saved_version(run, base)  # raises (and so fails the test) if the run does not load
        counts["loadable"] += 1
        if found not in (current, version):
            raise AssertionError(f"after kill {version} the run holds version {found}, neither {current} nor {version}")
        counts["new" if found == version else "old"] += 1
        current = found
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
