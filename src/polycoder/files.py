"""Writing files and folders so that a half-written one never replaces a good one.

Everything that polycoder writes for later (corpus shards, token shards, indexes, plans,
checkpoints, reports, the compiled kernels) is written under a temporary name in the same folder
and renamed into place only once it is complete: a rename within one file system is
atomic on POSIX, so a reader sees the old file or the new one, never a torn one, and a
process killed while writing leaves at most a stray temporary (named `.NAME.tmp-PID-...`).

- `atomic_path(path)`: a context manager yielding the temporary path to write to;
  renamed to `path` when the block ends without an exception, removed otherwise.
- `write_text` / `write_bytes`: one-call forms of it.
- `atomic_folder(path)`: the same for a folder; an existing folder at `path` is moved
  aside, the new one renamed into its place, and the old one removed.
- `fsync_tree(folder)`: flush a folder's files to disk (checkpoints, before the rename).

Limit: atomic against crashes of this process; against a power loss only where the
caller fsyncs (checkpoints do).
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_counter = itertools.count()


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-{next(_counter)}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a new, empty temporary folder beside `path`; it replaces `path` if the block succeeds.

    An existing folder at `path` is renamed aside, the new one renamed into its place, and
    the old one removed: a reader sees the old folder or the new one, never a mixture. Between
    the two renames `path` is briefly absent; a crash exactly there leaves the old folder
    beside it as `.PATH.old.tmp-...` (POSIX has no atomic exchange of two folders).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = _temporary_name(path.with_name(path.name + ".old"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_tree(folder: str | Path) -> None:
    """fsync every file of `folder` (recursively) and the folders themselves."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder's entry list (so a rename inside it survives a power loss)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def end_cut_line(path: Path) -> None:
    """End the last line of a line-per-record file cut by an interruption (no final newline),
    so that records appended after it start on a line of their own (the cut record stays
    unreadable; its readers skip it and redo its work)."""
    try:
        with open(path, "rb+") as f:
            if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def cache_root() -> Path:
    """The user's cache folder for polycoder: $POLYCODER_CACHE, else $XDG_CACHE_HOME/polycoder,
    else ~/.cache/polycoder (compiled kernels, model fingerprints)."""
    return Path(os.environ.get("POLYCODER_CACHE")
                or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "polycoder"))
