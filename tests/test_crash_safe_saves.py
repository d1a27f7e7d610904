"""A SIGKILL at any moment of `job.save` over an existing run leaves the old run or the new one,
readable by `surgeon.load` (tests/scripts/kill_saves.py kills a forked save at random points)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "kill_saves.py"
KILLS = 60


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")  # never on this project's Linux CI
def test_every_killed_save_leaves_a_loadable_run(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(KILLS), "7"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["kills"] == KILLS and counts["loadable"] == KILLS, counts
    assert counts["old"] > 0 and counts["new"] > 0, counts  # the kills landed before and after the swap
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "run"]
    assert all(".run.surgeon-" in name for name in leftovers), leftovers  # only a killed writer's, cleaned next time
