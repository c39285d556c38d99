"""Benchmark: collect + dedup + tokenize on a corpus folder, against PolyCoder's original approach.

Stages, each timed on the same input:
  ours      collect scan (filters, SHA-256, MinHash; datatrove tasks on --workers processes),
            dedup reduce (majority language, exact + near dedup, final shards),
            tokenize (datatrove tasks, `tokenizers` batch encoding, token shards).
  original  one process walks the folders, reads each file of the 12 languages, drops files
            over 1 MB, lexes the whole file with Pygments to count tokens (drops < 100),
            hashes it with SHA-256 and keeps the first of each hash (Code-LMs `Data/`);
            tokenize: one process encoding file by file (`Tokenizer.encode`), as a
            single-worker GPT-NeoX `preprocess_data.py`.
MB/s and files/s are over the bytes and files of language files in the input (for
tokenize: the bytes and files of the collected corpus). Speed is reported as ratios in the
same run, never asserted.

    python benchmarks/data_pipeline.py CORPUS_DIR --repo-depth 2 --max-mb 200 --workers 2 \
        --tokenizer TOKENIZER_DIR --json results.json

CORPUS_DIR is a folder of repositories (at --repo-depth); --max-mb caps the input: for each
folder above the repositories (a language, in a {Language}/{source}/ layout) the smallest
repositories are taken up to its share of --max-mb, at least one each, so a capped run
still covers every language (and may exceed the cap by one large repository per folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from polycoder.corpus import iter_documents
from polycoder.data.collect import collect
from polycoder.data.engine import cpu_count
from polycoder.data.languages import language_of, pygments_token_count
from polycoder.data.sources import DEFAULT_SKIP_DIRS, _repositories, _walk
from polycoder.data.tokenize import tokenize_corpus
from polycoder.tokenizer import Tokenizer
from polycoder.tokenizer.train import train_tokenizer


def pick_repositories(root: Path, depth: int | None, max_mb: float) -> tuple[list[Path], int, int]:
    """Per parent folder (language), the smallest repositories first, up to max_mb / folders each
    (at least one per folder, so a capped run still covers every language)."""
    repos = _repositories(root, depth)
    groups: dict[str, list[tuple[int, int, Path]]] = {}
    for r in repos:
        sizes = [s for _, s in _walk(r, DEFAULT_SKIP_DIRS)]
        if sizes:
            groups.setdefault(str(r.parent), []).append((sum(sizes), len(sizes), r))
    budget = max_mb * 1e6 / max(len(groups), 1)
    picked, total, files = [], 0, 0
    for _, members in sorted(groups.items()):
        got = 0
        for size, n, r in sorted(members, key=lambda m: (m[0], str(m[2]))):
            if max_mb and got and got + size > budget:
                break
            picked.append(r)
            got += size
            total += size
            files += n
    return picked, total, files


def original_collect(repos: list[Path]) -> dict:
    """PolyCoder's approach in one process: walk, size filter, full Pygments lex, SHA-256 dedup."""
    seen: set[str] = set()
    kept = files = nbytes = 0
    t0 = time.perf_counter()
    for repo in repos:
        for dirpath, dirnames, filenames in os.walk(repo):
            dirnames.sort()
            for fn in sorted(filenames):
                lang = language_of(fn)
                path = os.path.join(dirpath, fn)
                if lang is None or os.path.islink(path):
                    continue
                try:
                    data = open(path, "rb").read()
                except OSError:
                    continue
                files += 1
                nbytes += len(data)
                if len(data) > 1_048_576:
                    continue
                text = data.decode("utf-8", errors="ignore")
                if pygments_token_count(text, lang) < 100:
                    continue
                h = hashlib.sha256(data).hexdigest()
                if h in seen:
                    continue
                seen.add(h)
                kept += 1
    return {"seconds": time.perf_counter() - t0, "files": files, "bytes": nbytes, "kept": kept}


def original_tokenize(corpus: Path, tokenizer_dir: Path) -> dict:
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    t0 = time.perf_counter()
    n = nb = nt = 0
    for d in iter_documents(corpus, columns=["text"]):
        ids = tok.encode(d["text"])
        n += 1
        nb += len(d["text"].encode())
        nt += len(ids) + 1
    return {"seconds": time.perf_counter() - t0, "files": n, "bytes": nb, "tokens": nt}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path, help="folder of repositories (or of folders of repositories)")
    ap.add_argument("--repo-depth", type=int, default=None, help="depth of repositories under CORPUS (collect's --repo-depth)")
    ap.add_argument("--max-mb", type=float, default=200.0, help="MB of language files to take (0: all)")
    ap.add_argument("--workers", type=int, default=0, help="processes for our stages (0: all CPUs)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer folder for the tokenize stage (default: train one on the collected corpus, 16384 tokens)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--skip-original", action="store_true", help="time only our stages")
    ap.add_argument("--json", type=Path, default=Path("data_pipeline.json"), help="where to write the results")
    args = ap.parse_args(argv)

    workers = args.workers or cpu_count()
    repos, in_bytes, in_files = pick_repositories(args.corpus, args.repo_depth, args.max_mb)
    if not repos:
        sys.exit(f"no repositories with code of the 12 languages under {args.corpus}")
    work = args.work or Path(tempfile.mkdtemp(prefix="pc-bench-"))
    print(f"input: {len(repos)} repositories, {in_files:,} language files, {in_bytes / 1e6:,.1f} MB; "
          f"workers {workers}; scratch {work}", flush=True)
    results: dict = {"input": {"root": str(args.corpus), "repositories": len(repos), "files": in_files,
                               "bytes": in_bytes}, "workers": workers, "stages": {}}
    # ours: collect (scan + reduce); warm the page cache for both sides alike first
    for r in repos:
        for rel, _ in _walk(r, DEFAULT_SKIP_DIRS):
            try:
                with open(r / rel, "rb") as f:
                    f.read()
            except OSError:
                pass
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    t0 = time.perf_counter()
    summary = collect([str(r) for r in repos], corpus, workers=workers, repo_depth=0, resume=False)
    t_collect = time.perf_counter() - t0
    sec = summary["seconds"]
    st = results["stages"]
    st["ours: collect (walk + filters + SHA-256 + MinHash)"] = {"seconds": sec["plan"] + sec["scan"],
                                                               "files": in_files, "bytes": in_bytes}
    st["ours: dedup (exact + near) + write shards"] = {"seconds": sec["reduce"], "files": in_files, "bytes": in_bytes}
    st["ours: collect + dedup total"] = {"seconds": t_collect, "files": in_files, "bytes": in_bytes}
    results["collect_summary"] = {k: summary[k] for k in ("languages", "total", "removed")}
    if not args.skip_original:
        o = original_collect(repos)
        st["original: walk + Pygments + SHA-256 (1 process)"] = {"seconds": o["seconds"],
                                                                 "files": o["files"], "bytes": o["bytes"]}
        results["original_kept"] = o["kept"]
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        tokenizer_dir = work / "tokenizer"
        t0 = time.perf_counter()
        train_tokenizer(corpus, tokenizer_dir, vocab_size=16384, sample=0.25)
        st["ours: tokenizer train (25 % sample, 16384)"] = {"seconds": time.perf_counter() - t0,
                                                            "files": summary["total"]["files"],
                                                            "bytes": summary["total"]["bytes"]}
    t0 = time.perf_counter()
    meta = tokenize_corpus(corpus, tokenizer_dir, work / "tokens", workers=workers, resume=False)
    t_tok = time.perf_counter() - t0
    cb, cf = summary["total"]["bytes"], summary["total"]["files"]
    st["ours: tokenize -> shards"] = {"seconds": t_tok, "files": cf, "bytes": cb, "tokens": meta["splits"]["train"]["tokens"]}
    if not args.skip_original:
        o = original_tokenize(corpus, tokenizer_dir)
        st["original: tokenize file by file (1 process)"] = {"seconds": o["seconds"], "files": o["files"], "bytes": o["bytes"],
                                                             "tokens": o["tokens"]}
    for v in st.values():
        v["MB/s"] = v["bytes"] / 1e6 / max(v["seconds"], 1e-9)
        v["files/s"] = v["files"] / max(v["seconds"], 1e-9)
    lines = ["| stage | seconds | MB/s | files/s |", "|---|---:|---:|---:|"]
    for name, v in st.items():
        lines.append(f"| {name} | {v['seconds']:.1f} | {v['MB/s']:.2f} | {v['files/s']:,.0f} |")
    if not args.skip_original:
        ours_c = st["ours: collect + dedup total"]["seconds"]
        orig_c = st["original: walk + Pygments + SHA-256 (1 process)"]["seconds"]
        ours_t = st["ours: tokenize -> shards"]["seconds"]
        orig_t = st["original: tokenize file by file (1 process)"]["seconds"]
        results["speedup"] = {"collect+dedup vs original": orig_c / ours_c, "tokenize vs original": orig_t / ours_t}
        lines += ["", f"collect + exact + near dedup: {orig_c / ours_c:.2f}x the original's walk + Pygments + SHA-256 "
                      f"(which has no near dedup); tokenize: {orig_t / ours_t:.2f}x file-by-file encoding"]
    results["tokenizer"] = str(tokenizer_dir)
    results["table"] = "\n".join(lines)
    print("\n" + results["table"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
