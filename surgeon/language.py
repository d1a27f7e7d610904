r"""Stage 1: .peft text -> Spec (the AST). Only syntax is checked here; meaning is the planner's.

A spec is untrusted input (a run directory carries one), so every input gives a Spec or a
SpecError, never another exception. Limits, each a SpecError at the place: a spec is at most
128 KiB (131,072 characters: real specs are a few lines, and Lark reads ~40,000 characters a
second); a list holds only scalars (no list or choice inside a list); a number has at most 30
digits, is finite and at most 1e15 in magnitude (parameters are ranks, alphas, dropouts and step
counts), and a non-zero number may not round to 0; a quoted string knows the escapes
\\ \" \' \n \t \r \xHH \uHHHH \UHHHHHHHH and keeps any other character as written.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError

from surgeon.errors import Location, SpecError, SurgeonError
from surgeon.spec import Clause, Param, Spec, Statement, Word

# What the parser's terminal names mean to a person reading the error.
_TERMINAL_WORDS = {
    "WORD": "a word",
    "ARG": "a word",
    "KEY": "a parameter (key=value)",
    "PATTERN": "a module pattern",
    "SIGNED_NUMBER": "a number",
    "STRING": "a quoted string",
    "_SEP": "the end of the statement",
    "EQUAL": "'='",
    "LSQB": "'['",
    "RSQB": "']'",
    "LESSTHAN": "'<'",
    "MORETHAN": "'>'",
    "COMMA": "','",
    "AS": "'as'",
    "$END": "the end of the spec",
}

MAX_SPEC_LENGTH = 1 << 17  # characters: a real spec is a few lines; Lark parses ~40k characters a second
MAX_NUMBER = 1e15
MAX_NUMBER_DIGITS = 30

_SIMPLE_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_HEX_DIGITS = re.compile(r"[0-9A-Fa-f]+")


def grammar_path() -> Path:
    """The grammar ships inside the wheel; in a source checkout it is the repository's grammar/."""
    packaged = resources.files("surgeon") / "grammar" / "peft.lark"
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "grammar" / "peft.lark"


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(grammar_path().read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=False)


def _loc(token: Token) -> Location:
    return Location(line=token.line, column=token.column, end_column=token.end_column)


def _lines(text: str) -> list[str]:
    r"""The spec's lines as Lark counts them: only "\n" ends a line (str.splitlines also splits at
    form feeds, "\x1c", "\u2028", a lone "\r", ... and would put a caret on the wrong line)."""
    return text.split("\n")


def _end_of(text: str) -> Location:
    lines = _lines(text.removesuffix("\n"))
    return Location(line=len(lines), column=len(lines[-1]) + 1)


def _escape(body: str, slash: int) -> tuple[str | None, int]:
    """The character an escape at body[slash] stands for (None if it is no valid escape), and its length."""
    kind = body[slash + 1]  # the STRING terminal never ends in a lone backslash
    if kind in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[kind], 2
    if kind not in _HEX_ESCAPES:
        return None, 2
    digits = body[slash + 2 : slash + 2 + _HEX_ESCAPES[kind]]
    length = 2 + len(digits)
    if len(digits) != _HEX_ESCAPES[kind] or not _HEX_DIGITS.fullmatch(digits):  # int() would take "_" and spaces
        return None, length
    code = int(digits, 16)
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:  # not a character (a lone surrogate cannot be printed)
        return None, length
    return chr(code), length


class _ToAst(Transformer):
    """Parse tree -> AST nodes; a value that cannot be one raises SpecError at its token."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__()
        self.text = text
        self.source = source

    def _error(self, message: str, location: Location, hint: str | None = None) -> SpecError:
        return SpecError(message, source=self.source, text=self.text, location=location, hint=hint)

    @v_args(inline=True)
    def number(self, token: Token) -> int | float:
        text = str(token)
        mantissa = re.split("[eE]", text)[0]
        if sum(c.isdigit() for c in mantissa) > MAX_NUMBER_DIGITS:
            raise self._error(f"number has more than {MAX_NUMBER_DIGITS} digits", _loc(token))
        value: int | float = int(text) if text.lstrip("+-").isdigit() else float(text)
        if not math.isfinite(value) or abs(value) > MAX_NUMBER:
            raise self._error(f"number {text} is too large", _loc(token),
                              "numbers in a spec are at most 1e15 in magnitude")
        if value == 0 and mantissa.strip("+-.0"):
            raise self._error(f"number {text} is too small: it rounds to 0", _loc(token))
        return value

    @v_args(inline=True)
    def string(self, token: Token) -> str:
        return self._unescape(str(token)[1:-1], token)

    def _unescape(self, body: str, token: Token) -> str:
        """A quoted string's text with its escapes replaced; non-ASCII text is kept as written."""
        out: list[str] = []
        start = 0
        while (slash := body.find("\\", start)) >= 0:
            out.append(body[start:slash])
            char, length = _escape(body, slash)
            if char is None:
                column = token.column + 1 + slash  # + 1: the opening quote
                shown = body[slash : slash + max(length, 2)]
                raise self._error(f"bad escape {shown!r} in a string",
                                  Location(line=token.line, column=column, end_column=column + len(shown)),
                                  r"escapes: \\ \" \' \n \t \r \xHH \uHHHH \UHHHHHHHH")
            out.append(char)
            start = slash + length
        out.append(body[start:])
        return "".join(out)

    @v_args(inline=True)
    def quoted(self, token: Token) -> Word:
        return Word(text=self._unescape(str(token)[1:-1], token), location=_loc(token), quoted=True)

    @v_args(inline=True)
    def word(self, token: Token) -> bool | str:
        return {"true": True, "false": False}.get(str(token), str(token))

    def list(self, items: list[object]) -> list:
        return list(items)

    def choice(self, words: list[Token]) -> list[str]:
        return [str(w) for w in words]

    @v_args(inline=True)
    def param(self, key: Token, value: object) -> Param:
        return Param(key=str(key), value=value, location=_loc(key))

    @v_args(inline=True)
    def clause(self, prep: Token, pattern: Token) -> Clause:
        end = Location(line=pattern.line, column=prep.column, end_column=pattern.end_column)
        return Clause(preposition=str(prep), pattern=str(pattern), location=end)

    @v_args(inline=True)
    def name(self, word: Token) -> str:
        return str(word)


def _check_lists(tree: Tree, text: str, source: str) -> None:
    """A list holds scalars only. Checked before the (recursive) transformer runs, without
    recursion, so `r=[[[[...]]]]` nested thousands deep is an error and not a RecursionError."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in node.children:
            if not isinstance(child, Tree):
                continue
            if node.data == "list" and child.data in ("list", "choice"):
                # a list or choice always has a position: its brackets are tokens
                where = Location(line=child.meta.line, column=child.meta.column)
                kind = "list" if child.data == "list" else "choice <...>"
                raise SpecError(f"a list cannot hold a {kind}", source=source, text=text, location=where,
                                hint="a list holds numbers, words and strings: [1, 2, x]")
            stack.append(child)


def _statement(tree: Tree) -> Statement:
    words = [Word(text=str(t), location=_loc(t)) if isinstance(t, Token) else t
             for t in tree.children if isinstance(t, (Token, Word))]
    params = tuple(c for c in tree.children if isinstance(c, Param))
    clauses = tuple(c for c in tree.children if isinstance(c, Clause))
    names = [c for c in tree.children if isinstance(c, str) and not isinstance(c, Token)]
    first = words[0].location
    return Statement(
        verb=words[0],
        words=tuple(words[1:]),
        params=params,
        clauses=clauses,
        name=names[0] if names else None,
        location=Location(line=first.line, column=first.column, end_column=tree.meta.end_column),
    )


def _syntax_error(err: UnexpectedInput, text: str, source: str) -> SpecError:
    location = Location(line=err.line, column=err.column) if err.line and err.line > 0 else None
    if isinstance(err, UnexpectedCharacters):
        message = f"unexpected character {err.char!r}"
    elif isinstance(err, UnexpectedEOF):
        message = "the spec ends in the middle of a statement"
        location = _end_of(text)
    else:
        token: Token = err.token  # type: ignore[attr-defined]
        shown = "end of line" if token.type == "_SEP" else f"'{token}'"
        message = f"unexpected {shown}"
        if token.type not in ("_SEP", "$END") and location is not None:
            location = Location(line=err.line, column=err.column, end_column=token.end_column)
        if token.type == "$END":
            location = _end_of(text)
    # UnexpectedToken says what it expected in `accepts`/`expected`, UnexpectedCharacters in `allowed`
    names = getattr(err, "accepts", None) or getattr(err, "expected", None) or getattr(err, "allowed", None) or ()
    expected = sorted({_TERMINAL_WORDS.get(t, f"'{t.lower()}'") for t in names if not t.startswith("__")})
    if len(expected) > 4:
        expected = [e for e in expected if not (e.startswith("'") and e[1:-1].isalpha())] + ["a preposition (into, after, ...)"]
    hint = "expected " + ", ".join(expected) if expected else None
    return SpecError(message, source=source, text=text, location=location, hint=hint)


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except OSError:  # e.g. a one-line spec longer than a file name may be
        return False


def _read_spec_file(path: Path) -> str:
    """A spec file's text: UTF-8 (a leading BOM is dropped), newlines read as `read_text` does."""
    if path.is_dir():
        raise SurgeonError(f"spec file {path} is a directory")
    if not path.exists():
        raise SurgeonError(f"spec file not found: {path}")
    if not path.is_file():
        raise SurgeonError(f"spec file {path} is not a regular file")
    limit = 4 * MAX_SPEC_LENGTH  # a UTF-8 character is at most 4 bytes
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except (OSError, ValueError) as err:
        raise SurgeonError(f"cannot read spec file {path}: {getattr(err, 'strerror', None) or err}") from None
    if len(data) > limit:
        raise SurgeonError(f"spec file {path} is larger than {limit} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = data[err.start]
        raise SurgeonError(f"spec file {path} is not UTF-8: byte 0x{byte:02x} at offset {err.start}") from None
    # universal newlines, as Path.read_text() gave before: "\r\n" and a lone "\r" end a line
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def read_spec_text(spec: str | Path) -> tuple[str, str]:
    """(text, source name) for a spec given as a path to a .peft file or as the text itself."""
    looks_like_path = "\n" not in str(spec) and (str(spec).endswith(".peft") or _is_file(str(spec)))
    if isinstance(spec, Path) or looks_like_path:
        path = Path(spec)
        return _read_spec_file(path), str(path)
    return str(spec), "<spec>"


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    """Parse spec text into the AST, or raise SpecError pointing at the offending place."""
    if len(text) > MAX_SPEC_LENGTH:
        raise SpecError(f"the spec is {len(text)} characters long; at most {MAX_SPEC_LENGTH:,} are allowed",
                        source=source, text="", location=None)
    try:
        tree = _parser().parse(text + "\n")
    except UnexpectedInput as err:
        raise _syntax_error(err, text, source) from None
    _check_lists(tree, text, source)
    try:
        tree = _ToAst(text, source).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc from None
        raise
    statements = tuple(_statement(child) for child in tree.children if isinstance(child, Tree))
    if not statements:
        raise SpecError("the spec has no statements", source=source, text=text, location=None)
    return Spec(source=source, text=text, statements=statements)
