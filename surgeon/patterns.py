"""Module-path patterns: `*` one segment, `**` any depth, `<a,b>` alternation, `[0-11]` index ranges.

A pattern matches a dotted path when it matches the path's last segments, as PEFT's
`target_modules` names do: `attn.q` matches `layers.3.attn.q`, and `model.layers.0.self_attn.q_proj`
matches only itself.

- `*` is one non-empty segment (or part of one: `q*` matches `q_proj`).
- A run of two or more stars (`**`, `***`, ...) means `**`: any characters, dots included. `**.`
  at the front and `.**` at the end may also stand for no segment at all (`**.up` matches `up`).
- `<a,b.c>` is a choice; choices may nest and may contain dots, at most 32 levels deep. The
  plain-name options of a choice share one trie, so `<model.layers.0.self_attn.q_proj,...>` with
  thousands of full paths (as `surgeon import` writes them) costs one state.
- `[3]`, `[0-11]`, `[0-3,8]` match a whole number (a run of digits with no digit right before or
  after it) whose value is in one of the ranges: `layers.[1]**` matches `layers.1.mlp`, not
  `layers.11.mlp`.
- Anything else is a literal name: letters, digits, `_` and `-`.

Patterns come from user-written (untrusted) specs and run against thousands of module paths, so
they are matched by a Thompson NFA simulated with state sets, never by a backtracking regex: a
pattern of length n matches a path of length m in O(n * m) steps, whatever the pattern. The sets
are memoised as a lazy DFA, so the many similar paths of one model cost a few dict look-ups each.
A pattern is at most 100,000 characters long and has at most 256 operators (star runs, ranges
and choices): the NFA states alive at once are bounded by the operators, not by the length, so a
long adversarial pattern (`**.` x 30,000) cannot make each step cost 100,000 states.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

MAX_PATTERN_LENGTH = 100_000
MAX_NESTING = 32
MAX_INDEX_DIGITS = 18
MAX_OPERATORS = 256


class PatternError(ValueError):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9_\-]+")
_STARS = re.compile(r"\*+")
_INDEX = re.compile(r"[0-9]+")

# The syntax tree: a sequence is a list of atoms, an atom a tuple whose first item is its kind.
Atom = tuple
_SEGMENT = ("segment",)  # `*`: [^.]+
_ANYTHING = ("anything",)  # `**`: .*
_LEADING_SEGMENTS = ("leading",)  # `**.`: (?:[^.]+\.)*
_TRAILING_SEGMENTS = ("trailing",)  # `.**` at the end: (?:\.[^.]+)*
_DOT = ("dot",)


class _Parser:
    """Pattern text -> syntax tree, with PatternError offsets into the text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0
        self.operators = 0

    def parse(self) -> list[Atom]:
        if not self.text:
            raise PatternError("empty pattern", 0)
        if len(self.text) > MAX_PATTERN_LENGTH:
            raise PatternError(f"pattern is {len(self.text)} characters long; at most {MAX_PATTERN_LENGTH} are allowed",
                               MAX_PATTERN_LENGTH)
        return self._sequence(stop="")

    def _sequence(self, stop: str) -> list[Atom]:
        out: list[Atom] = []
        while self.pos < len(self.text) and self.text[self.pos] not in stop:
            start = self.pos
            atom = self._atom()
            if atom[0] not in ("literal", "dot"):
                self.operators += 1
                if self.operators > MAX_OPERATORS:
                    raise PatternError(f"pattern has more than {MAX_OPERATORS} operators (star runs, ranges, choices)",
                                       start)
            out.append(atom)
        return out

    def _atom(self) -> Atom:
        text, pos = self.text, self.pos
        char = text[pos]
        if char == "*":
            self.pos = _STARS.match(text, pos).end()  # type: ignore[union-attr]
            if self.pos - pos == 1:
                return _SEGMENT
            # `**.` may stand for no segment at all, so `**.up` matches `up`
            if self.pos < len(text) and text[self.pos] == ".":
                self.pos += 1
                return _LEADING_SEGMENTS
            return _ANYTHING
        if char == ".":
            self.pos += 1
            stars = _STARS.match(text, self.pos)
            if stars is not None and stars.end() - self.pos >= 2 and stars.end() == len(text):
                self.pos = stars.end()  # `.**` at the end: `layers.**` matches `layers` too
                return _TRAILING_SEGMENTS
            return _DOT
        if char == "<":
            return self._alternation()
        if char == "[":
            return self._range()
        found = _SEGMENT_CHARS.match(text, pos)
        if found is None:
            raise PatternError(f"unexpected {char!r} in pattern", pos)
        self.pos = found.end()
        return ("literal", found.group())

    def _alternation(self) -> Atom:
        start = self.pos
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise PatternError(f"'<' nested more than {MAX_NESTING} levels deep", start)
        self.pos += 1
        options: list[list[Atom]] = []
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
                self.depth -= 1
                return ("choice", options)

    def _range(self) -> Atom:
        start = self.pos
        end = self.text.find("]", start)
        if end < 0:
            raise PatternError("'[' is never closed with ']'", start)
        inside = self.text[start + 1 : end]
        spans = []
        for part in inside.split(","):
            bounds = [b.strip() for b in part.split("-")]
            if len(bounds) > 2 or not all(_INDEX.fullmatch(b) for b in bounds):
                raise PatternError(f"bad index range '[{inside}]': use [3], [0-11] or [0-3,8]", start)
            if any(len(b) > MAX_INDEX_DIGITS for b in bounds):
                raise PatternError(f"index in '[{inside}]' is too large: at most {MAX_INDEX_DIGITS} digits", start)
            lo, hi = int(bounds[0]), int(bounds[-1])
            if lo > hi:
                raise PatternError(f"empty index range [{lo}-{hi}]", start)
            spans.append((lo, hi))
        self.pos = end + 1
        return ("range", tuple(spans))


# NFA node kinds. CHAR, NONDOT, ANY, RANGE and TRIE consume a character; SPLIT is an epsilon fork.
# A TRIE node is one node of a trie of plain names: its arg maps a character to the next node, and
# its out (if any) goes on where a name ends.
_CHAR, _NONDOT, _ANY, _RANGE, _SPLIT, _MATCH, _TRIE = range(7)


class _Automaton:
    """A Thompson NFA over characters, simulated with state sets memoised into a lazy DFA.

    An NFA state is an int: a node id; for a RANGE node that has read digits,
    `node + size * (value + 1)`, so the state carries the value of the number read so far (values
    above the range's largest bound are dropped: more digits only make them larger, so a range
    node has at most its bound's digits + 2 states); and `~state` (negative) for a state reached
    by ending a number, which the next character may not continue: it must not be a digit.
    A number also cannot start right after a digit, so `[0-3]` reads whole numbers only.
    """

    # A memo holds about this many NFA states in all before it is dropped and started afresh:
    # compiled patterns are cached, so this bounds their memory (a few MB each at most).
    _MEMO_BUDGET = 50_000

    def __init__(self, atoms: list[Atom]) -> None:
        self.kinds: list[int] = []
        self.args: list[object] = []
        self.outs: list[tuple[int, ...]] = []
        self.steps = 0  # NFA states visited, for tests that check matching stays linear
        match = self._emit(_MATCH)
        body = self._sequence(atoms, match)
        # the regex `(?:.*\.)?` in front: the body may start after any dot
        anything = self._emit(_ANY)
        dot = self._emit(_CHAR, ".", (body,))
        loop = self._emit(_SPLIT, outs=(anything, dot))
        self.outs[anything] = (loop,)
        self.start = self._emit(_SPLIT, outs=(body, loop))
        self.size = len(self.kinds)
        self._lock = threading.Lock()
        self._memo = self._new_memo()

    # -- construction: each atom is built in front of its continuation `then`, back to front

    def _emit(self, kind: int, arg: object = None, outs: tuple[int, ...] = ()) -> int:
        self.kinds.append(kind)
        self.args.append(arg)
        self.outs.append(outs)
        return len(self.kinds) - 1

    def _sequence(self, atoms: list[Atom], then: int) -> int:
        for atom in reversed(atoms):
            then = self._atom(atom, then)
        return then

    def _atom(self, atom: Atom, then: int) -> int:
        kind = atom[0]
        if kind == "literal":
            for char in reversed(atom[1]):
                then = self._emit(_CHAR, char, (then,))
            return then
        if kind == "dot":
            return self._emit(_CHAR, ".", (then,))
        if kind == "range":
            spans = atom[1]
            return self._emit(_RANGE, (spans, max(hi for _, hi in spans)), (then,))
        if kind == "choice":
            names = [_plain(option) for option in atom[1]]
            starts = [self._sequence(option, then) for option, name in zip(atom[1], names) if name is None]
            if any(name is not None for name in names):
                starts.append(self._trie([name for name in names if name is not None], then))
            return self._emit(_SPLIT, outs=tuple(starts))
        if kind == "segment":  # [^.]+
            return self._plus_nondot(then)
        if kind == "anything":  # .*
            char = self._emit(_ANY)
            loop = self._emit(_SPLIT, outs=(char, then))
            self.outs[char] = (loop,)
            return loop
        if kind == "leading":  # (?:[^.]+\.)*
            loop = self._emit(_SPLIT)
            segment = self._plus_nondot(self._emit(_CHAR, ".", (loop,)))
            self.outs[loop] = (segment, then)
            return loop
        # "trailing": (?:\.[^.]+)*
        loop = self._emit(_SPLIT)
        dot = self._emit(_CHAR, ".", (self._plus_nondot(loop),))
        self.outs[loop] = (dot, then)
        return loop

    def _trie(self, names: list[str], then: int) -> int:
        """One trie for the plain-name options of a choice (built without recursion: a name may be
        100,000 characters long)."""
        root: dict[str, dict] = {}
        for name in names:
            node = root
            for char in name:
                node = node.setdefault(char, {})
            node[""] = {}  # a name ends here
        top = self._emit(_TRIE, {})
        stack = [(root, top)]
        while stack:
            branch, node_id = stack.pop()
            for char, below in branch.items():
                if char == "":
                    self.outs[node_id] = (then,)
                else:
                    child = self._emit(_TRIE, {})
                    self.args[node_id][char] = child  # type: ignore[index]
                    stack.append((below, child))
        return top

    def _plus_nondot(self, then: int) -> int:
        char = self._emit(_NONDOT)
        self.outs[char] = (self._emit(_SPLIT, outs=(char, then)),)
        return char

    # -- simulation

    def _is_plain_range(self, state: int) -> bool:
        return 0 <= state < self.size and self.kinds[state] == _RANGE

    def _closure(self, seeds: Iterable[int]) -> frozenset[int]:
        """The states reachable from `seeds` without reading a character (SPLITs left out)."""
        size, kinds, outs = self.size, self.kinds, self.outs
        seen: set[int] = set()
        stack = list(seeds)
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            self.steps += 1
            ended = state < 0  # reached by ending a number: the tag passes on through SPLITs
            node = (~state if ended else state) % size
            if kinds[node] in (_SPLIT, _TRIE):  # a TRIE's out is where a name ends: no character read
                stack.extend(~out if ended else out for out in outs[node])
            elif kinds[node] == _RANGE and state >= size:
                spans, _ = self.args[node]  # type: ignore[misc]
                value = state // size - 1
                if any(lo <= value <= hi for lo, hi in spans):
                    stack.append(~outs[node][0])  # the number may end here
        kept = {s for s in seen if kinds[(~s if s < 0 else s) % size] != _SPLIT}
        # a tagged state allows less than its untagged twin; a tagged range start allows nothing
        return frozenset(s for s in kept if s >= 0 or not (~s in kept or kinds[~s] == _RANGE))

    def _advance(self, states: frozenset[int], char: str) -> frozenset[int]:
        size, kinds, args, outs = self.size, self.kinds, self.args, self.outs
        seeds: list[int] = []
        digit = int(char) if char.isdecimal() else None  # as `\d` in a regex: any Unicode Nd digit
        for state in states:
            self.steps += 1
            if state < 0:
                if digit is not None:
                    continue  # a number just ended: a digit would have continued it
                state = ~state
            node = state % size
            kind = kinds[node]
            if kind == _CHAR:
                if args[node] == char:
                    seeds.append(outs[node][0])
            elif kind == _NONDOT:
                if char != ".":
                    seeds.append(outs[node][0])
            elif kind == _ANY:
                seeds.append(outs[node][0])
            elif kind == _TRIE:
                child = args[node].get(char)  # type: ignore[attr-defined]
                if child is not None:
                    seeds.append(child)
            elif kind == _RANGE and digit is not None:
                value = (state // size - 1 if state >= size else 0) * 10 + digit
                if value <= args[node][1]:  # type: ignore[index]
                    seeds.append(node + size * (value + 1))
        after = self._closure(seeds)
        if digit is not None:  # a number cannot start right after a digit
            after = frozenset(s for s in after if not self._is_plain_range(s))
        return after

    def _new_memo(self) -> _Memo:
        memo = _Memo()
        memo.start = memo.intern(self._closure([self.start]))
        return memo

    def _read(self, memo: _Memo, state: int, chars: str) -> int:
        """The DFA state after reading `chars`, computing the transitions not memoised yet."""
        with self._lock:  # another thread may share this pattern (compile_pattern is cached)
            for char in chars:
                key = (state, char)
                found = memo.by_char.get(key)
                if found is None:
                    found = memo.by_char[key] = memo.intern(self._advance(memo.sets[state], char))
                state = found
            memo.used += len(chars) // 8 + 1
            return state

    def matches(self, path: str) -> bool:
        memo = self._memo  # a local: a memo dropped by another thread stays valid for this match
        if memo.used > self._MEMO_BUDGET:
            memo = self._memo = self._new_memo()
        first, *rest = path.split(".")
        state = memo.first.get(first)
        if state is None:
            state = memo.first[first] = self._read(memo, memo.start, first)
        after_dot = memo.after_dot
        for segment in rest:
            table = after_dot[state]
            found = table.get(segment)
            if found is None:
                found = table[segment] = self._read(memo, state, "." + segment)
            state = found
        return memo.accepts[state]


class _Memo:
    """A lazy DFA: the NFA state sets met so far, numbered, and the transitions between them."""

    def __init__(self) -> None:
        self.ids: dict[frozenset[int], int] = {}
        self.sets: list[frozenset[int]] = []
        self.accepts: list[bool] = []
        self.by_char: dict[tuple[int, str], int] = {}
        # per DFA state: segment -> the state after reading "." and the segment (the first
        # segment of a path is read without the dot, from `first`), so a path costs a few look-ups
        self.after_dot: list[dict[str, int]] = []
        self.first: dict[str, int] = {}
        self.used = 0  # NFA states held, and segments memoised (by length)
        self.start = 0

    def intern(self, states: frozenset[int]) -> int:
        found = self.ids.get(states)
        if found is None:
            found = self.ids[states] = len(self.sets)
            self.sets.append(states)
            self.accepts.append(0 in states or ~0 in states)  # node 0 is MATCH
            self.after_dot.append({})
            self.used += len(states) + 1
        return found


def _plain(option: list[Atom]) -> str | None:
    """The text of a choice option made of names and dots only, else None."""
    if not all(atom[0] in ("literal", "dot") for atom in option):
        return None
    return "".join(atom[1] if atom[0] == "literal" else "." for atom in option)


@dataclass(frozen=True)
class Pattern:
    text: str
    automaton: _Automaton = field(compare=False, repr=False)

    def matches(self, path: str) -> bool:
        return self.automaton.matches(path)

    @property
    def nfa_size(self) -> int:
        """The number of NFA nodes: linear in the pattern's length."""
        return self.automaton.size


@lru_cache(maxsize=32)
def compile_pattern(text: str) -> Pattern:
    """Compile a module pattern, or raise PatternError with the offset of the problem.

    Cached (as `re` caches its regexes): the planner compiles each clause anew, and a warm
    pattern's lazy DFA answers a path in a few dict look-ups."""
    return Pattern(text, _Automaton(_Parser(text).parse()))
