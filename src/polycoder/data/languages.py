"""The language table: which file is code of which PolyCoder language, and its Pygments token count.

PolyCoder kept the files of 12 languages recognised by the file-name patterns of Pygments'
lexers (Xu et al. 2022, Code-LMs `Data/`). The table below is built the same way, from
`pygments.lexers._mapping.LEXERS` (the lexers' `filenames` lists, read without importing
each lexer), so it follows the installed Pygments. `register_language` extends it.

`pygments_token_count` is the denominator of the paper's normalised perplexity and the
collector's "under 100 tokens" filter. What exactly is counted: every `(type, value)` pair
that `lexer.get_tokens(text)` yields, whitespace tokens (`Text`, `Text.Whitespace`)
included, with the lexer built with `stripnl=False, stripall=False, ensurenl=False` so the
text is lexed as it is stored (Pygments' defaults would drop leading/trailing newlines and
add one at the end). Pygments itself still reads CR LF and lone CR as LF before lexing.
Adjacent tokens of the same type are *not* merged (merging is a formatter's job).

Limits: a file name decides the language (no content sniffing), as in the original.
`.h` is C by Pygments' lists (its C lexer claims it; the C++ lexer does not), which would
make many C++ projects "C" by majority and drop their .cpp files; `language_candidates`
marks it ambiguous, and the collector counts only unambiguous files for a repository's
majority and gives `.h` files the repository's language when it is C++.
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass, field
from functools import cache, lru_cache

from polycoder.errors import PolycoderError


@dataclass(frozen=True)
class Language:
    """One language of the table."""

    name: str
    """The name used everywhere (statistics, index.tsv, evaluation), e.g. "C++"."""
    lexer: str
    """A Pygments lexer alias, e.g. "cpp"."""
    patterns: tuple[str, ...] = field(default=())
    """File-name globs (`*.cpp`, `Rakefile`), matched case-sensitively against the base name."""

    def __post_init__(self) -> None:
        if not self.name or "__" in self.name or "\t" in self.name:
            raise PolycoderError(f"language name {self.name!r} must be non-empty and free of '__' and tabs (index.tsv uses them)")


# name -> Pygments lexer alias, in the paper's order
MAX_FILE_BYTES = 1 << 20
"""Source files larger than this are left out everywhere (PolyCoder dropped files over 1 MB)."""

POLYCODER_LANGUAGES: dict[str, str] = {
    "C": "c",
    "C#": "csharp",
    "C++": "cpp",
    "Go": "go",
    "Java": "java",
    "JavaScript": "javascript",
    "PHP": "php",
    "Python": "python",
    "Ruby": "ruby",
    "Rust": "rust",
    "Scala": "scala",
    "TypeScript": "typescript",
}

_TABLE: dict[str, Language] = {}


def _pygments_patterns(alias: str) -> tuple[str, ...]:
    try:  # deferred: Pygments' lexer table loads slowly and only token counting needs it
        from pygments.lexers._mapping import LEXERS
    except ImportError as e:  # pragma: no cover - pygments is a dependency of the data extra
        raise PolycoderError("the data pipeline needs Pygments: pip install 'polycoder[data]'") from e
    for _module, _name, aliases, filenames, _mimes in LEXERS.values():
        if alias in aliases:
            return tuple(filenames)
    raise PolycoderError(f"Pygments has no lexer with alias {alias!r}; see `pygmentize -L lexers`")


def register_language(name: str, lexer: str, patterns: tuple[str, ...] | list[str] | None = None) -> Language:
    """Add (or replace) a language; `patterns` default to the Pygments lexer's file names."""
    lang = Language(name, lexer, tuple(patterns) if patterns else _pygments_patterns(lexer))
    _TABLE[name] = lang
    _matcher.cache_clear()
    return lang


def languages() -> dict[str, Language]:
    """The current table, name -> Language (the 12 PolyCoder languages plus any registered)."""
    if not _TABLE:
        for name, alias in POLYCODER_LANGUAGES.items():
            _TABLE[name] = Language(name, alias, _pygments_patterns(alias))
    return _TABLE


@lru_cache(maxsize=1)
def _matcher() -> tuple[dict[str, str], dict[str, str], list[tuple[str, str]]]:
    """(exact names, suffixes like ".rs.in" or ".cpp", other globs) -> language; first language wins."""
    exact: dict[str, str] = {}
    suffix: dict[str, str] = {}
    globs: list[tuple[str, str]] = []
    for lang in languages().values():
        for pat in lang.patterns:
            if not any(c in pat for c in "*?["):
                exact.setdefault(pat, lang.name)
            elif pat.startswith("*.") and not any(c in pat[1:] for c in "*?["):
                suffix.setdefault(pat[1:], lang.name)
            else:
                globs.append((pat, lang.name))
    return exact, suffix, globs


def language_of(path: str) -> str | None:
    """The language of a file by its name (Pygments' patterns), or None."""
    exact, suffix, globs = _matcher()
    base = posixpath.basename(path.replace("\\", "/"))
    if base in exact:
        return exact[base]
    parts = base.split(".")
    # ".rs.in" before ".in": the longer suffix is the more specific one
    for k in range(max(1, len(parts) - 2), len(parts)):
        if k == 0:
            continue
        s = "." + ".".join(parts[k:])
        if s in suffix:
            return suffix[s]
    for pat, name in globs:
        if fnmatch.fnmatchcase(base, pat):
            return name
    return None


# suffix -> the languages it may belong to; the first is what language_of() says
AMBIGUOUS_SUFFIXES: dict[str, tuple[str, ...]] = {".h": ("C", "C++")}


def language_candidates(path: str) -> tuple[str, ...]:
    """The languages a file may be: one for most names, several for ambiguous ones (`.h`), none if unknown."""
    lang = language_of(path)
    if lang is None:
        return ()
    for suffix, langs in AMBIGUOUS_SUFFIXES.items():
        if path.endswith(suffix) and langs[0] == lang:
            return tuple(x for x in langs if x in languages())
    return (lang,)


@cache
def _lexer(language: str):
    # Deferred: Pygments' lexer table loads slowly and only token counting needs it
    from pygments.lexers import get_lexer_by_name

    lang = languages().get(language)
    if lang is None:
        raise PolycoderError(f"unknown language {language!r}; known: {', '.join(languages())}")
    return get_lexer_by_name(lang.lexer, stripnl=False, stripall=False, ensurenl=False)


def pygments_token_count(text: str, language: str, limit: int | None = None) -> int:
    """Number of tokens Pygments' lexer for `language` yields for `text`, whitespace included.

    With `limit`, stop counting at `limit` (enough to decide "at least N tokens" without
    lexing a whole file: the collector's filter uses it). See the module docstring for
    exactly what is counted.
    """
    n = 0
    for _ in _lexer(language).get_tokens(text):
        n += 1
        if limit is not None and n >= limit:
            break
    return n
