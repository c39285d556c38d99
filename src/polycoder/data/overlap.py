"""`polycoder data overlap`: is evaluation code in the training data? (exact and near duplicates)

PolyCoder published the SHA-256 of every training file so that anyone could check a test
set for contamination; this verb does that check, and a near-duplicate one:
- exact: the SHA-256 of each evaluation file's bytes is looked up in a training index.tsv
  (ours, or PolyCoder's published one: `NAME<TAB>sha256` lines);
- near: each evaluation file's MinHash signature (polycoder.data.dedup, same settings as
  the collector) is looked up with LSH among the training files' signatures, which
  `polycoder data collect` / `data split` store as minhash.npy next to index.tsv (rows in
  index order); pairs with estimated Jaccard >= the threshold are reported.

Evaluation files: a corpus folder (*.parquet), any folder (its files of the 12 languages,
walked without following symlinks) or single files.

The report goes to `--out`, by default `overlap.json` beside the training index (the
corpus the report is about), never into the current folder.

Limits: near duplicates need the training signatures (a published index alone has only
hashes: exact matches only); the signature settings are taken from minhash.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import numpy as np

from polycoder.corpus import iter_documents, read_index
from polycoder.data.dedup import MinHashParams, NearIndex, minhash
from polycoder.data.languages import language_of
from polycoder.errors import PolycoderError
from polycoder.files import write_text
from polycoder.options import POSITIONAL


def _eval_files(paths: list[Path]) -> Iterator[tuple[str, str | None, bytes | str]]:
    """(name, language, bytes or text) of every evaluation file."""
    for p in paths:
        p = Path(p)
        if p.is_dir() and any(p.glob("*.parquet")):
            for d in iter_documents(p, columns=["repo", "path", "language", "text"]):
                yield f"{d['repo']}/{d['path']}", d["language"], d["text"]
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
                dirnames.sort()
                for fn in sorted(filenames):
                    full = Path(dirpath) / fn
                    lang = language_of(fn)
                    if lang is None or full.is_symlink():
                        continue
                    try:
                        yield str(full), lang, full.read_bytes()
                    except OSError:
                        continue
        elif p.is_file():
            yield str(p), language_of(p.name), p.read_bytes()
        else:
            raise PolycoderError(f"evaluation path not found: {p}")


def _index_keys(index: Path) -> list[tuple[str, str]]:
    rows = []
    with open(index, encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, sha = line.rstrip("\n").rpartition("\t")
            if key:
                rows.append((key, sha.lower()))
    return rows


def training_signatures(index: Path, threshold: float) -> tuple[list[str], MinHashParams, NearIndex] | None:
    """(index keys, MinHash settings, LSH index) of the training signatures stored beside
    `index` (minhash.npy rows in index.tsv order, minhash.json), or None where there are none.
    `polycoder eval contamination` finds them the same way."""
    index = Path(index)
    sig_file, params_file = index.parent / "minhash.npy", index.parent / "minhash.json"
    if not (sig_file.is_file() and params_file.is_file()):
        return None
    keys = _index_keys(index)
    sigs = np.load(sig_file)
    if len(sigs) != len(keys):
        raise PolycoderError(f"{sig_file} has {len(sigs)} rows but {index} has {len(keys)} lines; "
                             "they must come from the same `polycoder data collect` run")
    p = json.loads(params_file.read_text())
    params = MinHashParams(num_perm=p["num_perm"], shingle=p["shingle"], threshold=threshold, seed=p["seed"])
    return [k for k, _ in keys], params, NearIndex(sigs, threshold)


def overlap(
    paths: Annotated[list[Path], POSITIONAL],
    index: Path,
    near: bool = True,
    near_threshold: float = 0.85,
    out: Path | None = None,
) -> dict:
    """Report evaluation files that are exact or near duplicates of training files.

    Args:
        paths: evaluation files: corpus folders, folders of source files, or files.
        index: the training index.tsv (minhash.npy and minhash.json next to it enable near duplicates).
        near: also look for near duplicates (needs minhash.npy next to the index).
        near_threshold: estimated Jaccard similarity from which a pair is reported.
        out: JSON report to write (default: overlap.json beside the index).
    """
    index = Path(index)
    by_sha = read_index(index)
    out = Path(out) if out is not None else index.parent / "overlap.json"
    near_index = keys = params = None
    if near:
        found = training_signatures(index, near_threshold)
        if found is not None:
            keys, params, near_index = found
        else:
            print(f"note: no minhash.npy/minhash.json next to {index}: exact duplicates only "
                  "(collect with --near-dedup to get them)")
    perms = params.permutations() if params else None
    report: dict = {"index": str(index), "threshold": near_threshold, "near_checked": near_index is not None,
                    "files": 0, "exact": [], "near": [], "by_language": {}}
    for name, lang, content in _eval_files(list(paths)):
        data = content.encode("utf-8") if isinstance(content, str) else content
        text = content if isinstance(content, str) else data.decode("utf-8", errors="replace")
        report["files"] += 1
        e = report["by_language"].setdefault(lang or "?", {"files": 0, "exact": 0, "near": 0})
        e["files"] += 1
        sha = hashlib.sha256(data).hexdigest()
        if sha in by_sha:
            report["exact"].append({"file": name, "training": by_sha[sha], "sha256": sha})
            e["exact"] += 1
            continue
        if near_index is not None:
            hits = near_index.query(minhash(text, params, perms))
            if hits:
                report["near"].append({"file": name, "matches": [{"training": keys[i], "similarity": round(s, 3)}
                                                                  for i, s in hits[:5]]})
                e["near"] += 1
    try:
        write_text(out, json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise PolycoderError(f"cannot write the report {out} ({e.strerror}); pass --out FILE.json") from None
    lines = ["| language | files | exact duplicates | near duplicates |", "|---|---:|---:|---:|"]
    for lang, e in sorted(report["by_language"].items()):
        lines.append(f"| {lang} | {e['files']:,} | {e['exact']:,} | {e['near'] if report['near_checked'] else '-'} |")
    print("\n".join(lines) + f"\n\n{len(report['exact'])} exact and {len(report['near'])} near duplicates "
          f"of {report['files']} files; wrote {out}")
    return report
