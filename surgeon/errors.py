"""Errors a user can cause. Each renders as a short message; the CLI prints it and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict


class Location(BaseModel):
    """Where in a spec something was written (1-based line and column)."""

    model_config = ConfigDict(frozen=True)
    line: int
    column: int
    end_column: int | None = None


class SurgeonError(Exception):
    """A mistake in the user's input: a spec, a model, a run directory. Never a bug of ours."""


class SpecError(SurgeonError):
    """A problem at a place in the spec text: rendered as file:line:col with the line and a caret."""

    def __init__(
        self,
        message: str,
        *,
        source: str,
        text: str,
        location: Location | None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.text = text
        self.location = location
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        if self.location is None:
            head = f"{self.source}: error: {self.message}"
            return head if not self.hint else f"{head}\n  {self.hint}"
        loc = self.location
        lines = self.text.split("\n")  # as Lark counts lines: str.splitlines() also splits at \f, \x1c, \u2028, ...
        line_text = lines[loc.line - 1] if 0 < loc.line <= len(lines) else ""
        width = max(1, (loc.end_column or loc.column + 1) - loc.column)
        caret = " " * (loc.column - 1) + "^" + "~" * (width - 1)
        parts = [f"{self.source}:{loc.line}:{loc.column}: error: {self.message}", f"  {line_text}", f"  {caret}"]
        if self.hint:
            parts.append(f"  {self.hint}")
        return "\n".join(parts)


class PlanError(SurgeonError):
    """The spec is well-formed but cannot be applied to this model; nothing was changed."""


class ModelLoadError(SurgeonError):
    """MODEL could not be found or read."""


class ManifestError(SurgeonError):
    """A run directory or its manifest is missing, corrupt or edited."""


class RevertError(SurgeonError):
    """Revert could not give the original back (originals missing or a tensor differs)."""


class SurgeryError(SurgeonError):
    """Patching failed halfway; what was patched has been rolled back."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str | None:
    """A 'did you mean' hint for an unknown name, or None when nothing is close."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=n, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


class ExportError(SurgeonError):
    """A run cannot be written in (or read from) another tool's format, and why."""
