"""Stage 1: .peft text -> Spec (the AST). Only syntax is checked here; meaning is the planner's."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput

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


@v_args(inline=True)
class _ToAst(Transformer):
    def number(self, token: Token) -> int | float:
        text = str(token)
        return int(text) if text.lstrip("+-").isdigit() else float(text)

    def string(self, token: Token) -> str:
        return str(token)[1:-1].encode().decode("unicode_escape")

    def word(self, token: Token) -> bool | str:
        return {"true": True, "false": False}.get(str(token), str(token))

    def list(self, *items: object) -> list:
        return list(items)

    def choice(self, *words: Token) -> list[str]:
        return [str(w) for w in words]

    def param(self, key: Token, value: object) -> Param:
        return Param(key=str(key), value=value, location=_loc(key))

    def clause(self, prep: Token, pattern: Token) -> Clause:
        end = Location(line=pattern.line, column=prep.column, end_column=pattern.end_column)
        return Clause(preposition=str(prep), pattern=str(pattern), location=end)

    def name(self, word: Token) -> str:
        return str(word)


def _statement(tree: Tree) -> Statement:
    words = [Word(text=str(t), location=_loc(t)) for t in tree.children if isinstance(t, Token)]
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
        bad = text.splitlines()[err.line - 1][err.column - 1]
        message = f"unexpected character {bad!r}"
    elif isinstance(err, UnexpectedEOF):
        message = "the spec ends in the middle of a statement"
        lines = text.splitlines() or [""]
        location = Location(line=len(lines), column=len(lines[-1]) + 1)
    else:
        token: Token = err.token  # type: ignore[attr-defined]
        shown = "end of line" if token.type == "_SEP" else f"'{token}'"
        message = f"unexpected {shown}"
        if token.type not in ("_SEP", "$END") and location is not None:
            location = Location(line=err.line, column=err.column, end_column=token.end_column)
        if token.type == "$END":
            lines = text.splitlines() or [""]
            location = Location(line=len(lines), column=len(lines[-1]) + 1)
    names = getattr(err, "accepts", None) or err.expected or ()
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


def read_spec_text(spec: str | Path) -> tuple[str, str]:
    """(text, source name) for a spec given as a path to a .peft file or as the text itself."""
    looks_like_path = "\n" not in str(spec) and (str(spec).endswith(".peft") or _is_file(str(spec)))
    if isinstance(spec, Path) or looks_like_path:
        path = Path(spec)
        if not path.is_file():
            raise SurgeonError(f"spec file not found: {path}")
        return path.read_text(), str(path)
    return str(spec), "<spec>"


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    """Parse spec text into the AST, or raise SpecError pointing at the offending place."""
    try:
        tree = _parser().parse(text + "\n")
    except UnexpectedInput as err:
        raise _syntax_error(err, text, source) from None
    tree = _ToAst().transform(tree)
    statements = tuple(_statement(child) for child in tree.children if isinstance(child, Tree))
    if not statements:
        raise SpecError("the spec has no statements", source=source, text=text, location=None)
    return Spec(source=source, text=text, statements=statements)
