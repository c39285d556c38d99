"""Contamination check: are evaluation items in the training data?

What it implements: PolyCoder published an index of `{language}__{org}__{project}__{path}
<TAB>sha256` for every training file so that test sets can be checked (Xu et al. 2022,
sec. 3); `polycoder data collect` writes the same index for our corpora. This verb checks
- HumanEval: each problem's prompt, canonical solution and prompt + solution (the whole
  function), and
- perplexity test files (a folder with one sub-folder a language, or a corpus folder)
against it: exact matches by SHA-256 of the bytes, and near duplicates by MinHash + LSH
with `polycoder.data.dedup` (estimated Jaccard >= threshold, The Stack's 0.85 by default):
against the training signatures stored beside the index (minhash.npy / minhash.json, as
`polycoder data collect` and `data split` write them; found as `polycoder data overlap`
finds them), or, when `--corpus` is given, against the signatures of every file of that
training corpus, computed here (5-token shingles).

Limits: exact matching is file-level (a HumanEval function pasted inside a larger training
file is not an exact match; the near-duplicate pass finds it only if the file is mostly that
function); near-duplicate search with `--corpus` reads the whole training corpus once;
without `--corpus` or stored signatures (a published index has only hashes) only exact
matches are checked, and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
from tqdm import tqdm

from polycoder.corpus import count_documents, index_key, iter_documents, read_index
from polycoder.data.dedup import MinHashParams, NearIndex, minhash
from polycoder.data.overlap import training_signatures
from polycoder.errors import PolycoderError
from polycoder.eval.humaneval import load_problems
from polycoder.eval.perplexity import LANGUAGES, read_documents
from polycoder.files import write_text
from polycoder.options import Alias


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def humaneval_items(problems_file: Path | None = None) -> list[dict]:
    items = []
    for tid, p in load_problems(problems_file).items():
        for part, text in (("prompt", p["prompt"]), ("solution", p["canonical_solution"]),
                           ("prompt+solution", p["prompt"] + p["canonical_solution"])):
            items.append({"set": "humaneval", "name": f"{tid}:{part}", "text": text,
                          "sha256": _sha(text.encode())})
    return items


def data_items(data: Path) -> list[dict]:
    """Items of a perplexity data folder; folder files hashed as stored (their bytes)."""
    data = Path(data)
    items = []
    folders = [d for d in data.iterdir() if d.is_dir() and d.name in LANGUAGES] if data.is_dir() else []
    if folders and not list(data.glob("*.parquet")):
        for folder in sorted(folders):
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                raw = path.read_bytes()
                items.append({"set": "perplexity", "name": str(path.relative_to(data)),
                              "text": raw.decode("utf-8", errors="replace"), "sha256": _sha(raw)})
        return items
    for doc in read_documents(data):
        items.append({"set": "perplexity", "name": doc.name, "text": doc.text, "sha256": doc.sha256})
    return items


def near_duplicates(items: list[dict], corpus: Path, threshold: float) -> list[dict]:
    """(item, training file, estimated Jaccard) for pairs at or above threshold."""
    if not items:
        return []
    params = MinHashParams(threshold=threshold)
    perms = params.permutations()
    index = NearIndex(np.stack([minhash(it["text"], params, perms) for it in items]), threshold)
    found = []
    split = None if list(Path(corpus).glob("*.parquet")) else "train"
    total = count_documents(corpus, split)
    for doc in tqdm(iter_documents(corpus, split=split, columns=["repo", "path", "language", "text"]),
                    total=total, desc="near duplicates", unit="file", file=sys.stderr):
        for i, j in index.query(minhash(doc["text"], params, perms)):
            found.append({"set": items[i]["set"], "name": items[i]["name"],
                          "training_file": index_key(doc["language"], doc["repo"], doc["path"]),
                          "jaccard": round(j, 4)})
    return found


def near_stored(items: list[dict], index: Path, threshold: float) -> list[dict] | None:
    """Near duplicates against the signatures stored beside `index`; None where there are none."""
    found = training_signatures(index, threshold)
    if found is None:
        return None
    keys, params, near_index = found
    perms = params.permutations()
    out = []
    for it in items:
        for row, j in near_index.query(minhash(it["text"], params, perms)):
            out.append({"set": it["set"], "name": it["name"], "training_file": keys[row], "jaccard": round(j, 4)})
    return out


def contamination(
    index: Path,
    out: Path,
    data: Path | None = None,
    humaneval: bool = True,
    corpus: Path | None = None,
    near_threshold: Annotated[float, Alias("--threshold")] = 0.85,
    problems_file: Path | None = None,
) -> dict:
    """Check evaluation sets against a training index (exact) and corpus (near duplicates).

    Args:
        index: the training index.tsv (`NAME<TAB>sha256` lines; ours or PolyCoder's).
        out: output folder (contamination.json, contamination.md).
        data: perplexity test files (language sub-folders or a corpus folder) to check too.
        humaneval: check HumanEval's prompts and canonical solutions.
        corpus: the training corpus (Parquet shards) for the near-duplicate pass (default: the MinHash
            signatures beside the index, minhash.npy and minhash.json, when they are there).
        near_threshold: estimated Jaccard similarity that counts as a near duplicate (as in `data collect`
            and `data overlap`; --threshold is its old name).
        problems_file: another HumanEval-format problem file.
    """
    train = read_index(index)
    items: list[dict] = []
    if humaneval:
        items += humaneval_items(problems_file)
    if data is not None:
        items += data_items(Path(data))
    if not items:
        raise PolycoderError("nothing to check: pass --data DIR and/or keep --humaneval")
    exact = [{"set": it["set"], "name": it["name"], "sha256": it["sha256"],
              "training_file": train[it["sha256"]]} for it in items if it["sha256"] in train]
    if corpus is not None:
        near, near_source = near_duplicates(items, Path(corpus), near_threshold), f"signatures of {corpus}"
    else:
        near, near_source = near_stored(items, Path(index), near_threshold), f"minhash.npy beside {index}"
        if near is None:
            near_source = None
            print(f"note: no minhash.npy/minhash.json beside {index} and no --corpus: exact matches only "
                  "(pass --corpus TRAINING_CORPUS, or collect with --near-dedup)", file=sys.stderr)
    report = {"index": str(index), "training_files": len(train), "near_duplicates_from": near_source, "sets": {}}
    for name in sorted({it["set"] for it in items}):
        report["sets"][name] = {
            "items": sum(it["set"] == name for it in items),
            "exact_matches": [e for e in exact if e["set"] == name],
            "near_duplicates": None if near is None else [n for n in near if n["set"] == name],
        }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "contamination.json", json.dumps(report, indent=2) + "\n")
    lines = [f"# Contamination check against {index} ({len(train)} training files)", "",
             "| evaluation set | items | exact matches | near duplicates |", "|---|---|---|---|"]
    for name, r in report["sets"].items():
        nd = "not checked" if r["near_duplicates"] is None else str(len(r["near_duplicates"]))
        lines.append(f"| {name} | {r['items']} | {len(r['exact_matches'])} | {nd} |")
    for r in report["sets"].values():
        for e in r["exact_matches"][:50]:
            lines.append(f"- exact: {e['name']} = {e['training_file']}")
        for n in (r["near_duplicates"] or [])[:50]:
            lines.append(f"- near ({n['jaccard']}): {n['name']} ~ {n['training_file']}")
    write_text(out / "contamination.md", "\n".join(lines) + "\n")
    print("\n".join(lines[:6 + len(report["sets"])]))
    return report
