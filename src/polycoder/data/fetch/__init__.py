"""`polycoder data fetch`: PolyCoder's 12-language source corpus from Debian, npm and PyPI packages.

What it implements: the "sources" stage of the data flow, before `polycoder data collect`.
A pinned manifest (`corpus_manifest.json` beside this file) names every source -- a Debian
binary package, a Debian source package, an npm tarball or a PyPI wheel/sdist -- with its
exact version, language, split (train / heldout), licence and the sub-paths to keep and to
drop. Each source is downloaded with the ordinary client (`apt-get download`,
`apt-get source --download-only`, `npm pack`, `pip download`), its archives are read member
by member, and the kept source files are written to

    OUT/raw/{train,heldout}/{Language}/{source-name}/...     (one folder = one "repository")
    OUT/downloads/...                                         (archives, reused on re-run)
    OUT/state/{source-name}.json                              (per-source result, for resuming)
    OUT/manifest.lock.json                                    (what was fetched: versions,
                                                               sha256 of every archive,
                                                               file counts, bytes per language)
    OUT/SUMMARY.md                                            (the summary table)

The modules, in the order a source goes through them:

    manifest.py    Source, Manifest, load_manifest: the pinned manifest and its validation
    download.py    Downloader: archives into the download cache, with the ordinary clients
    archives.py    safe member-by-member extraction and the keep/drop/size filters
    run.py         process_source (one source, resumable), interleave, summarise, heldout_overlap

References: PolyCoder's data collection (Xu et al. 2022, section 3: files of the
repository's majority language by extension, files over 1 MB dropped) and docs/CORPUS.md
(where the code is to be had from the package registries, the manifest's fields, its
pitfalls, a measured run).

Limits: one run at a time per OUT (a lock file refuses a second). A source whose archive
cannot be downloaded (Debian answers 404 for some source tarballs) is skipped and
reported, never fatal. `--max-mb-per-language` caps the kept bytes of each (split,
language); a capped source is marked `truncated`. Safety of extraction: see archives.py.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from polycoder.data.fetch.archives import Budget
from polycoder.data.fetch.download import Downloader, sha256_file
from polycoder.data.fetch.manifest import DEFAULT_MANIFEST, SCRIPT_VERSION, SPLITS, Manifest, Source, load_manifest
from polycoder.data.fetch.run import SourceResult, heldout_overlap, interleave, process_source, summarise
from polycoder.errors import PolycoderError
from polycoder.files import write_text

DEFAULT_OUT = Path("~/.cache/polycoder/corpus")


def fetch_corpus(
    out: Path = DEFAULT_OUT,
    manifest: Path | None = None,
    max_mb_per_language: float | None = None,
    jobs: int = 3,
    only: list[str] | None = None,
    force: bool = False,
    check: bool = False,
) -> int:
    """Assemble PolyCoder's 12-language source corpus from Debian, npm and PyPI packages.

    Args:
        out: output folder: raw/{train,heldout}/{Language}/{source}/, downloads/, state/, manifest.lock.json.
        manifest: the manifest JSON (default: the pinned one shipped with polycoder,
            polycoder/data/fetch/corpus_manifest.json).
        max_mb_per_language: cap on kept MB per (split, language); default: no cap.
        jobs: sources fetched in parallel.
        only: source names, languages or splits to fetch (default: all).
        force: re-extract even cached sources.
        check: validate the manifest and exit.

    Returns:
        0 when the run completed (failed sources are reported, not fatal). A bad manifest or
        another run holding OUT raises PolycoderError (the CLI: one error line, status 2).
    """
    manifest_path = Path(manifest) if manifest is not None else DEFAULT_MANIFEST
    try:
        pinned = load_manifest(manifest_path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PolycoderError(f"bad manifest {manifest_path}: {e}") from None
    if check:
        print(f"manifest ok: {len(pinned.sources)} sources")
        return 0
    sources = list(pinned.sources)
    if only:
        sel = set(only)
        sources = [s for s in sources if s.name in sel or s.language in sel or s.split in sel]
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # One run per output folder: a second one would extract into the same staging area.
    # (The lock is held on this open file, so it is opened in place, never renamed.)
    with open(out / ".fetch.lock", "w") as lock_fh:
        try:
            fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PolycoderError(f"another `polycoder data fetch` run is using {out}; "
                                 "wait for it or pick another --out") from None
        _fetch(pinned, manifest_path, sources, out, max_mb_per_language, jobs, whole=not only, force=force)
    return 0


def _fetch(pinned: Manifest, manifest_path: Path, sources: list[Source], out: Path,
           max_mb_per_language: float | None, jobs: int, *, whole: bool, force: bool) -> None:
    """The run itself, under the lock: fetch `sources`, then write the lock file and summary.

    `whole`: every source of the manifest was asked for, so folders of sources no longer
    in it are removed.
    """
    (out / "downloads").mkdir(exist_ok=True)
    # Leftovers of an interrupted run: half-extracted sources and batch download folders.
    staging = out / "raw" / ".staging"
    if staging.exists():
        shutil.rmtree(staging)
    for batch in (out / "downloads" / "deb").glob(".batch-*"):
        shutil.rmtree(batch, ignore_errors=True)
    max_bytes = int(max_mb_per_language * 1e6) if max_mb_per_language else None
    budget = Budget(max_bytes)
    dl = Downloader(out)
    lock = threading.Lock()

    def log(msg: str) -> None:
        with lock:
            print(msg, flush=True)

    t0 = time.time()
    order = interleave([s for s in sources if not s.fallback_for])
    fallbacks = [s for s in sources if s.fallback_for]
    log(f"fetching {len(order)} sources (+{len(fallbacks)} fallbacks) into {out} with {jobs} jobs"
        + (f", cap {max_mb_per_language} MB per language" if max_bytes else ""))
    results: list[SourceResult] = []
    done = 0
    total = len(order)

    def one(s: Source) -> SourceResult:
        nonlocal done
        try:
            r = process_source(s, pinned, out, dl, budget, log, force)
        except Exception as e:  # never crash the whole run for one source
            r = SourceResult(name=s.name, kind=s.kind, language=s.language, split=s.split,
                             licence=s.licence, packages=[list(p) for p in s.packages],
                             status="failed", key=s.key(), error=f"{type(e).__name__}: {e}")
        with lock:
            results.append(r)
            done += 1
            n = done
        extra = f" -- {r.error}" if r.error else ""
        log(f"[{n:3d}/{total}] {r.status:14} {r.split:7} {r.language:10} {r.name:32} "
            f"{r.files:7d} files {r.bytes / 1e6:8.1f} MB {r.seconds:6.0f}s{extra}")
        return r

    def run_all(batch: list[Source]) -> None:
        if max_bytes is None:
            tasks = [[s] for s in batch]
        else:
            # With a cap, the sources of one (split, language) run one after the other in
            # manifest order, so which ones fill the cap does not depend on timing.
            groups: dict[tuple[str, str], list[Source]] = {}
            for s in sorted(batch, key=lambda s: pinned.sources.index(s)):
                groups.setdefault((s.split, s.language), []).append(s)
            tasks = list(groups.values())
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for fut in as_completed([pool.submit(lambda t: [one(s) for s in t], t) for t in tasks]):
                fut.result()

    run_all(order)
    status = {r.name: r.status for r in results}
    needed = [s for s in fallbacks if status.get(s.fallback_for) in ("failed", None)]
    for s in fallbacks:
        if s not in needed:  # the source it stands in for arrived: keep the corpus free of the copy
            stale = out / "raw" / s.split / s.language / s.name
            if stale.exists():
                shutil.rmtree(stale)
            (out / "state" / f"{s.name}.json").unlink(missing_ok=True)
    total += len(needed)
    run_all(needed)

    if whole:  # the corpus mirrors the manifest: remove sources no longer in it
        _remove_unlisted(pinned, out, log)
    ordered = _all_results(pinned, out, results)
    text, by_lang = summarise(ordered)
    overlap = heldout_overlap(out / "raw")
    text += f"\nheld-out files identical to a training file: {len(overlap)}"
    text += "".join(f"\n  {p}" for p in overlap[:5])
    lock_data = {
        "script_version": SCRIPT_VERSION,
        "manifest": str(manifest_path),
        "manifest_sha256": sha256_file(manifest_path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "max_mb_per_language": max_mb_per_language,
        "seconds": round(time.time() - t0, 1),
        "per_language": by_lang,
        "heldout_identical_to_train": overlap,
        "sources": [dataclasses.asdict(r) for r in ordered],
    }
    write_text(out / "manifest.lock.json", json.dumps(lock_data, indent=1))
    write_text(out / "SUMMARY.md", "```\n" + text + "\n```\n")
    log("")
    log(text)
    log(f"\ntook {time.time() - t0:.0f}s; lock file {out / 'manifest.lock.json'}")


def _remove_unlisted(pinned: Manifest, out: Path, log: Callable[[str], None]) -> None:
    """Remove source folders (and their state files) that the manifest no longer names."""
    wanted = {(s.split, s.language, s.name) for s in pinned.sources}
    for split in SPLITS:
        for lang_dir in sorted((out / "raw" / split).glob("*")):
            for d in sorted(lang_dir.iterdir()) if lang_dir.is_dir() else []:
                if (split, lang_dir.name, d.name) not in wanted and d.is_dir() and not d.is_symlink():
                    log(f"removing {d} (not in the manifest)")
                    shutil.rmtree(d)
                    (out / "state" / f"{d.name}.json").unlink(missing_ok=True)


def _all_results(pinned: Manifest, out: Path, results: list[SourceResult]) -> list[SourceResult]:
    """This run's results plus the state of every other source on disk, in manifest order.

    The lock file describes every source on disk, including ones not in this run's --only.
    """
    all_results = {r.name: r for r in results}
    for s in pinned.sources:
        if s.name not in all_results:
            sf = out / "state" / f"{s.name}.json"
            if sf.exists():
                prev = json.loads(sf.read_text())
                all_results[s.name] = SourceResult(**{k: prev[k] for k in SourceResult.__dataclass_fields__ if k in prev})
    return [all_results[s.name] for s in pinned.sources if s.name in all_results]
