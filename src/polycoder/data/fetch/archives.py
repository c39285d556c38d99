"""Safe extraction of the kept files of a .deb, tarball or zip/wheel, member by member.

What it implements: reading archives without trusting them, and the per-source filters
(keep/drop patterns, extensions, the 1 MiB limit, minified JS/TS, the byte budget).

Safety: archives are read member by member here (Debian packages through
`dpkg-deb --fsys-tarfile`, the tar stream that `dpkg -x` itself unpacks, so the same
checks apply to every kind); only regular files are written; symlinks, hard links and
devices are never created; absolute names, `..` components, NUL bytes and backslashes are
refused; every target's parent is resolved and must lie inside the source's folder; files
are opened with O_NOFOLLOW. Nothing is installed into the system.

Limits: only files with the language's extensions are kept (the data pipeline filters by
extension anyway); files over 1 MiB (PolyCoder's limit, Xu et al. 2022, section 3) and
minified JavaScript/TypeScript are dropped here, near-duplicates are left to the
pipeline's near-dedup. The minified check is a heuristic (long average or longest line).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import stat
import subprocess
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from polycoder.data.fetch.manifest import Source
from polycoder.data.languages import MAX_FILE_BYTES


class UnsafeMember(Exception):
    """An archive member whose name would escape the target folder."""


def safe_relpath(name: str) -> str:
    """Return a member name as a clean relative POSIX path, or raise UnsafeMember.

    Refused: absolute paths, `..` components, NUL bytes, backslashes (a Windows
    separator that could hide `..\\`), drive letters. Leading `./` and empty components
    are removed.
    """
    if "\x00" in name or "\\" in name:
        raise UnsafeMember(f"refused member name {name!r} (NUL or backslash)")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeMember(f"refused absolute member name {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeMember(f"refused member name with '..': {name!r}")
    return "/".join(parts)


def _inside(root: Path, target: Path) -> bool:
    try:
        target.relative_to(root)
        return True
    except ValueError:
        return False


def write_file_safely(root: Path, rel: str, data: bytes) -> Path:
    """Write `data` to root/rel, creating real directories only; never follow a symlink.

    The parent is resolved (which would expose a symlink planted earlier) and must lie
    inside root; the file is opened with O_NOFOLLOW so a symlink at the target raises.
    """
    rel = safe_relpath(rel)
    if not rel:
        raise UnsafeMember("empty member name")
    root_real = Path(os.path.realpath(root))
    target = root_real / rel
    parent = target.parent
    # Walk down creating directories, refusing any existing symlink on the way.
    cur = root_real
    for part in PurePosixPath(rel).parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            raise UnsafeMember(f"refused {rel!r}: {cur} is a symlink")
        if not cur.exists():
            cur.mkdir()
    if not _inside(root_real, Path(os.path.realpath(parent))):
        raise UnsafeMember(f"refused {rel!r}: resolves outside {root_real}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return target


@dataclasses.dataclass
class Member:
    """One archive entry as this module sees it."""

    name: str
    """Name as stored in the archive (unchecked)."""
    kind: str
    """file | dir | symlink | hardlink | other."""
    size: int
    """Size in bytes (files)."""
    read: Callable[[], bytes]
    """Returns the content (valid only while this member is current)."""


def iter_tar(fileobj: BinaryIO) -> Iterator[Member]:
    """Members of a tar stream (any compression), read sequentially (no seeking)."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for ti in tf:
            if ti.isreg():
                kind = "file"
            elif ti.isdir():
                kind = "dir"
            elif ti.issym():
                kind = "symlink"
            elif ti.islnk():
                kind = "hardlink"
            else:
                kind = "other"

            def read(ti: tarfile.TarInfo = ti) -> bytes:
                fh = tf.extractfile(ti)
                return fh.read() if fh is not None else b""

            yield Member(ti.name, kind, ti.size, read)


def iter_zip(path: Path) -> Iterator[Member]:
    """Members of a zip file; entries whose Unix mode says symlink are reported as such."""
    with zipfile.ZipFile(path) as zf:
        for zi in zf.infolist():
            mode = (zi.external_attr >> 16) & 0xFFFF
            if zi.is_dir():
                kind = "dir"
            elif stat.S_ISLNK(mode):
                kind = "symlink"
            elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no Unix type recorded
                kind = "other"
            else:
                kind = "file"
            yield Member(zi.filename, kind, zi.file_size, lambda zi=zi: zf.read(zi))


def iter_archive(path: Path) -> Iterator[Member]:
    """Members of a .deb, tarball or zip/wheel at `path`."""
    name = path.name
    if name.endswith(".deb"):
        # dpkg-deb --fsys-tarfile prints the data tarball that `dpkg -x` unpacks; reading
        # it here lets the same member checks apply as for every other archive.
        proc = subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(path)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            yield from iter_tar(proc.stdout)
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"dpkg-deb failed on {path.name}: {err.strip()[:200]}")
    elif name.endswith((".zip", ".whl", ".jar")):
        yield from iter_zip(path)
    else:
        with open(path, "rb") as fh:
            yield from iter_tar(fh)


def strip_components(rel: str, n: int) -> str | None:
    """`rel` without its first `n` path components (None when nothing is left)."""
    parts = rel.split("/")
    if len(parts) <= n:
        return None
    return "/".join(parts[n:])


def looks_minified(data: bytes) -> bool:
    """Heuristic for minified/bundled JS: long average lines or one huge line."""
    if len(data) < 2048:
        return False
    lines = data.count(b"\n") + 1
    return len(data) / lines > 300 or max(len(x) for x in data.split(b"\n")) > 10_000


COUNTERS = ("files", "bytes", "refused", "links_skipped", "too_large", "minified")
"""The counts of ExtractStats, which a SourceResult carries too."""


@dataclasses.dataclass
class ExtractStats:
    """What extraction of one source kept and why it skipped the rest."""

    files: int = 0
    """Files written."""
    bytes: int = 0
    """Bytes written."""
    refused: int = 0
    """Members refused as unsafe (traversal, absolute, through a symlink)."""
    links_skipped: int = 0
    """Symlinks, hard links and special files skipped (never created)."""
    too_large: int = 0
    """Files over MAX_FILE_BYTES dropped."""
    minified: int = 0
    """Minified JS/TS files dropped."""
    truncated: bool = False
    """The --max-mb-per-language budget stopped this source early."""
    refused_examples: list[str] = dataclasses.field(default_factory=list)
    """Up to 5 refused names, for the log."""

    def add(self, other: ExtractStats) -> None:
        for f in COUNTERS:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.truncated |= other.truncated
        self.refused_examples = (self.refused_examples + other.refused_examples)[:5]


class Budget:
    """Thread-safe byte budget per (split, language); None = unlimited."""

    def __init__(self, max_bytes: int | None):
        self.max_bytes = max_bytes
        self.used: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def exhausted(self, key: tuple[str, str]) -> bool:
        with self.lock:
            return self.max_bytes is not None and self.used.get(key, 0) >= self.max_bytes

    def take(self, key: tuple[str, str], n: int) -> bool:
        """Reserve n bytes; False when that would pass the cap."""
        with self.lock:
            used = self.used.get(key, 0)
            if self.max_bytes is not None and used + n > self.max_bytes:
                self.used[key] = max(used, self.max_bytes)  # mark full
                return False
            self.used[key] = used + n
            return True


def extract_members(
    members: Iterator[Member],
    dest: Path,
    select: Callable[[str], str | None],
    *,
    exts: tuple[str, ...] = (),
    inner: str = "",
    on_inner: Callable[[str, bytes], None] | None = None,
    take: Callable[[int], bool] | None = None,
    log: Callable[[str], None] = lambda m: None,
    written: dict[str, int] | None = None,
) -> ExtractStats:
    """Write the selected regular files of an archive under `dest`, safely.

    `select(clean_name) -> output path or None`; `exts` (if given) restricts the kept
    files by extension (case-insensitive); members matching `inner` are handed to
    `on_inner(name, bytes)` instead (archives inside the archive); `take(n)` asks the
    budget for n bytes and stops the extraction when refused. `written` (path -> size,
    shared by the archives of one source) makes a path written twice (a tarball with a
    repeated entry, two packages shipping one file) count once.
    """
    st = ExtractStats()
    written = {} if written is None else written
    dest.mkdir(parents=True, exist_ok=True)
    for m in members:
        try:
            clean = safe_relpath(m.name)
        except UnsafeMember as e:
            st.refused += 1
            if len(st.refused_examples) < 5:
                st.refused_examples.append(m.name)
            log(str(e))
            continue
        if m.kind == "dir" or not clean:
            continue
        if m.kind != "file":
            st.links_skipped += 1
            continue
        if inner and on_inner is not None and fnmatch.fnmatchcase(clean, inner):
            on_inner(clean, m.read())
            continue
        out = select(clean)
        if out is None:
            continue
        if exts and not out.lower().endswith(exts):
            continue
        if m.size > MAX_FILE_BYTES:
            st.too_large += 1
            continue
        data = m.read()
        if len(data) > MAX_FILE_BYTES:
            st.too_large += 1
            continue
        if out.lower().endswith((".js", ".mjs", ".cjs", ".jsx", ".ts", ".tsx")) and looks_minified(data):
            st.minified += 1
            continue
        if take is not None and not take(len(data)):
            st.truncated = True
            break
        try:
            write_file_safely(dest, out, data)
        except (UnsafeMember, OSError) as e:
            st.refused += 1
            if len(st.refused_examples) < 5:
                st.refused_examples.append(m.name)
            log(f"refused {m.name!r}: {e}")
            continue
        if out in written:  # overwritten: the last copy wins, counted once
            st.files -= 1
            st.bytes -= written[out]
        written[out] = len(data)
        st.files += 1
        st.bytes += len(data)
    return st


def make_selector(source: Source, default_drop: tuple[str, ...], strip: int) -> Callable[[str], str | None]:
    """Map a clean member name to its output path under the source folder, or None."""
    base = source.base.strip("/")
    drops = default_drop + source.drop

    def select(clean: str) -> str | None:
        rel = strip_components(clean, strip)
        if rel is None:
            return None
        if base:
            if not rel.startswith(base + "/"):
                return None
            rel = rel[len(base) + 1:]
        if not any(fnmatch.fnmatchcase(rel, k) for k in source.keep):
            return None
        if any(fnmatch.fnmatchcase(rel, d) for d in drops):
            return None
        return rel

    return select

