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

Too few repositories: a language with one repository has no valid or test files, and one
with two repositories gives one of them, whole, to test (with the README's small fetch,
161 of 213 C files for a 1 % test split). `--by-file-below N` splits the languages with fewer than N repositories by
file instead (files in the order of a seeded hash of (repository, path), the same rule):
their splits then share repositories, so near-identical files (licence headers, generated
code, copies) can sit in both train and test; by repository stays the default because it
is what keeps them apart.

Warnings (stderr, split.json's "warnings", split.md): a valid or test split that is empty
while its fraction is positive; and, per language, such a split that is empty although its
fraction calls for at least one file, or that is far from its fraction, defined as: its
share of the language's files differs from the fraction by more than half the fraction
and by more than 5 percentage points (1 %: outside 0-6 %; 20 %: outside 10-30 %). Each
says what to do.

Limits: fractions are met in files, at repository granularity: with few repositories per
language the valid and test splits are coarse (at least one repository each when the
fraction is positive and the language has three or more repositories).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import numpy as np

from polycoder.corpus import SPLITS, shard_paths, stable_hash, write_index, write_table
from polycoder.errors import PolycoderError
from polycoder.files import write_text
from polycoder.options import POSITIONAL

# A split is "far" from its fraction when its share of a language's files is off by more
# than half the fraction and by more than this many (see the module docstring).
FAR_MARGIN = 0.05


def repository_languages(repo_lang_files: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """language -> its repositories (a repository's majority language; ties to the first name)."""
    by_lang: dict[str, list[str]] = {}
    for repo, counts in sorted(repo_lang_files.items()):
        lang = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        by_lang.setdefault(lang, []).append(repo)
    return by_lang


def _take(items: list, sizes: dict, valid_fraction: float, test_fraction: float) -> dict:
    """item -> split: test, then valid, take items in order until they hold their fraction of
    the sizes; train keeps the rest, and always at least one item."""
    total = sum(sizes[x] for x in items)
    remaining = list(items)
    out = {}
    for split_name, frac in (("test", test_fraction), ("valid", valid_fraction)):
        target, got = frac * total, 0
        while got < target and len(remaining) > 1:
            x = remaining.pop(0)
            out[x] = split_name
            got += sizes[x]
    out.update((x, "train") for x in remaining)
    return out


def assign_repositories(repo_lang_files: dict[str, dict[str, int]], valid_fraction: float, test_fraction: float,
                        seed: int) -> dict[str, str]:
    """repo -> "train" | "valid" | "test" (see the module docstring for the rule)."""
    sizes = {r: sum(c.values()) for r, c in repo_lang_files.items()}
    out: dict[str, str] = {}
    for _, repos in sorted(repository_languages(repo_lang_files).items()):
        repos.sort(key=lambda r: (stable_hash(str(seed), r), r))
        out.update(_take(repos, sizes, valid_fraction, test_fraction))
    return out


def assign_files(files: list[tuple[str, str]], valid_fraction: float, test_fraction: float,
                 seed: int) -> dict[tuple[str, str], str]:
    """(repo, path) -> split for the files of one language split by file (`--by-file-below`)."""
    order = sorted(files, key=lambda f: (stable_hash(str(seed), "file", *f), f))
    return _take(order, dict.fromkeys(order, 1), valid_fraction, test_fraction)


def split_warnings(splits: dict, fractions: dict[str, float], repositories: dict[str, int],
                   by_file: set[str]) -> list[str]:
    """What is wrong with a split, and what to do (see the module docstring for "far")."""
    langs = sorted({lang for s in splits.values() for lang in s})
    warnings = []
    for s, frac in fractions.items():
        if frac > 0 and not splits[s]:
            warnings.append(f"the {s} split is empty (asked for {frac:.2%} of each language's files)"
                            + ("; `polycoder train` will measure no validation loss" if s == "valid" else ""))
    for lang in langs:
        n = sum(splits[s].get(lang, {}).get("files", 0) for s in splits)
        for s, frac in fractions.items():
            got = splits[s].get(lang, {}).get("files", 0)
            empty = got == 0 and frac * n >= 1
            if not (empty or (frac > 0 and abs(got / n - frac) > max(frac / 2, FAR_MARGIN))):
                continue
            what = (f"{lang}: {s} has no files (asked for {frac:.2%} of {n:,})" if empty else
                    f"{lang}: {s} holds {got:,} of {n:,} files ({got / n:.0%}; asked for {frac:.2%})")
            if lang in by_file:
                fix = "too few files to come closer; add files or change the fraction"
            else:
                n_repos = repositories[lang]
                by_file_fix = (f"pass --by-file-below {n_repos + 1} to split {lang} by file (its files then share "
                               "repositories across splits)")
                fix = (f"one repository cannot be split by repository; {by_file_fix}, or add repositories"
                       if n_repos == 1 else
                       f"{n_repos} repositories are too few or too uneven to split by repository; {by_file_fix}, "
                       "add repositories, or try another --seed")
            warnings.append(f"{what}: {fix}")
    return warnings


def split(
    corpus: Annotated[Path, POSITIONAL],
    out: Path,
    valid_fraction: float = 0.001,
    test_fraction: float = 0.01,
    seed: int = 0,
    heldout_per_language: int = 100,
    by_file_below: int = 0,
) -> dict:
    """Split a corpus into train / valid / test by repository, and sample held-out files.

    Args:
        corpus: a corpus folder from `polycoder data collect`.
        out: folder to write train/, valid/, test/, heldout/ and split.json into.
        valid_fraction: fraction of each language's files for validation (PolyCoder: 0.001).
        test_fraction: fraction of each language's files for test (PolyCoder: 0.01).
        seed: seed of the repository order and of the held-out sample.
        heldout_per_language: files per language sampled from the test split into heldout/ (0 = none).
        by_file_below: split a language with fewer repositories than this by file instead (0 = never). By
            repository, the default, keeps each repository whole in one split, so no file in test has a near copy
            from its own repository in train; by file gives small languages valid and test files at that cost.
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
    if by_file_below < 0:
        raise PolycoderError(f"--by-file-below must be >= 0 (0 = always by repository), got {by_file_below}")
    shards = shard_paths(corpus)
    repo_lang: dict[str, dict[str, int]] = {}
    for p in shards:
        t = pq.read_table(p, columns=["repo", "language"]).to_pydict()
        for repo, lang in zip(t["repo"], t["language"]):
            c = repo_lang.setdefault(repo, {})
            c[lang] = c.get(lang, 0) + 1
    by_lang = repository_languages(repo_lang)
    by_file = {lang for lang, repos in by_lang.items() if len(repos) < by_file_below}
    file_repos = {r for lang in by_file for r in by_lang[lang]}
    assignment = assign_repositories({r: c for r, c in repo_lang.items() if r not in file_repos},
                                     valid_fraction, test_fraction, seed)
    file_assignment = _assign_small_languages(shards, by_lang, by_file, valid_fraction, test_fraction, seed)
    sigs = np.load(corpus / "minhash.npy", mmap_mode="r") if (corpus / "minhash.npy").is_file() else None
    index_pos = _index_positions(corpus) if sigs is not None else None
    stats: dict = {s: {} for s in SPLITS}
    meta: dict[str, list[dict]] = {s: [] for s in SPLITS}
    test_tables = []
    for i, p in enumerate(shards):
        table = pq.read_table(p)
        splits = pa.array([assignment.get(r) or file_assignment[(r, f)]
                           for r, f in zip(table.column("repo").to_pylist(), table.column("path").to_pylist())])
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
    splits = {s: {lang: {"repositories": len(e["repositories"]), "files": e["files"], "bytes": e["bytes"]}
                  for lang, e in sorted(stats[s].items())} for s in SPLITS}
    warnings = split_warnings(splits, {"valid": valid_fraction, "test": test_fraction},
                              {lang: len(repos) for lang, repos in by_lang.items()}, by_file)
    summary = {
        "corpus": str(corpus), "seed": seed, "valid_fraction": valid_fraction, "test_fraction": test_fraction,
        "by_file_below": by_file_below, "split_by_file": sorted(by_file),
        "splits": splits, "heldout_files": heldout_n, "warnings": warnings,
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
    if by_file:
        md += ["", f"Split by file (fewer than {by_file_below} repositories; their splits share repositories): "
               + ", ".join(sorted(by_file))]
    if warnings:
        md += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    write_text(out / "split.md", "\n".join(md) + "\n")
    print("\n".join(md) + f"\n\nwrote {', '.join(SPLITS)}{', heldout' if heldout_n else ''} to {out}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return summary


def _assign_small_languages(shards: list[Path], by_lang: dict[str, list[str]], by_file: set[str],
                            valid_fraction: float, test_fraction: float, seed: int) -> dict[tuple[str, str], str]:
    """(repo, path) -> split for the files of the languages split by file."""
    # Deferred: the data extra's Parquet library, needed only where shards are read or written
    import pyarrow.parquet as pq

    lang_of = {r: lang for lang in by_file for r in by_lang[lang]}
    files: dict[str, list[tuple[str, str]]] = {}
    for p in shards if lang_of else []:  # a second pass over two columns, only when a language needs it
        t = pq.read_table(p, columns=["repo", "path"]).to_pydict()
        for repo, path in zip(t["repo"], t["path"]):
            if repo in lang_of:
                files.setdefault(lang_of[repo], []).append((repo, path))
    out: dict[tuple[str, str], str] = {}
    for fs in files.values():
        out.update(assign_files(fs, valid_fraction, test_fraction, seed))
    return out


def _index_positions(corpus: Path) -> dict[tuple[str, str], int]:
    """(repo, path) -> row of the corpus's index.tsv / minhash.npy (both in the same order)."""
    # Deferred: the data extra's Parquet library, needed only where shards are read or written
    import pyarrow.parquet as pq

    rows = []
    for p in shard_paths(corpus):
        t = pq.read_table(p, columns=["repo", "path", "language"]).to_pydict()
        rows += zip(t["language"], t["repo"], t["path"])
    return {(repo, path): i for i, (lang, repo, path) in enumerate(sorted(rows))}
