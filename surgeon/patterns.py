"""Module-path patterns: `*` one segment, `**` any depth, `<a,b>` alternation, `[0-11]` index ranges.

A pattern matches a dotted path when it matches the path's last segments, as PEFT's
`target_modules` names do: `attn.q` matches `layers.3.attn.q`, and `model.layers.0.self_attn.q_proj`
matches only itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class PatternError(ValueError):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class Pattern:
    text: str
    regex: re.Pattern[str]
    ranges: tuple[tuple[tuple[int, int], ...], ...]

    def matches(self, path: str) -> bool:
        found = self.regex.fullmatch(path)
        if found is None:
            return False
        for index, allowed in enumerate(self.ranges):
            value = found.group(f"r{index}")
            if value is not None and not any(lo <= int(value) <= hi for lo, hi in allowed):
                return False
        return True


class _Compiler:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.ranges: list[tuple[tuple[int, int], ...]] = []

    def compile(self) -> Pattern:
        if not self.text:
            raise PatternError("empty pattern", 0)
        body = self._sequence(stop="")
        return Pattern(self.text, re.compile(r"(?:.*\.)?" + body), tuple(self.ranges))

    def _sequence(self, stop: str) -> str:
        out: list[str] = []
        while self.pos < len(self.text) and self.text[self.pos] not in stop:
            out.append(self._atom())
        return "".join(out)

    def _atom(self) -> str:
        text, pos = self.text, self.pos
        if text.startswith("**", pos):
            self.pos += 2
            # `**.` at the front or `.**` at the end may stand for no segment at all.
            if self.pos < len(text) and text[self.pos] == ".":
                self.pos += 1
                return r"(?:[^.]+\.)*"
            return r".*"
        char = text[pos]
        if char == "*":
            self.pos += 1
            return r"[^.]+"
        if char == ".":
            self.pos += 1
            if text.startswith("**", self.pos) and self.pos + 2 == len(text):
                self.pos += 2
                return r"(?:\.[^.]+)*"
            return r"\."
        if char == "<":
            return self._alternation()
        if char == "[":
            return self._range()
        found = _SEGMENT_CHARS.match(text, pos)
        if found is None:
            raise PatternError(f"unexpected {char!r} in pattern", pos)
        self.pos = found.end()
        return re.escape(found.group())

    def _alternation(self) -> str:
        start = self.pos
        self.pos += 1
        options = []
        while True:
            option = self._sequence(stop=",>")
            if not option:
                raise PatternError("empty choice in '<...>'", self.pos)
            options.append(option)
            if self.pos >= len(self.text):
                raise PatternError("'<' is never closed with '>'", start)
            sep = self.text[self.pos]
            self.pos += 1
            if sep == ">":
                return "(?:" + "|".join(options) + ")"

    def _range(self) -> str:
        start = self.pos
        end = self.text.find("]", start)
        if end < 0:
            raise PatternError("'[' is never closed with ']'", start)
        spans = []
        for part in self.text[start + 1 : end].split(","):
            bounds = part.strip().split("-")
            if not all(b.strip().isdigit() for b in bounds) or len(bounds) > 2:
                raise PatternError(f"bad index range '[{self.text[start + 1 : end]}]': use [3], [0-11] or [0-3,8]", start)
            lo, hi = int(bounds[0]), int(bounds[-1])
            if lo > hi:
                raise PatternError(f"empty index range [{lo}-{hi}]", start)
            spans.append((lo, hi))
        self.pos = end + 1
        self.ranges.append(tuple(spans))
        return rf"(?P<r{len(self.ranges) - 1}>\d+)"


def compile_pattern(text: str) -> Pattern:
    """Compile a module pattern, or raise PatternError with the offset of the problem."""
    return _Compiler(text).compile()
