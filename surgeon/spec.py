"""The AST of a .peft spec: frozen pydantic models, produced by `surgeon.language.parse_spec`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from surgeon.errors import Location

Scalar = bool | int | float | str
ParamValue = Scalar | list[Scalar]


class Node(BaseModel):
    model_config = ConfigDict(frozen=True)
    location: Location


class Word(Node):
    text: str
    quoted: bool = False  # written as a quoted string: `text` is its unescaped content


class Param(Node):
    key: str
    value: ParamValue


class Clause(Node):
    """`into PATTERN`, `after PATTERN`, `except PATTERN`, ...: a preposition and a module pattern."""

    preposition: str
    pattern: str


class Statement(Node):
    verb: Word
    words: tuple[Word, ...]
    params: tuple[Param, ...]
    clauses: tuple[Clause, ...]
    name: str | None = None

    def clauses_for(self, preposition: str) -> tuple[Clause, ...]:
        return tuple(c for c in self.clauses if c.preposition == preposition)


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True)
    source: str
    text: str
    statements: tuple[Statement, ...]
