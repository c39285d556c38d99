"""`polycoder data split`: a corpus -> train / valid / test corpora split by repository, plus a held-out sample.

PolyCoder split its data 98.9 / 0.1 / 1 % and evaluated perplexity on about 100 files a
language from repositories it never trained on. Here every repository goes whole to one
split (so no repository straddles train and test), chosen per language (a repository's
majority language among its kept files) in the order of a seeded hash of its name, until
the split holds its fraction of that language's files; a language with one repository keeps
it in train. `heldout/` is a seeded sample of up to `heldout_per_language` files of each
language from the test split: files of repositories unseen in training, for
`polycoder eval perplexity`.

Outputs: OUT/{train,valid,test,heldout}/corpus-NNNNN.parquet (each input shard filtered,
row order kept), an index.tsv per split (and minhash.npy rows aligned with it when the
corpus has one), OUT/split.json and OUT/split.md.

Limits: fractions are met in files, at repository granularity: with few repositories per
language the valid and test splits are coarse (at least one repository each when the
fraction is positive and the language has three or more repositories).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import numpy as np

from polycoder.corpus import SPLITS, shard_paths, stable_hash, write_index, write_table
from polycoder.errors import PolycoderError
from polycoder.files import write_text
from polycoder.options import POSITIONAL


def assign_repositories(repo_lang_files: dict[str, dict[str, int]], valid_fraction: float, test_fraction: float,
                        seed: int) -> dict[str, str]:
    """repo -> "train" | "valid" | "test" (see the module docstring for the rule)."""
    by_lang: dict[str, list[str]] = {}
    for repo, counts in repo_lang_files.items():
        lang = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        by_lang.setdefault(lang, []).append(repo)
    out: dict[str, str] = {}
    for _, repos in sorted(by_lang.items()):
        repos.sort(key=lambda r: (stable_hash(str(seed), r), r))
        total = sum(sum(repo_lang_files[r].values()) for r in repos)
        remaining = list(repos)
        for split_name, frac in (("test", test_fraction), ("valid", valid_fraction)):
            target, got = frac * total, 0
            while got < target and len(remaining) > 1:  # train always keeps one repository
                r = remaining.pop(0)
                out[r] = split_name
                got += sum(repo_lang_files[r].values())
        for r in remaining:
            out[r] = "train"
    return out


def split(
    corpus: Annotated[Path, POSITIONAL],
    out: Path,
    valid_fraction: float = 0.001,
    test_fraction: float = 0.01,
    seed: int = 0,
    heldout_per_language: int = 100,
) -> dict:
    """Split a corpus into train / valid / test by repository, and sample held-out files.

    Args:
        corpus: a corpus folder from `polycoder data collect`.
        out: folder to write train/, valid/, test/, heldout/ and split.json into.
        valid_fraction: fraction of each language's files for validation (PolyCoder: 0.001).
        test_fraction: fraction of each language's files for test (PolyCoder: 0.01).
        seed: seed of the repository order and of the held-out sample.
        heldout_per_language: files per language sampled from the test split into heldout/ (0 = none).
    """
    # Deferred: the data extra's Parquet library, needed only where shards are read or written
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise PolycoderError("--valid-fraction and --test-fraction must be in [0, 1) and sum to under 1")
    corpus, out = Path(corpus), Path(out)
    if corpus.resolve() == out.resolve():
        raise PolycoderError("--out must differ from the corpus folder")
    shards = shard_paths(corpus)
    repo_lang: dict[str, dict[str, int]] = {}
    for p in shards:
        t = pq.read_table(p, columns=["repo", "language"]).to_pydict()
        for repo, lang in zip(t["repo"], t["language"]):
            c = repo_lang.setdefault(repo, {})
            c[lang] = c.get(lang, 0) + 1
    assignment = assign_repositories(repo_lang, valid_fraction, test_fraction, seed)
    sigs = np.load(corpus / "minhash.npy", mmap_mode="r") if (corpus / "minhash.npy").is_file() else None
    index_pos = _index_positions(corpus) if sigs is not None else None
    stats: dict = {s: {} for s in SPLITS}
    meta: dict[str, list[dict]] = {s: [] for s in SPLITS}
    test_tables = []
    for i, p in enumerate(shards):
        table = pq.read_table(p)
        splits = pa.array([assignment[r] for r in table.column("repo").to_pylist()])
        for s in SPLITS:
            part = table.filter(pc.equal(splits, s))
            if part.num_rows == 0:
                continue
            write_table(part, out / s / f"corpus-{i:05d}.parquet")
            rows = part.select(["repo", "path", "language", "sha256", "size"]).to_pylist()
            meta[s] += rows
            for r in rows:
                e = stats[s].setdefault(r["language"], {"repositories": set(), "files": 0, "bytes": 0})
                e["repositories"].add(r["repo"])
                e["files"] += 1
                e["bytes"] += r["size"]
            if s == "test":
                test_tables.append(part)
    for s in SPLITS:
        (out / s).mkdir(parents=True, exist_ok=True)
        rows = sorted(meta[s], key=lambda r: (r["language"], r["repo"], r["path"]))
        write_index(rows, out / s / "index.tsv")
        if sigs is not None:
            shutil.copyfile(corpus / "minhash.json", out / s / "minhash.json")
            np.save(out / s / "minhash.npy", np.asarray(sigs)[[index_pos[(r["repo"], r["path"])] for r in rows]]
                    if rows else np.zeros((0, sigs.shape[1]), dtype=np.uint32))
    heldout_n = {}
    if heldout_per_language and test_tables:
        test = pa.concat_tables(test_tables)
        keys = [(stable_hash(str(seed), "heldout", h), h) for h in test.column("sha256").to_pylist()]
        langs = test.column("language").to_pylist()
        picked: dict[str, list[int]] = {}
        for i in sorted(range(test.num_rows), key=keys.__getitem__):
            if len(picked.setdefault(langs[i], [])) < heldout_per_language:
                picked[langs[i]].append(i)
        take = sorted(i for v in picked.values() for i in v)
        write_table(test.take(pa.array(take, type=pa.int64())), out / "heldout" / "corpus-00000.parquet")
        heldout_n = {lang: len(v) for lang, v in sorted(picked.items())}
    summary = {
        "corpus": str(corpus), "seed": seed, "valid_fraction": valid_fraction, "test_fraction": test_fraction,
        "splits": {s: {lang: {"repositories": len(e["repositories"]), "files": e["files"], "bytes": e["bytes"]}
                       for lang, e in sorted(stats[s].items())} for s in SPLITS},
        "heldout_files": heldout_n,
    }
    write_text(out / "split.json", json.dumps(summary, indent=2) + "\n")
    md = ["| language | " + " | ".join(f"{s} repos | {s} files" for s in SPLITS) + " | heldout files |",
          "|---|" + "---:|" * (2 * len(SPLITS) + 1)]
    for lang in sorted({lang for s in SPLITS for lang in summary["splits"][s]}):
        cells = []
        for s in SPLITS:
            e = summary["splits"][s].get(lang, {"repositories": 0, "files": 0})
            cells += [f"{e['repositories']:,}", f"{e['files']:,}"]
        md.append(f"| {lang} | " + " | ".join(cells) + f" | {heldout_n.get(lang, 0)} |")
    write_text(out / "split.md", "\n".join(md) + "\n")
    print("\n".join(md) + f"\n\nwrote {', '.join(SPLITS)}{', heldout' if heldout_n else ''} to {out}")
    return summary


def _index_positions(corpus: Path) -> dict[tuple[str, str], int]:
    """(repo, path) -> row of the corpus's index.tsv / minhash.npy (both in the same order)."""
    # Deferred: the data extra's Parquet library, needed only where shards are read or written
    import pyarrow.parquet as pq

    rows = []
    for p in shard_paths(corpus):
        t = pq.read_table(p, columns=["repo", "path", "language"]).to_pydict()
        rows += zip(t["language"], t["repo"], t["path"])
    return {(repo, path): i for i, (lang, repo, path) in enumerate(sorted(rows))}
