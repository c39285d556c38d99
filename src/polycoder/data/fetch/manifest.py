"""The pinned corpus manifest: `Source`, `Manifest`, `load_manifest` and their validation.

`corpus_manifest.json` (beside this module, shipped with the package) names every source
of the corpus -- a Debian binary package (`deb`), a Debian source package (`deb-src`), an
npm tarball (`npm`) or a PyPI wheel/sdist (`pypi`) -- with its exact version, language,
split (train / heldout), licence and the sub-paths to keep and to drop. docs/CORPUS.md
describes every field and the pitfalls the entries work around.

A source's `key()` hashes the fields that decide its files: a re-run re-extracts exactly
the sources whose entry changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from polycoder.data.languages import POLYCODER_LANGUAGES

LANGUAGES = tuple(POLYCODER_LANGUAGES)
KINDS = ("deb", "deb-src", "npm", "pypi")
SPLITS = ("train", "heldout")
# Default leading path components stripped from an archive's member names, by kind:
# npm tarballs wrap everything in package/, source tarballs in NAME-VERSION/.
DEFAULT_STRIP = {"deb": 0, "deb-src": 1, "npm": 1, "pypi": 0}
# Part of every source's key (and of the lock file, as "script_version"): bump to re-extract all.
SCRIPT_VERSION = 1
DEFAULT_MANIFEST = Path(__file__).resolve().with_name("corpus_manifest.json")


@dataclasses.dataclass(frozen=True)
class Source:
    """One source = one "repository" folder of the corpus."""

    name: str
    """Folder name under OUT/raw/{split}/{language}/; unique in the manifest."""
    kind: str
    """deb | deb-src | npm | pypi."""
    packages: tuple[tuple[str, str], ...]
    """(package name, exact version) pairs; several only for deb sources that one upstream
    repository ships as many packages (symfony's components)."""
    language: str
    """One of LANGUAGES."""
    split: str
    """train | heldout."""
    licence: str
    """SPDX-like licence of the upstream code (as Debian's copyright file / the registry states)."""
    keep: tuple[str, ...] = ("*",)
    """fnmatch patterns (`*` crosses `/`) on the path below `base`; a file is kept if one matches."""
    drop: tuple[str, ...] = ()
    """fnmatch patterns of paths to drop, on top of the manifest's default drops."""
    base: str = ""
    """Path prefix (after `strip`) that files must lie under; removed from the written path."""
    inner: str = ""
    """fnmatch pattern of archives inside the downloaded one (a tarball in /usr/src, a
    src.zip) to read instead of the outer archive's own files."""
    strip: int = -1
    """Leading path components to drop from member names (-1: the kind's default; for
    `inner` archives the default is 1)."""
    exts: tuple[str, ...] = ()
    """Extensions to keep (default: the language's list in the manifest)."""
    sdist: bool = False
    """pypi: fetch the sdist instead of a wheel (pythonnet's C# is only in its sdist)."""
    fallback_for: str = ""
    """Fetched only when the named source failed (libruby3.1 stands in for ruby3.1's
    source tarball, which is the same code)."""
    note: str = ""
    """Why the keeps/drops are what they are."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"bad source name {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} not in {KINDS}")
        if self.language not in LANGUAGES:
            raise ValueError(f"{self.name}: language {self.language!r} not in {LANGUAGES}")
        if self.split not in SPLITS:
            raise ValueError(f"{self.name}: split {self.split!r} not in {SPLITS}")
        if not self.packages or any(not n or not v for n, v in self.packages):
            raise ValueError(f"{self.name}: needs (name, version) packages with exact versions")
        if self.kind != "deb" and len(self.packages) != 1:
            raise ValueError(f"{self.name}: only deb sources may list several packages")
        for _, v in self.packages:
            if any(c in v for c in "<>=^~*") and self.kind in ("npm", "pypi"):
                raise ValueError(f"{self.name}: version {v!r} is a range; pin an exact version")
        if not self.licence:
            raise ValueError(f"{self.name}: licence missing")
        if self.sdist and self.kind != "pypi":
            raise ValueError(f"{self.name}: sdist applies to pypi sources only")
        if not self.keep:
            raise ValueError(f"{self.name}: keep is empty")

    @property
    def effective_strip(self) -> int:
        if self.strip >= 0:
            return self.strip
        return 1 if self.inner else DEFAULT_STRIP[self.kind]

    def key(self) -> str:
        """Hash of everything that decides this source's files (for resuming)."""
        # Only fields that differ from their defaults: adding an optional field to the
        # manifest format must not invalidate every extracted source.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "note" and getattr(self, f.name) != f.default}
        blob = json.dumps([fields, SCRIPT_VERSION], sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The pinned list of sources plus the per-language extensions and default drops."""

    extensions: dict[str, tuple[str, ...]]
    """Language -> file extensions kept (lower-case, with the dot)."""
    default_drop: tuple[str, ...]
    """fnmatch patterns dropped from every source (vendored copies, bundles, minified)."""
    sources: tuple[Source, ...]
    """Every source, in manifest order."""

    def __post_init__(self) -> None:
        missing = set(LANGUAGES) - set(self.extensions)
        if missing:
            raise ValueError(f"extensions missing for {sorted(missing)}")
        names = [s.name for s in self.sources]
        for s in self.sources:
            if s.fallback_for and s.fallback_for not in names:
                raise ValueError(f"{s.name}: fallback_for names unknown source {s.fallback_for!r}")
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate source names {sorted(dupes)}")
        seen: dict[tuple[str, str], str] = {}
        for s in self.sources:
            for pkg in s.packages:
                k = (s.kind, pkg[0])
                if k in seen:
                    raise ValueError(f"package {pkg[0]} in both {seen[k]} and {s.name}")
                seen[k] = s.name


def load_manifest(path: Path) -> Manifest:
    """Read and validate the manifest JSON (raises ValueError naming the bad entry)."""
    raw = json.loads(Path(path).read_text())
    sources = []
    for entry in raw["sources"]:
        entry = dict(entry)
        entry["packages"] = tuple(tuple(p) for p in entry["packages"])
        for f in ("keep", "drop", "exts"):
            if f in entry:
                entry[f] = tuple(entry[f])
        sources.append(Source(**entry))
    return Manifest(
        extensions={k: tuple(v) for k, v in raw["extensions"].items()},
        default_drop=tuple(raw["default_drop"]),
        sources=tuple(sources),
    )
