"""Property-based fuzzing: a spec is untrusted input, so the parser, the planner and `surgeon check`
give a Spec/Plan or a SurgeonError for every input, never another exception; and the pattern
matcher agrees with the backtracking regex it replaced.

Deterministic (derandomize=True): the same cases run on every machine. About 3,000 cases in all.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from conftest import tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from surgeon.cli import app
from surgeon.errors import SpecError, SurgeonError
from surgeon.graph import ModuleGraph, build_module_graph
from surgeon.language import parse_spec, read_spec_text
from surgeon.methods import base
from surgeon.patterns import PatternError, compile_pattern
from surgeon.planner import Plan, plan

ROOT = Path(__file__).resolve().parent.parent
SPECS = {path.name: path.read_bytes() for path in sorted((ROOT / "specs").glob("*.peft"))}
TINY_LLAMA = ROOT / "examples" / "tiny-llama"


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


# -- the reference: the regex compiler patterns.py used before its NFA (runs of 3+ stars aside)


class _RegexCompiler:
    """The old compiler, verbatim but for `exact_ranges`. Its `matches` checks a range only on the
    one parse the regex engine found first; with `exact_ranges` a range becomes an alternation of
    its (small) numbers, whole numbers only, so the engine's backtracking tries every parse."""

    _SEGMENT_CHARS = re.compile(r"[A-Za-z0-9_\-]+")

    def __init__(self, text: str, exact_ranges: bool) -> None:
        self.text = text
        self.pos = 0
        self.ranges: list[tuple[tuple[int, int], ...]] = []
        self.exact_ranges = exact_ranges

    def compile(self) -> tuple[re.Pattern[str], list[tuple[tuple[int, int], ...]]]:
        if not self.text:
            raise PatternError("empty pattern", 0)
        body = self._sequence(stop="")
        return re.compile(r"(?:.*\.)?" + body), self.ranges

    def _sequence(self, stop: str) -> str:
        out: list[str] = []
        while self.pos < len(self.text) and self.text[self.pos] not in stop:
            out.append(self._atom())
        return "".join(out)

    def _atom(self) -> str:
        text, pos = self.text, self.pos
        if text.startswith("**", pos):
            self.pos += 2
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
        found = self._SEGMENT_CHARS.match(text, pos)
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
        if self.exact_ranges:
            numbers = sorted({n for lo, hi in spans for n in range(lo, hi + 1)}, reverse=True)
            return r"(?<!\d)0*(?:" + "|".join(str(n) for n in numbers) + r")(?!\d)"
        self.ranges.append(tuple(spans))
        return rf"(?P<r{len(self.ranges) - 1}>\d+)"


def regex_matches(pattern: str, path: str, exact_ranges: bool) -> bool:
    regex, ranges = _RegexCompiler(pattern, exact_ranges).compile()
    found = regex.fullmatch(path)
    if found is None:
        return False
    for index, allowed in enumerate(ranges):
        value = found.group(f"r{index}")
        if value is not None and not any(lo <= int(value) <= hi for lo, hi in allowed):
            return False
    return True


# -- strategies

_NAMES = ["a", "b", "ab", "q", "v", "attn", "mlp", "up", "q_proj", "x-1", "1", "2", "10", "01"]
_RANGES = ["[1]", "[0-2]", "[1,10]", "[0-1,3]", "[02]"]


def _pattern_atoms() -> st.SearchStrategy[str]:
    simple = st.sampled_from(_NAMES + _RANGES + ["*", "**", "**.", ".**"])
    return st.recursive(
        simple,
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda xs: "<" + ",".join(xs) + ">"),
            st.lists(inner, min_size=1, max_size=3).map(".".join),
            st.lists(inner, min_size=2, max_size=3).map("".join),
        ),
        max_leaves=6,
    )


# valid patterns, and token soup that is mostly invalid (to compare errors and offsets)
_PATTERNS = st.one_of(
    _pattern_atoms(),
    st.lists(st.sampled_from(["a", "1", "*", ".", "<", ">", ",", "[", "]", "-", "[1]", "$"]), min_size=1, max_size=8)
    .map("".join),
).filter(lambda p: "***" not in p)  # a run of 3+ stars means `**` now: not the regex's meaning
_PATHS = st.one_of(
    st.lists(st.sampled_from(["a", "b", "ab", "q", "attn", "up", "1", "2", "10", "01", "x1", "3a", ""]),
             max_size=5).map(".".join),
    st.text(alphabet="ab12.", max_size=8),
)


_STRINGS = ['"héllo 文"', "''", '"\\x41\\u00e9\\U0001F600\\n"', '"\\q"', '"\\x4"', '"\\ud800"', "'it\\'s'", '"a\tb"',
            '"gpt2"', '"\x00"', '"[/x]"']
_INTS = ["0", "1", "2", "3", "8", "16", "64", "65", "-1", "-8", "+4", "100000", "1000000000000000", "2147483648"]
_FLOATS = ["0.0", "0.5", "1.0", "-0.1", "1e-5", "2.", ".5", "1.5", "1e15", "-0.0", "0.99", "1E3"]
_BAD_NUMBERS = ["1e16", "1e400", "-1e400", "1e-400", "1" * 31, "9" * 5000]
_WORDS = ["true", "false", "kaiming", "gaussian", "vocab", "random", "nf4", "fp4", "int8", "bf16", "fp16", "fp32",
          "none", "lora_only", "mlp", "lstm", "zero", "magnitude", "q", "nan", "inf", "x-y", "all"]
_LISTS = ["[]", "[q, k]", "[1, 2]", "[q, 7, 'x', true]", "[[1]]", "[<q,k>]", "[" * 60 + "]" * 60, "<q,k>", "<>",
          "<q,k,v,o,mlp,norm>", "<mlp>", "<nope>"]
_ANY_VALUE = _STRINGS + _INTS + _FLOATS + _BAD_NUMBERS + _WORDS + _LISTS


def _values_for(annotation: object) -> list[str]:
    """Values a parameter of this type may be given: mostly fitting ones, so the planner is reached."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return [str(a) for a in args] + ["nope"]
    if get_origin(annotation) is list:
        return _LISTS
    if args:  # X | None
        return [v for a in args for v in _values_for(a)]
    return {bool: ["true", "false", "1"], int: _INTS + ["2.5"], float: _FLOATS + _INTS[:6],
            str: _WORDS[:8] + _STRINGS[:2]}.get(annotation, _ANY_VALUE)  # type: ignore[call-overload]


_METHOD_VALUES = {key: {name: _values_for(field.annotation) for name, field in method.Params.model_fields.items()}
                  for key, method in base.registry().items()}
_TARGETS = ["*.attn.<q,v>", "*.attn", "q_proj", "*.mlp.*", "layers.[0-1].**", "layers.[0].attn.q", "embed", "head",
            "norm", "**", "*.attn.<q,k,v,o>", "**.<attn.<q,k>,mlp.up>", "model.layers.0.self_attn.q_proj", "*.mlp.up",
            "layers.[5].**", "nothing", "*", "*.attn.*", "mlp.<up,down,gate>", "<" * 40 + "q" + ">" * 40,
            "*" * 30 + "q", "layers.[0-99999999999999999999].q", "x$y", "[", "<q,v"]


_GOOD_TARGETS = {"prefix": ["*.attn", "layers.[0].attn"], "prompt": ["embed"], "mpt": ["embed"], "ptuning": ["embed"],
                 "bias": ["*.attn.*", "*.mlp.*", "**"]}
_REQUIRED = {key: sorted(name for name, field in method.Params.model_fields.items() if field.is_required())
             for key, method in base.registry().items()}


@st.composite
def _statements(draw: st.DrawFn) -> str:
    """One statement. Careful ones (most) name a method with its required parameters, each key
    once, a fitting preposition and target, so the planner gets past its first check and reads
    the odd values; wild ones mix any key, value and clause."""
    verb, method = draw(st.sampled_from(sorted(base.registry()) + [("inject", "lorra"), ("freeze", "lora")]))
    own = _METHOD_VALUES.get((verb, method), {"r": _INTS})
    careful = draw(st.integers(0, 3)) > 0
    words = [verb, method]
    if verb == "quantize":  # `quantize base nf4 double`, `quantize PATTERN int8`: no method name
        words[1:] = draw(st.lists(st.sampled_from(["base", "nf4", "fp4", "int8", "double", "*.mlp.*", "q_proj"]),
                                  min_size=1, max_size=3))
    keys = list(_REQUIRED.get((verb, method), [])) if careful else []
    keys += draw(st.lists(st.sampled_from(sorted(own)), max_size=3, unique=careful))
    for key in dict.fromkeys(keys) if careful else keys:
        words.append(f"{key}={draw(st.sampled_from(own[key]))}")
    if not careful and draw(st.booleans()):
        words.append(f"{draw(st.sampled_from(_KEYS))}={draw(st.sampled_from(_ANY_VALUE))}")
    method_class = base.registry().get((verb, method))
    if careful and method_class is not None and method_class.prepositions and verb != "quantize":
        targets = _GOOD_TARGETS.get(method, ["*.attn.<q,v>", "q_proj", "*.mlp.*", "layers.[0-1].**", "*.attn.*"])
        words.append(f"{sorted(method_class.prepositions)[0]} {draw(st.sampled_from(targets))}")
        if draw(st.integers(0, 3)) == 0:
            words.append(f"except {draw(st.sampled_from(_TARGETS))}")
    else:
        for _ in range(draw(st.integers(0, 2))):
            preposition = draw(st.sampled_from(["into", "into", "in", "except", "after"]))
            words.append(f"{preposition} {draw(st.sampled_from(_TARGETS))}")
    if draw(st.integers(0, 4)) == 0:
        words.append(draw(st.sampled_from(["as qv", "as", "as 1"])))
    return " ".join(words)


_KEYS = sorted({key for method in base.registry().values() for key in method.Params.model_fields} | {"rank", "lr"})
_JUNK = ["\x00", "\x0c", "\x0b", "\x1c", "\x85", "\u2028", "\r", "\r\n", "\n", "\t", "=", "==", "[", "]", "<", ">", ",",
         '"', "'", "\\", "#", ";", "é", "文", "@", "[bold]", "[/", "[/x]", "*" * 20, "<" * 40, "[" * 50, "1" * 40,
         "1e999", "into", "as", " ", "\ufeff", "\x1b[31m", "\udc80", "\U0001F600"]


@st.composite
def _junked(draw: st.DrawFn, text: str) -> str:
    """`text` with up to three pieces of junk inserted; half of the specs stay clean."""
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.one_of(st.sampled_from(_JUNK), st.text(max_size=2))) + text[at:]
    return text


_GRAMMAR_SPECS = st.tuples(
    st.lists(_statements(), min_size=0, max_size=2), st.sampled_from(["\n", ";", "\r\n", "  # nöte\n"]),
).map(lambda parts: parts[1].join(parts[0])).flatmap(lambda text: _junked(text))

_INTERESTING_BYTES = [b"\x00", b"\x0c", b"\x0b", b"\r", b"\n", b"\xff", b"\xc3", b"\xe6\x96\x87", b"\xc3\xa9", b"\\",
                      b'"', b"[", b"]", b"<", b">", b"*", b"=", b";", b"#", b"9" * 40, b"\xed\xa0\x80", b"\xef\xbb\xbf"]


@st.composite
def _mutated_files(draw: st.DrawFn) -> bytes:
    """A spec from specs/ with random bytes inserted, deleted and replaced (invalid UTF-8 too)."""
    data = bytearray(SPECS[draw(st.sampled_from(sorted(SPECS)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        at = draw(st.integers(0, len(data)))
        payload = draw(st.one_of(st.sampled_from(_INTERESTING_BYTES), st.binary(min_size=1, max_size=4)))
        if kind == "insert":
            data[at:at] = payload
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at : at + len(payload)] = payload
    return bytes(data)


# -- the properties


@lru_cache(maxsize=1)
def _graph() -> ModuleGraph:
    return build_module_graph(tiny_llama())


_PLACELESS = ("the spec has no statements", "the spec is ")


def parse_or_error(text: str) -> object:
    """parse_spec's Spec, or its SpecError checked: a message, a location inside the text, a render."""
    try:
        return parse_spec(text, "fuzz.peft")
    except SpecError as error:
        assert isinstance(error.message, str) and error.message
        rendered = error.render()
        assert isinstance(rendered, str) and error.message in rendered
        if error.location is None:
            assert error.message.startswith(_PLACELESS), error.message
        else:
            lines = text.split("\n")
            assert 1 <= error.location.line <= len(lines), (error.location, text)
            assert 1 <= error.location.column <= len(lines[error.location.line - 1]) + 1, (error.location, text)
        return error


def plan_or_error(spec: object) -> None:
    """The planner on a parsed spec: a Plan or a SurgeonError, never another exception."""
    try:
        assert isinstance(plan(spec, _graph()), Plan)  # type: ignore[arg-type]
    except SurgeonError as error:
        assert str(error)


@fuzz_settings(1200)
@given(text=_GRAMMAR_SPECS)
def test_fuzz_grammar_specs_parse_and_plan(text):
    result = parse_or_error(text)
    if not isinstance(result, SpecError):
        plan_or_error(result)


@fuzz_settings(900)
@given(data=_mutated_files())
def test_fuzz_mutated_spec_files(data, tmp_path_factory):
    path = _scratch(tmp_path_factory) / "mutated.peft"
    path.write_bytes(data)
    try:
        text, source = read_spec_text(path)
    except SurgeonError as error:
        assert "is not UTF-8" in str(error)
        text = data.decode("utf-8", "surrogateescape")  # the parser still has to cope with the text
    result = parse_or_error(text)
    if not isinstance(result, SpecError):
        plan_or_error(result)


@fuzz_settings(800)
@given(pattern=_PATTERNS, paths=st.lists(_PATHS, min_size=1, max_size=4))
def test_fuzz_patterns_agree_with_the_regex(pattern, paths):
    try:
        compiled = compile_pattern(pattern)
    except PatternError as error:
        with pytest.raises(PatternError) as reference:
            _RegexCompiler(pattern, exact_ranges=False).compile()
        assert reference.value.offset == error.offset
        return
    _RegexCompiler(pattern, exact_ranges=False).compile()  # valid for one, valid for both
    for path in paths:
        assert compiled.matches(path) is regex_matches(pattern, path, exact_ranges=True), (pattern, path)
        if "[" not in pattern:  # without ranges the old compiler itself is the reference
            assert compiled.matches(path) is regex_matches(pattern, path, exact_ranges=False), (pattern, path)


def test_fuzz_targets_match_as_the_regex_did_on_a_model():
    """Every (valid) target the spec fuzzers use, on every candidate path of the tiny Llama."""
    names = [name for name, _, _ in _graph().candidates()]
    for target in _TARGETS + ["*.attn.<q,v>", "**.<attn.<q,k,v,o>,mlp.<up,down,gate>> ", "layers.0.**"]:
        try:
            compiled = compile_pattern(target.strip())
        except PatternError:
            continue
        if "***" in target:
            continue
        for name in names:
            assert compiled.matches(name) is regex_matches(target.strip(), name, exact_ranges=False), (target, name)


def _scratch(factory: pytest.TempPathFactory) -> Path:
    folder = factory.getbasetemp() / "fuzz"
    folder.mkdir(exist_ok=True)
    return folder


runner = CliRunner()


@fuzz_settings(250)
@given(data=st.one_of(_mutated_files(), _GRAMMAR_SPECS.map(lambda t: t.encode("utf-8", "surrogateescape"))))
def test_fuzz_surgeon_check(data, tmp_path_factory):
    path = _scratch(tmp_path_factory) / "cli.peft"
    path.write_bytes(data)
    result = runner.invoke(app, ["check", str(path), str(TINY_LLAMA)])
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_cli_error_text_is_not_markup(tmp_path):
    """The error shows the spec's line: printed as rich markup, '[/y]' in it raised MarkupError."""
    path = tmp_path / "markup.peft"
    path.write_text("inject lora r=8 into x.[/y] @\n")
    result = runner.invoke(app, ["check", str(path), str(TINY_LLAMA)])
    assert result.exit_code == 2 and "[/y]" in result.output
