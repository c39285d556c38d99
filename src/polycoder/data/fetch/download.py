"""Downloading a source's archives with the ordinary clients, into a reusable cache.

What it implements: `Downloader`, which fetches each (kind, package, version) into
OUT/downloads/{kind}/{name}_{version}/ with `apt-get download` (deb), `apt-get source
--download-only` against a private deb-src list (deb-src), `npm pack` (npm) or
`pip download` (pypi wheel or sdist), and marks a complete download with a `.complete`
file listing its archives, so a re-run (or an interrupted one) reuses it. See
docs/CORPUS.md for where the code is to be had from the package registries.

Limits: a source whose archive cannot be downloaded (Debian answers 404 for some source
tarballs, a client is missing, a version left the mirror) raises `FetchError`: the source
is skipped and reported, never fatal. Nothing is installed into the system.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from polycoder.files import write_text

DEBIAN_MIRROR_SOURCES = "deb-src http://deb.debian.org/debian bookworm main\n"


class FetchError(Exception):
    """A source could not be downloaded (skipped, reported in the summary)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise FetchError(f"{cmd[0]} not found ({e}); install it or skip this kind with --only") from e
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"{' '.join(cmd[:3])}... timed out after {timeout}s") from e


def _safe_dirname(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in s)


class Downloader:
    """Fetches archives into OUT/downloads/{kind}/{name}_{version}/ with a .complete marker."""

    def __init__(self, out: Path):
        self.root = out / "downloads"
        self.apt_dir = out / "apt"
        self._apt_lock = threading.Lock()
        self._apt_ready = False

    def _apt_opts(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::SourceList={self.apt_dir / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={self.apt_dir / 'lists'}",
        ]

    def ensure_apt_sources(self) -> None:
        """Write the private deb-src list and run `apt-get update` on it once."""
        with self._apt_lock:
            if self._apt_ready:
                return
            (self.apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
            (self.apt_dir / "sources.list").write_text(DEBIAN_MIRROR_SOURCES)
            if not list((self.apt_dir / "lists").glob("*Sources*")):
                r = _run(["apt-get", *self._apt_opts(), "update"], self.apt_dir)
                if r.returncode != 0:
                    raise FetchError(f"apt-get update (deb-src list) failed: {r.stderr.strip()[-300:]}")
            self._apt_ready = True

    def _cached(self, kind: str, name: str, version: str) -> tuple[Path, list[Path] | None]:
        d = self.root / kind / _safe_dirname(f"{name}_{version}")
        marker = d / ".complete"
        if marker.exists():
            files = [d / f for f in json.loads(marker.read_text())["files"]]
            if all(f.exists() for f in files):
                return d, files
        return d, None

    def prefetch_debs(self, packages: tuple[tuple[str, str], ...]) -> None:
        """One `apt-get download` for the missing packages of a many-package source.

        (symfony's 120 components one by one take minutes; one call takes seconds.) Any
        package this misses is fetched, and reported, one by one by fetch() afterwards.
        """
        missing = [(n, v) for n, v in packages if self._cached("deb", n, v)[1] is None]
        if len(missing) < 2:
            return
        batch = self.root / "deb" / f".batch-{os.getpid()}-{threading.get_ident()}"
        batch.mkdir(parents=True, exist_ok=True)
        try:
            _run(["apt-get", "download", *(f"{n}={v}" for n, v in missing)], batch)
            for n, v in missing:
                hits = sorted(batch.glob(f"{n}_*.deb"))
                if hits:
                    d, _ = self._cached("deb", n, v)
                    d.mkdir(parents=True, exist_ok=True)
                    target = d / hits[0].name
                    hits[0].rename(target)
                    write_text(d / ".complete", json.dumps({"files": [target.name]}))
        except FetchError:
            pass
        finally:
            shutil.rmtree(batch, ignore_errors=True)

    def fetch(self, kind: str, name: str, version: str, sdist: bool = False) -> list[Path]:
        d, files = self._cached(kind + ("-sdist" if sdist else ""), name, version)
        if files is not None:
            return files
        marker = d / ".complete"
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():  # partial leftovers of an interrupted run
            if f.is_file():
                f.unlink()
        if sdist:
            files = self._fetch_pypi_sdist(d, name, version)
        else:
            files = getattr(self, "_fetch_" + kind.replace("-", "_"))(d, name, version)
        write_text(marker, json.dumps({"files": [f.name for f in files]}))
        return files

    def _fetch_deb(self, d: Path, name: str, version: str) -> list[Path]:
        r = _run(["apt-get", "download", f"{name}={version}"], d)
        debs = sorted(d.glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise FetchError(f"apt-get download {name}={version}: {_last_line(r.stderr)}")
        return debs

    def _fetch_deb_src(self, d: Path, name: str, version: str) -> list[Path]:
        self.ensure_apt_sources()
        r = _run(["apt-get", *self._apt_opts(), "source", "--download-only", f"{name}={version}"], d)
        origs = sorted(p for p in d.glob("*.orig*.tar.*") if not p.name.endswith(".asc"))
        if not origs:
            # About half of the mirror's source tarballs answer 404: skip, don't fail.
            raise FetchError(
                f"apt-get source {name}={version}: no .orig tarball ({_last_line(r.stderr)})"
            )
        return origs

    def _fetch_npm(self, d: Path, name: str, version: str) -> list[Path]:
        r = _run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(d), "--silent"], d)
        tgz = sorted(d.glob("*.tgz"))
        if r.returncode != 0 or not tgz:
            raise FetchError(f"npm pack {name}@{version}: {_last_line(r.stderr)}")
        return tgz

    def _fetch_pypi(self, d: Path, name: str, version: str) -> list[Path]:
        base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                "-q", "-d", str(d), f"{name}=={version}"]
        r = _run([*base, "--only-binary", ":all:"], d)
        files = sorted(d.glob("*.whl"))
        if r.returncode != 0 or not files:
            raise FetchError(f"pip download {name}=={version} (wheel): {_last_line(r.stderr)}")
        return files

    def _fetch_pypi_sdist(self, d: Path, name: str, version: str) -> list[Path]:
        # pip prepares an sdist's metadata after downloading it, installing its build
        # requirements in an isolated environment: slow (minutes), but the ordinary client.
        r = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                  "-q", "-d", str(d), "--no-binary", ":all:", f"{name}=={version}"], d)
        files = sorted([*d.glob("*.tar.gz"), *d.glob("*.zip")])
        if r.returncode != 0 or not files:
            raise FetchError(f"pip download {name}=={version} (sdist): {_last_line(r.stderr)}")
        return files


def _last_line(s: str) -> str:
    lines = [x for x in (s or "").strip().splitlines() if x.strip()]
    return lines[-1][:200] if lines else "no output"

