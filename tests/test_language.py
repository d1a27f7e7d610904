"""The spec language: what parses into what, and how syntax errors point at the text."""

import functools
import time

import pytest

from surgeon.errors import SpecError, SurgeonError
from surgeon.language import parse_spec, read_spec_text
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


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        # a run of two or more stars means `**`
        ("***", "a.b", True),
        ("***", "", True),
        ("a.***", "a", True),
        ("***.up", "up", True),
        ("a.*****.up", "a.b.c.up", True),
        # a range reads a whole number: no digit right before or after it
        ("layers.[1]**", "layers.1.mlp", True),
        ("layers.[1]**", "layers.11.mlp", False),
        ("h[0-3]", "h3", True),
        ("h[0-3]", "h13", False),
        ("*[1]", "a21", False),
        ("[007]", "layers.7", True),
        ("layers.[0-11].q", "layers.0011.q", True),
        ("<[0-1],[5]>.q", "layers.5.q", True),
        ("[3-4]", "layers.0", False),
        ("a-b_c", "x.a-b_c", True),
        # empty segments, and digits as the regex's `\d` read them (any Unicode decimal digit)
        ("a", ".a", True),
        ("*.a", ".a", False),
        ("**.a", "..a", True),
        ("layers.[3].q", "layers.٣.q", True),
        ("layers.[3].q", "layers.٣٣.q", False),
    ],
)
def test_pattern_matching_edges(pattern, path, expected):
    assert compile_pattern(pattern).matches(path) is expected


@pytest.mark.parametrize(
    ("pattern", "offset", "words"),
    [
        ("<" * 33 + "a" + ">" * 33, 32, "nested more than 32"),
        ("<" * 2000 + "a", 32, "nested more than 32"),
        ("a" * 100_001, 100_000, "at most 100000"),
        ("x.[0-1234567890123456789]", 2, "too large"),
        ("x.[²]", 2, "bad index range"),
        ("x.[٣]", 2, "bad index range"),
        ("", 0, "empty pattern"),
    ],
)
def test_pattern_limits(pattern, offset, words):
    with pytest.raises(PatternError, match=words) as info:
        compile_pattern(pattern)
    assert info.value.offset == offset


def test_patterns_nest_32_deep():
    assert compile_pattern("<" * 32 + "q" + ">" * 32).matches("attn.q")


@functools.lru_cache(maxsize=1)
def _tiny_llama_candidates() -> list[str]:
    from conftest import tiny_llama

    from surgeon.graph import build_module_graph

    return [name for name, _, _ in build_module_graph(tiny_llama()).candidates()]


@pytest.mark.parametrize("stars", [16, 10_000])
def test_many_stars_are_fast(stars):
    names = _tiny_llama_candidates()
    begin = time.perf_counter()
    pattern = compile_pattern("*" * stars + "zzz")
    assert not any(pattern.matches(name) for name in names)
    assert time.perf_counter() - begin < 1.0  # the regex this replaced took 13 s for 16 stars
    assert pattern.nfa_size < 20  # the star run is one `**`


def _steps(pattern: str, path: str) -> tuple[int, int]:
    """(NFA steps to match `path` once, NFA size) for a freshly compiled pattern."""
    compiled = compile_pattern(pattern)
    before = compiled.automaton.steps
    compiled.matches(path)
    return compiled.automaton.steps - before, compiled.nfa_size


@pytest.mark.parametrize(
    ("unit", "path_unit"),
    [
        ("*a", "a"),  # (*a)^n against aaa...ab: exponential for a backtracking regex
        ("<a,a,a,a>", "a"),  # alternation blow-up
        ("<a,<a,a.a>>*", "a."),
        ("**.", "x."),
        ("[0-9]*", "1a"),
        ("<[0-99999],x>", "12345"),
    ],
)
def test_matching_is_linear(unit, path_unit):
    """Steps grow as pattern length x path length, and a long adversarial case stays fast."""
    for n, m in [(10, 10), (40, 10), (10, 40), (40, 40)]:
        steps, size = _steps(unit * n, path_unit * m + "b")
        assert steps <= 4 * size * (len(path_unit) * m + 2), (unit, n, m, steps, size)
    begin = time.perf_counter()
    steps, size = _steps(unit * 80, path_unit * 60 + "b")
    assert time.perf_counter() - begin < 1.0


@pytest.mark.parametrize(
    "pattern",
    [
        "**." * 255 + "zzz",  # every `**.` can be skipped: all of them are alive at every step
        "<**.,a>" * 127 + "zzz",
        "*a" * 256,
        "<" + ",".join(["a"] * 30_000) + ">" + ".zzz",  # one trie: 30,000 equal options are one state
        "<" + ",".join(f"n{i}" for i in range(14_000)) + ">",
        "a" * 99_999 + "*",
    ],
)
def test_adversarial_patterns_within_the_limits_are_fast(pattern):
    names = _tiny_llama_candidates()
    begin = time.perf_counter()
    compiled = compile_pattern(pattern)
    assert not any(compiled.matches(name) for name in names)
    assert time.perf_counter() - begin < 2.0


def test_operator_limit():
    assert compile_pattern("*a" * 256)
    with pytest.raises(PatternError, match="more than 256 operators") as info:
        compile_pattern("**." * 30_000 + "q")
    assert info.value.offset == 3 * 256
    with pytest.raises(PatternError, match="more than 256 operators"):
        compile_pattern("<" + ",".join(["*"] * 300) + ">")


def test_a_choice_of_full_paths_matches_exactly_those():
    """What `surgeon import` writes for a PEFT adapter: every full path, as one trie."""
    names = _tiny_llama_candidates()
    chosen = [name for name in names if name.endswith(("q_proj", "v_proj", "mlp"))]
    pattern = compile_pattern("<" + ",".join(chosen) + ">")
    assert [name for name in names if pattern.matches(name)] == [
        name for name in names if any(name == c or name.endswith("." + c) for c in chosen)]
    assert compile_pattern("<a,ab,abc.d,x*>").matches("z.abc.d") and compile_pattern("<a,ab,x*>").matches("ab")
    assert not compile_pattern("<ab,abc>").matches("abcd")


def test_patterns_compare_by_text():
    assert compile_pattern("*.q") == compile_pattern("*.q")
    assert repr(compile_pattern("*.q")) == "Pattern(text='*.q')"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('"héllo 文"', "héllo 文"),
        ("'it''s'", None),
        (r'"a\"b\'c\\d"', "a\"b'c\\d"),
        (r'"\n\t\r"', "\n\t\r"),
        (r'"\x41\u00e9\U0001F600"', "Aé😀"),
        (r'"\\x41"', "\\x41"),
        ('"tab\there"', "tab\there"),
        ("1e15", 1e15),
        ("-1000000000000000", -1_000_000_000_000_000),
        ("0.000", 0.0),
        ("+7", 7),
        ("1e-30", 1e-30),
    ],
)
def test_values(text, value):
    if value is None:
        with pytest.raises(SpecError):
            parse_spec(f"inject lora init={text} into q", "v.peft")
        return
    spec = parse_spec(f"inject lora init={text} into q  # cömment 文", "v.peft")
    assert spec.statements[0].params[0].value == value


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ('x init="\\x4"', 9, "bad escape '\\\\x4'"),
        ('x init="ab\\q"', 11, "bad escape"),
        ('x init="\\ud800"', 9, "bad escape"),
        ('x init="\\U00110000"', 9, "bad escape"),
        ('x init="\\x_1"', 9, "bad escape"),
        ("x r=1e400", 5, "too large"),
        ("x r=-1e300", 5, "too large"),
        ("x r=1000000000000001", 5, "too large"),
        ("x r=" + "1" * 5000, 5, "more than 30 digits"),
        ("x r=1e-400", 5, "rounds to 0"),
        ("x r=[[1]]", 6, "cannot hold a list"),
        ("x r=[1, [2, [3]]]", 9, "cannot hold a list"),
        ("x r=[<a,b>]", 6, "cannot hold a choice"),
        ("x r=" + "[" * 3000 + "1" + "]" * 3000, 6, "cannot hold a list"),
        ("x y\x0cz", 4, "unexpected character '\\x0c'"),
        ("x y\x0bz", 4, "unexpected character '\\x0b'"),
        ("x y\x1cz", 4, "unexpected character '\\x1c'"),
        ("x y\x85z", 4, "unexpected character '\\x85'"),
        ("x y\u2028z", 4, "unexpected character '\\u2028'"),
        ("x y\rz", 4, "unexpected character '\\r'"),
        ("x r==3", 5, "unexpected '='"),
    ],
)
def test_bad_values_point_at_the_text(text, column, words):
    source = "# line one\x0c with a form feed\u2028 and a line separator\n" + text
    with pytest.raises(SpecError) as info:
        parse_spec(source, "bad.peft")
    error = info.value
    assert error.location is not None and (error.location.line, error.location.column) == (2, column)
    assert words in error.message
    rendered = error.render().split("\n")
    assert rendered[1] == "  " + text  # the caret's line is the line Lark counted
    assert rendered[2].index("^") - 2 == column - 1


def test_spec_length_limit():
    with pytest.raises(SpecError, match="at most 131,072 are allowed"):
        parse_spec("x\n" * (1 << 16) + "x", "big.peft")


def test_spec_files_are_utf8(tmp_path):
    good = tmp_path / "good.peft"
    good.write_bytes('\ufeffinject lora init="héllo 文" into q\r\n# cömment\r\n'.encode())
    text, source = read_spec_text(good)
    assert parse_spec(text, source).statements[0].params[0].value == "héllo 文"
    bad = tmp_path / "bad.peft"
    bad.write_bytes(b'inject lora init="\xff\xfe" into q\n')
    with pytest.raises(SurgeonError, match=r"is not UTF-8: byte 0xff at offset 18"):
        read_spec_text(bad)
    with pytest.raises(SurgeonError, match="is a directory"):
        read_spec_text(tmp_path)
    with pytest.raises(SurgeonError, match="not found"):
        read_spec_text(tmp_path / "missing.peft")
