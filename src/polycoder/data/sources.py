"""Sources of code: local folders, archives and git repositories, cut into units of work.

A *source* is what the user names on the command line: a folder (one repository, or a
folder of repositories), an archive (`.tar`, `.tar.gz`/`.tgz`, `.tar.bz2`, `.tar.xz`,
`.zip`, `.whl`, `.jar`: one repository each) or a git URL (cloned with `git clone --depth 1`;
an unreachable one is reported and skipped). A *repository* is the unit of the
majority-language rule and of the train/test split. Which folders are repositories:
`repo_depth=0` means the source itself, 1 its sub-folders (and archives), 2 their
sub-folders, and so on; by default (`None`) a folder with a `.git` entry or any file at its
top is one repository, otherwise each sub-folder or archive in it is one.

Symlinks are never followed out of a repository: a symlinked file is read only when its
target lies inside the repository's folder; symlinked folders are never entered (so a
symlink loop cannot hang a walk); symlinks and hard links inside archives are skipped.
Files whose names match no language are never opened.

Limits: archives inside a repository folder are not unpacked (an archive is a source or a
repository of a folder of repositories, not a file); folders named in `skip_dirs`
(vendored copies such as node_modules/ and vendor/, VCS folders) are not walked.
"""

from __future__ import annotations

import heapq
import os
import re
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from polycoder.corpus import escape_name
from polycoder.data.languages import language_of
from polycoder.errors import PolycoderError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip", ".whl", ".jar")
DEFAULT_SKIP_DIRS = (".git", ".hg", ".svn", "node_modules", "vendor", "third_party", "__pycache__", ".tox", ".venv")
_GIT_URL = re.compile(r"^(https?://|git://|ssh://|git@|file://)")
_LICENCE_NAMES = re.compile(r"^(LICEN[CS]E|COPYING|COPYRIGHT)([.-].*)?$", re.I)


def is_archive(path: str | Path) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


def archive_stem(name: str) -> str:
    low = name.lower()
    for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if low.endswith(s):
            return name[: -len(s)]
    return name


@dataclass
class Unit:
    """One unit of work: a repository, or a chunk of a large folder repository's files."""

    repo: str
    """"org/project"."""
    source: str
    """The source argument it came from."""
    kind: str
    """"folder" or "archive"."""
    root: str
    """The repository folder, or the archive file."""
    files: list[str] | None = None
    """For folders: the relative paths (language files only) of this chunk."""
    size: int = 0
    """Bytes (estimated) of this unit, to balance tasks."""

    def __post_init__(self) -> None:
        if self.kind not in ("folder", "archive"):
            raise ValueError(f"unit kind must be folder or archive, got {self.kind!r}")


def clone(url: str, cache: Path) -> Path:
    """`git clone --depth 1 url` into `cache` (reused when already there)."""
    m = re.search(r"([^/:]+)/([^/]+?)(\.git)?/?$", url)
    name = f"{m.group(1)}__{m.group(2)}" if m else re.sub(r"\W+", "_", url)
    dest = cache / name / (m.group(2) if m else "repo")
    if (dest / ".git").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["git", "clone", "--quiet", "--depth", "1", url, str(dest)],
                           capture_output=True, text=True, timeout=3600)
    except FileNotFoundError:
        raise PolycoderError(f"cannot clone {url}: git is not installed; clone it yourself and pass the folder") from None
    if r.returncode != 0:
        raise PolycoderError(f"git clone {url} failed: {r.stderr.strip()[:300]}")
    return dest


def _repo_name(folder: Path) -> str:
    folder = Path(os.path.abspath(folder))
    return f"{folder.parent.name or 'local'}/{folder.name}"


def _walk(root: Path, skip_dirs: tuple[str, ...]) -> Iterator[tuple[str, int]]:
    """(relative path, size) of the language files under root; folder symlinks never entered."""
    skip = set(skip_dirs)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        rel_dir = os.path.relpath(dirpath, root)
        for fn in sorted(filenames):
            if language_of(fn) is None:
                continue
            rel = fn if rel_dir == "." else f"{rel_dir}/{fn}".replace(os.sep, "/")
            try:
                size = os.lstat(os.path.join(dirpath, fn)).st_size
            except OSError:
                size = 0
            yield rel, size


def _repositories(folder: Path, depth: int | None) -> list[Path]:
    if depth is None:
        entries = list(folder.iterdir())
        if (folder / ".git").exists() or any(e.is_file() and not e.is_symlink() and not is_archive(e) for e in entries):
            depth = 0
        else:
            depth = 1
    level = [folder]
    for _ in range(depth):
        nxt = []
        for f in level:
            if f.is_dir() and not f.is_symlink():
                nxt += sorted(e for e in f.iterdir() if (e.is_dir() and not e.is_symlink()) or (e.is_file() and is_archive(e)))
        level = nxt
    return level


def plan_units(sources: list[str], repo_depth: int | None, skip_dirs: tuple[str, ...], chunk_files: int,
               clone_cache: Path, failures: list[dict]) -> list[Unit]:
    """All units of all sources, in a deterministic order."""
    units: list[Unit] = []
    for src in sources:
        if _GIT_URL.match(src) or (src.endswith(".git") and not Path(src).exists()):
            try:
                folder = clone(src, clone_cache)
            except PolycoderError as e:
                failures.append({"source": src, "error": str(e)})
                continue
            repos = [folder]
            names = [f"{folder.parent.name.split('__')[0]}/{folder.name}"]  # cache/org__project/project
        else:
            p = Path(src)
            if not p.exists():
                raise PolycoderError(f"source not found: {src}; "
                                     f"give folders, archives ({', '.join(ARCHIVE_SUFFIXES)}) or git URLs")
            if p.is_file():
                if not is_archive(p):
                    raise PolycoderError(f"{src} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)}); "
                                         "give its folder instead")
                repos = [p]
            else:
                repos = _repositories(p, repo_depth)
            names = [f"{r.parent.name or 'local'}/{archive_stem(r.name)}" if r.is_file() else _repo_name(r) for r in repos]
        for repo_path, name in zip(repos, names):
            if repo_path.is_file():
                units.append(Unit(escape_name(name), src, "archive", str(repo_path), None, repo_path.stat().st_size))
                continue
            files = list(_walk(repo_path, skip_dirs))
            for i in range(0, max(len(files), 1), chunk_files):
                chunk = files[i : i + chunk_files]
                units.append(Unit(escape_name(name), src, "folder", str(repo_path), [r for r, _ in chunk],
                                  sum(s for _, s in chunk)))
    return units


def assign_tasks(units: list[Unit], n_tasks: int) -> list[list[int]]:
    """Largest-first onto the least-loaded task: deterministic, depends only on the units."""
    n_tasks = max(1, min(n_tasks, len(units)))
    heap = [(0, t) for t in range(n_tasks)]
    tasks: list[list[int]] = [[] for _ in range(n_tasks)]
    for i in sorted(range(len(units)), key=lambda i: (-units[i].size, i)):
        load, t = heapq.heappop(heap)
        tasks[t].append(i)
        heapq.heappush(heap, (load + units[i].size + 4096, t))
    return [sorted(t) for t in tasks]


@dataclass
class RawFile:
    """A file read from a unit, or the reason it could not be."""

    path: str
    data: bytes | None
    size: int
    error: str | None = None
    """None, or a removal reason: "symlink_outside", "symlink_broken", "unreadable", "too_large"."""


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def read_folder_unit(unit: Unit, max_bytes: int) -> Iterator[RawFile]:
    root = os.path.realpath(unit.root)
    for rel in unit.files or []:
        full = os.path.join(unit.root, rel)
        try:
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = os.path.realpath(full, strict=True)
                except (OSError, RuntimeError):  # loop or dangling link
                    yield RawFile(rel, None, 0, "symlink_broken")
                    continue
                if not _inside(target, root):
                    yield RawFile(rel, None, 0, "symlink_outside")
                    continue
                st = os.stat(target)
                full = target
            if not stat.S_ISREG(st.st_mode):
                yield RawFile(rel, None, 0, "not_a_file")
                continue
            if st.st_size > max_bytes:
                yield RawFile(rel, None, st.st_size, "too_large")
                continue
            with open(full, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError:
            yield RawFile(rel, None, 0, "unreadable")
            continue
        if len(data) > max_bytes:  # grew since the stat
            yield RawFile(rel, None, len(data), "too_large")
            continue
        yield RawFile(rel, data, len(data))


def read_archive_unit(unit: Unit, max_bytes: int) -> Iterator[RawFile]:
    """Language files of an archive, in archive order; a corrupt archive ends with one 'unreadable'."""
    path = unit.root
    try:
        if path.lower().endswith((".zip", ".whl", ".jar")):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    name = info.filename
                    if info.is_dir() or language_of(name) is None:
                        continue
                    if stat.S_ISLNK(info.external_attr >> 16):
                        yield RawFile(name, None, 0, "symlink_outside")
                        continue
                    if info.file_size > max_bytes:
                        yield RawFile(name, None, info.file_size, "too_large")
                        continue
                    try:
                        yield RawFile(name, zf.read(info), info.file_size)
                    except (zipfile.BadZipFile, OSError, RuntimeError):
                        yield RawFile(name, None, 0, "unreadable")
        else:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    if m.isdir() or language_of(m.name) is None:
                        continue
                    if m.issym() or m.islnk():
                        yield RawFile(m.name, None, 0, "symlink_outside")
                        continue
                    if not m.isfile():
                        yield RawFile(m.name, None, 0, "not_a_file")
                        continue
                    if m.size > max_bytes:
                        yield RawFile(m.name, None, m.size, "too_large")
                        continue
                    f = tf.extractfile(m)
                    yield RawFile(m.name, f.read() if f else b"", m.size)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        yield RawFile(f"<archive {os.path.basename(path)}: {type(e).__name__}>", None, 0, "unreadable")


def guess_licence(text: str) -> str | None:
    """An SPDX-like name from a licence file's text (the common cases only), or None."""
    t = text[:4000].lower()
    rules = [
        ("apache license", "Apache-2.0"), ("mozilla public license", "MPL-2.0"),
        ("gnu affero general public license", "AGPL-3.0"), ("gnu lesser general public license", "LGPL"),
        ("gnu library general public license", "LGPL"), ("gnu general public license", "GPL"),
        ("mit license", "MIT"), ("permission is hereby granted, free of charge", "MIT"),
        ("redistribution and use in source and binary forms", "BSD"), ("eclipse public license", "EPL"),
        ("the unlicense", "Unlicense"), ("isc license", "ISC"), ("boost software license", "BSL-1.0"),
    ]
    for needle, name in rules:
        if needle in t:
            if name == "GPL":
                return "GPL-3.0" if "version 3" in t else "GPL-2.0" if "version 2" in t else "GPL"
            return name
    return None


def licence_of_unit(unit: Unit) -> str | None:
    """The licence named by a LICENSE/COPYING file at the top (or one level down) of a repository."""
    try:
        if unit.kind == "folder":
            root = Path(unit.root)
            for p in sorted(root.iterdir()):
                if _LICENCE_NAMES.match(p.name) and p.is_file() and not p.is_symlink():
                    return guess_licence(p.read_text(encoding="utf-8", errors="replace"))
            return None
        if unit.root.lower().endswith((".zip", ".whl", ".jar")):
            with zipfile.ZipFile(unit.root) as zf:
                for name in zf.namelist():
                    if name.count("/") <= 1 and _LICENCE_NAMES.match(name.rsplit("/", 1)[-1]):
                        return guess_licence(zf.read(name).decode("utf-8", "replace"))
        else:
            with tarfile.open(unit.root, "r:*") as tf:
                for k, m in enumerate(tf):
                    if k > 500:  # licence files sit at the top; do not decompress a whole tree for one
                        break
                    if m.isfile() and m.name.count("/") <= 1 and _LICENCE_NAMES.match(m.name.rsplit("/", 1)[-1]):
                        f = tf.extractfile(m)
                        return guess_licence(f.read().decode("utf-8", "replace")) if f else None
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError):
        return None
    return None
