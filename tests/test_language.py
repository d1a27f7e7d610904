"""The spec language: what parses into what, and how syntax errors point at the text."""

import pytest

from surgeon.errors import SpecError
from surgeon.language import parse_spec
from surgeon.patterns import PatternError, compile_pattern


def test_statements_params_and_clauses():
    spec = parse_spec(
        "# a comment\n"
        "inject lora r=8 alpha=16.5 dropout=0.05 init=kaiming rslora=true into *.attn.<q,v> except layers.[0-3].** as qv\n"
        "quantize base nf4 double; train bias in *.attn.* only=<q,k> names=[1, 'x', false]\n",
        "s.peft",
    )
    assert [s.verb.text for s in spec.statements] == ["inject", "quantize", "train"]
    lora = spec.statements[0]
    assert [w.text for w in lora.words] == ["lora"]
    assert {p.key: p.value for p in lora.params} == {
        "r": 8, "alpha": 16.5, "dropout": 0.05, "init": "kaiming", "rslora": True}
    assert [(c.preposition, c.pattern) for c in lora.clauses] == [("into", "*.attn.<q,v>"), ("except", "layers.[0-3].**")]
    assert lora.name == "qv"
    assert lora.location.line == 2 and lora.location.column == 1
    assert [w.text for w in spec.statements[1].words] == ["base", "nf4", "double"]
    train = spec.statements[2]
    assert {p.key: p.value for p in train.params} == {"only": ["q", "k"], "names": [1, "x", False]}
    assert train.clauses[0].preposition == "in"


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ("inject lora r=8 into", 1, 21, "expected a module pattern"),
        ("inject lora r=8 into x y", 1, 24, "unexpected 'y'"),
        ("inject lora r=8 @ x", 1, 17, "unexpected '@'"),
        ("\n\ninject lora into *.q as", 3, 24, "expected a word"),
        ("inject lora r=[1, 2 into x", 1, 21, "unexpected 'into'"),
    ],
)
def test_syntax_errors_point_at_the_text(text, line, column, words):
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.peft")
    message = str(info.value)
    assert message.startswith(f"bad.peft:{line}:{column}: error:")
    assert words in message
    source_line, caret_line = message.splitlines()[1:3]
    assert source_line.strip() == text.splitlines()[line - 1].strip()
    assert caret_line.index("^") - 2 == column - 1  # two spaces of indent, 1-based column


def test_empty_spec_is_an_error():
    with pytest.raises(SpecError, match="no statements"):
        parse_spec("# only a comment\n\n", "empty.peft")


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.attn.q", "layers.3.attn.q", True),
        ("attn.q", "layers.3.attn.q", True),
        ("*.attn.q", "attn.q", False),
        ("*.attn.<q,v>", "layers.3.attn.v", True),
        ("*.attn.<q,v>", "layers.3.attn.k", False),
        ("layers.[0-3].attn.q", "layers.3.attn.q", True),
        ("layers.[0-3].attn.q", "layers.4.attn.q", False),
        ("layers.[0-1,10].attn.q", "layers.10.attn.q", True),
        ("layers.[0-1,10].attn.q", "layers.2.attn.q", False),
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
        ("model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj", False),
        ("layers.**", "layers.0.mlp.up", True),
        ("**.up", "up", True),
        ("a.**.up", "a.b.c.up", True),
        ("q_proj", "model.layers.0.self_attn.q_proj", True),
        ("q", "model.layers.0.self_attn.q_proj", False),
        ("**.<attn.<q,k>,mlp.up>", "layers.1.mlp.up", True),
        ("**.<attn.<q,k>,mlp.up>", "layers.1.attn.k", True),
        ("**.<attn.<q,k>,mlp.up>", "layers.1.attn.v", False),
    ],
)
def test_pattern_matching(pattern, path, expected):
    assert compile_pattern(pattern).matches(path) is expected


@pytest.mark.parametrize(("pattern", "offset"), [("a.<q,v", 2), ("layers.[0-x].q", 7), ("a.[5-1]", 2), ("a.<,q>", 3), ("a$b", 1)])
def test_bad_patterns(pattern, offset):
    with pytest.raises(PatternError) as info:
        compile_pattern(pattern)
    assert info.value.offset == offset
