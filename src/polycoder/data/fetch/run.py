"""One source from manifest entry to corpus folder, the order sources run in, and the summary.

What it implements: `process_source` (reuse a cached result, or download, extract into
OUT/raw/.staging/ and rename into OUT/raw/{split}/{language}/{name} only when complete, then
write OUT/state/{name}.json for resuming), `interleave` (round-robin over languages),
`summarise` (the per-(split, language) table) and `heldout_overlap` (held-out files
byte-identical to a training file).

Limits: `--max-mb-per-language` caps the kept bytes of each (split, language); a source
cut by the cap is marked `truncated`, one reached after the cap is full `skipped-budget`.
A source that fails (download or extraction) leaves nothing behind and is reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from polycoder.data.fetch.archives import COUNTERS, Budget, ExtractStats, Member, extract_members, iter_archive, make_selector
from polycoder.data.fetch.download import Downloader, FetchError, sha256_file
from polycoder.data.fetch.manifest import LANGUAGES, SPLITS, Manifest, Source
from polycoder.files import write_text


@dataclasses.dataclass
class SourceResult:
    """The outcome of one source, written to OUT/state/ and the lock file."""

    name: str
    """The source's folder name (as in the manifest)."""
    kind: str
    """deb | deb-src | npm | pypi."""
    language: str
    """Language folder."""
    split: str
    """train | heldout."""
    licence: str
    """Licence, copied from the manifest."""
    packages: list[list[str]]
    """[name, version] fetched."""
    status: str
    """ok | cached | truncated | failed | skipped-budget."""
    key: str
    """Source.key() at extraction time (a changed manifest entry re-extracts)."""
    archives: list[dict] = dataclasses.field(default_factory=list)
    """{file, sha256, bytes} of each downloaded archive."""
    files: int = 0
    """Files written."""
    bytes: int = 0
    """Bytes written."""
    refused: int = 0
    """Unsafe members refused."""
    links_skipped: int = 0
    """Symlinks / hard links / special files not created."""
    too_large: int = 0
    """Files over MAX_FILE_BYTES dropped."""
    minified: int = 0
    """Minified JS/TS dropped."""
    error: str = ""
    """Why the source failed, was skipped or truncated."""
    seconds: float = 0.0
    """Wall time for download + extraction."""


def process_source(
    src: Source, manifest: Manifest, out: Path, dl: Downloader, budget: Budget,
    log: Callable[[str], None], force: bool = False,
) -> SourceResult:
    """Fetch and extract one source into OUT/raw/{split}/{language}/{name}, or reuse it.

    A previous result is reused when its state file's key matches the manifest entry and
    it fits the budget (a truncated one only under the same cap); otherwise the source is
    downloaded (cached under OUT/downloads) and extracted into a staging folder that is
    renamed into place when complete.
    """
    t0 = time.time()
    res = SourceResult(
        name=src.name, kind=src.kind, language=src.language, split=src.split,
        licence=src.licence, packages=[list(p) for p in src.packages], status="ok", key=src.key(),
    )
    bkey = (src.split, src.language)
    final = out / "raw" / src.split / src.language / src.name
    state_file = out / "state" / f"{src.name}.json"

    def discard(status: str, error: str) -> SourceResult:
        """A source that is not (or no longer) part of the corpus leaves nothing behind."""
        if final.exists():
            shutil.rmtree(final)
        state_file.unlink(missing_ok=True)
        res.status, res.error, res.seconds = status, error, time.time() - t0
        return res

    if not force and state_file.exists() and final.exists():
        prev = json.loads(state_file.read_text())
        if prev["status"] == "truncated":
            reusable = prev.get("cap") == budget.max_bytes
        else:  # a complete source is reusable under any cap it fits in
            reusable = budget.max_bytes is None or (
                budget.used.get(bkey, 0) + prev["bytes"] <= budget.max_bytes)
        if prev.get("key") == res.key and prev["status"] in ("ok", "truncated") and reusable:
            with budget.lock:
                budget.used[bkey] = budget.used.get(bkey, 0) + prev["bytes"]
            prev["status"] = "cached" if prev["status"] == "ok" else "truncated"
            return SourceResult(**{k: prev[k] for k in SourceResult.__dataclass_fields__ if k in prev})
    if budget.exhausted(bkey):
        return discard("skipped-budget", "--max-mb-per-language reached")
    try:
        archives: list[Path] = []
        if src.kind == "deb":
            dl.prefetch_debs(src.packages)
        for name, version in src.packages:
            archives += dl.fetch(src.kind, name, version, sdist=src.sdist)
    except FetchError as e:
        return discard("failed", str(e))
    for a in archives:
        res.archives.append({"file": a.name, "sha256": sha256_file(a), "bytes": a.stat().st_size})

    staging = out / "raw" / ".staging" / f"{src.name}.{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    exts = src.exts or manifest.extensions[src.language]
    total = ExtractStats()
    written: dict[str, int] = {}

    def take(n: int) -> bool:
        return budget.take(bkey, n)

    def extract(members: Iterator[Member], strip: int, inner: str = "") -> None:
        def on_inner(name: str, data: bytes) -> None:
            log(f"  {src.name}: reading inner archive {name} ({len(data) / 1e6:.0f} MB)")
            suffix = "".join(PurePosixPath(name).suffixes[-2:]) or ".bin"
            with tempfile.NamedTemporaryFile(dir=out / "downloads", suffix=suffix) as tmp:
                tmp.write(data)
                tmp.flush()
                del data  # the inner archive can be large; keep only the temp file
                extract(iter_archive(Path(tmp.name)), src.effective_strip)

        sel = make_selector(src, manifest.default_drop, strip)
        if inner:
            # The outer archive only supplies the inner one(s): select nothing else.
            sel = lambda _c: None  # noqa: E731
        st = extract_members(members, staging, sel, exts=exts, inner=inner,
                             on_inner=on_inner if inner else None, take=take, log=log, written=written)
        total.add(st)

    try:
        for a in archives:
            if total.truncated:
                break
            if src.inner:
                extract(iter_archive(a), 0, inner=src.inner)
            else:
                extract(iter_archive(a), src.effective_strip)
    except Exception as e:  # a corrupt archive must not stop the other sources
        shutil.rmtree(staging, ignore_errors=True)
        return discard("failed", f"extraction: {type(e).__name__}: {e}")

    for f in COUNTERS:
        setattr(res, f, getattr(total, f))
    res.seconds = time.time() - t0
    if total.files == 0:
        shutil.rmtree(staging, ignore_errors=True)
        if total.truncated:  # the cap filled up while this source was downloading
            return discard("skipped-budget", "--max-mb-per-language reached")
        return discard("failed", "no files of the language were kept (check keep/base)")
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(final)
    if total.truncated:
        res.status, res.error = "truncated", "--max-mb-per-language reached inside this source"
    state = dataclasses.asdict(res)
    state["cap"] = budget.max_bytes
    write_text(state_file, json.dumps(state, indent=1))
    return res


def interleave(sources: list[Source]) -> list[Source]:
    """Round-robin over (split, language) so every language gets sources early."""
    groups: dict[tuple[str, str], list[Source]] = {}
    for s in sources:
        groups.setdefault((s.split, s.language), []).append(s)
    order: list[Source] = []
    queues = [groups[k] for k in sorted(groups, key=lambda k: (k[0] != "train", k[1]))]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def summarise(results: list[SourceResult]) -> tuple[str, dict]:
    """(the summary table as text, {"split/Language": {sources, files, bytes}})."""
    table: dict[tuple[str, str], dict] = {}
    for r in results:
        if r.status in ("failed", "skipped-budget"):
            continue
        row = table.setdefault((r.split, r.language), {"sources": 0, "files": 0, "bytes": 0})
        row["sources"] += 1
        row["files"] += r.files
        row["bytes"] += r.bytes
    lines = [f"{'split':8} {'language':11} {'sources':>7} {'files':>9} {'MB':>9}"]
    per_split: dict[str, list[int]] = {}
    for split in SPLITS:
        for lang in LANGUAGES:
            row = table.get((split, lang), {"sources": 0, "files": 0, "bytes": 0})
            lines.append(f"{split:8} {lang:11} {row['sources']:7d} {row['files']:9d} {row['bytes'] / 1e6:9.1f}")
            acc = per_split.setdefault(split, [0, 0, 0])
            acc[0] += row["sources"]
            acc[1] += row["files"]
            acc[2] += row["bytes"]
        s = per_split[split]
        lines.append(f"{split:8} {'(all)':11} {s[0]:7d} {s[1]:9d} {s[2] / 1e6:9.1f}")
    bad = [r for r in results if r.status in ("failed", "skipped-budget", "truncated")]
    if bad:
        lines.append("")
        lines.append("not fetched / partial:")
        for r in bad:
            lines.append(f"  {r.status:14} {r.split:7} {r.language:10} {r.name}: {r.error}"[:160])
    by_lang = {f"{split}/{lang}": v for (split, lang), v in sorted(table.items())}
    return "\n".join(lines), by_lang


def heldout_overlap(raw: Path) -> list[str]:
    """Held-out files whose bytes equal a training file's (contamination by copy).

    Sizes are compared first so only same-size training files are hashed.
    """
    def files(split: str) -> list[Path]:
        root = raw / split
        return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()] if root.exists() else []

    held = {}
    for p in files("heldout"):
        held.setdefault(p.stat().st_size, []).append(p)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    train_hashes = {digest(p) for p in files("train") if p.stat().st_size in held}
    return sorted(str(p.relative_to(raw)) for ps in held.values() for p in ps if digest(p) in train_hashes)

