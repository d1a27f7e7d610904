"""Progress bars: on stderr for long work on a terminal (SURGEON_PROGRESS=1 forces them into a
captured stream here), never with --json, off a terminal or with SURGEON_PROGRESS=0."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgeon import progress
from surgeon.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
APPLY_BARS = ("reading the checkpoint", "hashing tensors", "patching", "writing the run")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def apply_example(tmp_path: Path, *extra: str, forced: str | None):
    args = ["apply", str(ROOT / "specs" / "lora-qv.peft"), str(ROOT / "examples" / "tiny-llama"),
            "--out", str(tmp_path / "run"), "--seed", "0", *extra]
    result = runner.invoke(app, args, env={"SURGEON_PROGRESS": forced})
    assert result.exit_code == 0, result.output
    return result


def test_forced_bars_show_on_stderr_for_apply_and_revert(tmp_path: Path) -> None:
    result = apply_example(tmp_path, forced="1")
    for bar in APPLY_BARS:
        assert bar in result.stderr, result.stderr
        assert bar not in result.stdout
    assert "\x1b[2K" in result.stderr  # drawn and erased again (transient)
    reverted = runner.invoke(app, ["revert", str(tmp_path / "run"), "--out", str(tmp_path / "restored")],
                             env={"SURGEON_PROGRESS": "1"})
    assert reverted.exit_code == 0, reverted.output
    assert "verifying tensors" in reverted.stderr


def test_no_bars_with_json_even_when_forced(tmp_path: Path) -> None:
    result = apply_example(tmp_path, "--json", forced="1")
    assert result.stderr == ""
    assert json.loads(result.stdout)["ok"] is True
    assert progress.ENABLED  # the switch is back for the next command


def test_no_bars_off_a_terminal(tmp_path: Path) -> None:
    result = apply_example(tmp_path, forced=None)
    assert not any(bar in result.stderr for bar in APPLY_BARS), result.stderr


def test_off_means_the_iterable_itself() -> None:
    items = [1, 2, 3]
    assert progress.track(items, "x", total=3) is items  # tests' stderr is no terminal: no wrapper, no cost


def test_on_a_terminal_only_work_that_takes_long_shows_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SURGEON_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "DELAY", 0.05)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress.track(range(3), "quick work", total=3)) == [0, 1, 2]
    assert terminal.getvalue() == ""
    for _ in progress.track(range(3), "slow work", total=3):
        time.sleep(0.1)
    with progress.working("one long write"):
        time.sleep(0.2)
    assert "slow work" in terminal.getvalue() and "one long write" in terminal.getvalue()


def test_surgeon_progress_0_keeps_a_terminal_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGEON_PROGRESS", "0")
    monkeypatch.setattr(progress, "DELAY", 0.0)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    for _ in progress.track(range(2), "work", total=2):
        time.sleep(0.05)
    assert terminal.getvalue() == ""
