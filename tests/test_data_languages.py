"""The language table (from Pygments' lexers) and the Pygments token count."""

from __future__ import annotations

import pytest
from pygments.lexers import get_lexer_by_name
from pygments.token import Text

from polycoder.data.languages import POLYCODER_LANGUAGES, language_of, languages, pygments_token_count, register_language
from polycoder.errors import PolycoderError


def test_the_twelve_languages():
    assert list(POLYCODER_LANGUAGES) == ["C", "C#", "C++", "Go", "Java", "JavaScript", "PHP", "Python", "Ruby",
                                         "Rust", "Scala", "TypeScript"]
    assert set(POLYCODER_LANGUAGES) <= set(languages())


@pytest.mark.parametrize("path,lang", [
    ("a/b.c", "C"), ("x.h", "C"), ("x.cs", "C#"), ("x.cpp", "C++"), ("x.hpp", "C++"), ("x.cc", "C++"), ("X.H", "C++"),
    ("m.go", "Go"), ("A.java", "Java"), ("a.js", "JavaScript"), ("a.mjs", "JavaScript"), ("i.php", "PHP"),
    ("i.php5", "PHP"), ("s.py", "Python"), ("s.pyi", "Python"), ("Rakefile", "Ruby"), ("g.gemspec", "Ruby"),
    ("lib.rs", "Rust"), ("lib.rs.in", "Rust"), ("A.scala", "Scala"), ("a.ts", "TypeScript"), ("a.d.ts", "TypeScript"),
    ("README.md", None), ("Makefile", None), ("a.json", None), ("noext", None), ("dir.py/file", None),
])
def test_language_of(path, lang):
    assert language_of(path) == lang


def test_patterns_come_from_pygments():
    cpp = get_lexer_by_name("cpp")
    assert set(languages()["C++"].patterns) == set(cpp.filenames)


def test_register_language():
    try:
        register_language("Kotlin", "kotlin")
        assert language_of("Main.kt") == "Kotlin"
    finally:
        languages().pop("Kotlin")
        from polycoder.data.languages import _matcher

        _matcher.cache_clear()
    assert language_of("Main.kt") is None
    with pytest.raises(PolycoderError):
        register_language("Bad__Name", "kotlin")


SNIPPET = "#include <stdio.h>\n\nint main(void) {\n    printf(\"hi\\n\");\t// tab\n    return 0;\n}\n\n"


def test_token_count_counts_every_token_whitespace_included():
    lexer = get_lexer_by_name("c", stripnl=False, stripall=False, ensurenl=False)
    tokens = list(lexer.get_tokens(SNIPPET))
    assert pygments_token_count(SNIPPET, "C") == len(tokens)
    assert any(t in Text for t, v in tokens if v.isspace())  # whitespace tokens are among those counted
    # leading/trailing newlines are lexed as stored (Pygments' defaults would strip them)
    assert pygments_token_count("\n\n" + SNIPPET, "C") > pygments_token_count(SNIPPET, "C")
    assert pygments_token_count(SNIPPET, "C", limit=5) == 5


def test_unknown_language_is_an_error():
    with pytest.raises(PolycoderError, match="unknown language"):
        pygments_token_count("x", "Cobol")
