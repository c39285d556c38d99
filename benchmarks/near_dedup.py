"""Near-duplicate detection: recall and precision on planted pairs, our LSH bands against the
balanced ones we used before, in one run.

Files of random tokens (`--tokens` each) are planted in pairs whose exact 5-token-shingle
Jaccard similarity spreads over [threshold - 0.2, threshold + 0.15], among `--unrelated`
files that share nothing. Both choices of LSH bands run `polycoder.data.dedup.
near_duplicate_clusters` on the same MinHash signatures (128 functions):

- recall: `lsh_params` (a pair at the threshold is a candidate with probability >= 0.995,
  then the fewest candidates below it), every pair of a bucket verified;
- balanced: datasketch's `_optimal_param` (false-positive and false-negative areas weighed
  equally), which the collector used before, with the same verification.

For each bin of exact similarity the table gives the share of pairs joined (recall above the
threshold, false joins below it), then the candidate pairs LSH produced and the clustering
time (this machine's, and a shared one: compare the two rows of one run).

    python benchmarks/near_dedup.py --json docs/benchmarks/near-dedup-DATE.json

Writes JSON (and Markdown next to it); prints a table. Nothing here is asserted; the test
with the same construction is tests/test_data_dedup.py.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
from machine import cpu_description
from report import publish

from polycoder.data.dedup import (
    MinHashParams,
    candidate_probability,
    lsh_params,
    minhash,
    near_duplicate_clusters,
)


def balanced_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's `_optimal_param` with equal weights: the bands we used before."""
    below, above = np.linspace(0.0, threshold, 41), np.linspace(threshold, 1.0, 41)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid([candidate_probability(s, b, r) for s in below], below)
            fn = np.trapezoid([1 - candidate_probability(s, b, r) for s in above], above)
            if (fp + fn) / 2 < best_err:
                best, best_err = (b, r), (fp + fn) / 2
    return best


def shingles(toks: list[str]) -> set[tuple[str, ...]]:
    return {tuple(toks[i : i + 5]) for i in range(len(toks) - 4)}


def planted_corpus(threshold: float, pairs: int, unrelated: int, n_tok: int, seed: int):
    """Texts and (i, j, exact Jaccard) of the planted pairs."""
    rng = random.Random(seed)

    def text() -> list[str]:
        return [f"t{rng.randrange(10**6)}" for _ in range(n_tok)]

    docs, planted = [], []
    for _ in range(pairs):
        base = text()
        other = list(base)
        target = rng.uniform(threshold - 0.2, min(1.0, threshold + 0.15))
        for _ in range(round(n_tok * (1 - target) / (5 * (1 + target)))):  # an edit changes up to 5 shingles
            other[rng.randrange(n_tok)] = f"e{rng.randrange(10**9)}"
        a, b = shingles(base), shingles(other)
        planted.append((len(docs), len(docs) + 1, len(a & b) / len(a | b)))
        docs += [" ".join(base), " ".join(other)]
    docs += [" ".join(text()) for _ in range(unrelated)]
    return docs, planted


def candidate_pairs(sigs: np.ndarray, bands: int, rows: int) -> int:
    """Pairs that share at least one band (what verification has to look at)."""
    seen: set[tuple[int, int]] = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for i, sig in enumerate(sigs):
            buckets.setdefault(sig[band * rows : (band + 1) * rows].tobytes(), []).append(i)
        for members in buckets.values():
            seen.update((a, b) for k, a in enumerate(members) for b in members[k + 1 :])
    return len(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write results here (and .md beside it)")
    ap.add_argument("--thresholds", default="0.7,0.85")
    ap.add_argument("--pairs", type=int, default=600)
    ap.add_argument("--unrelated", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    results = {"cpu": cpu_description(), "pairs": args.pairs, "unrelated": args.unrelated,
               "tokens": args.tokens, "num_perm": MinHashParams().num_perm, "runs": []}
    lines = [f"# Near-duplicate recall on planted pairs ({args.pairs} pairs, {args.unrelated} unrelated files, "
             f"{args.tokens} tokens a file, {results['num_perm']} MinHash functions; CPU {results['cpu']['model']})", ""]
    for threshold in (float(t) for t in args.thresholds.split(",")):
        params = MinHashParams(threshold=threshold)
        perms = params.permutations()
        docs, planted = planted_corpus(threshold, args.pairs, args.unrelated, args.tokens, args.seed)
        sigs = np.stack([minhash(d, params, perms) for d in docs])
        edges = [threshold - 0.2, threshold - 0.1, threshold - 0.05, threshold, threshold + 0.03,
                 threshold + 0.06, threshold + 0.1, 1.0001]
        bins = list(zip(edges[:-1], edges[1:]))
        lines += [f"## threshold {threshold}", "",
                  "| bands | " + " | ".join(f"J [{lo:.2f}, {min(hi, 1):.2f})" for lo, hi in bins)
                  + " | candidate pairs | cluster s |", "|---|" + "---|" * (len(bins) + 2)]
        for name, (bands, rows) in (("recall", lsh_params(threshold, params.num_perm)),
                                    ("balanced", balanced_params(threshold, params.num_perm))):
            start = time.perf_counter()
            cluster = near_duplicate_clusters(sigs, threshold, bands=bands, rows=rows)
            seconds = time.perf_counter() - start
            joined = []
            for lo, hi in bins:
                sel = [(i, j) for i, j, s in planted if lo <= s < hi]
                joined.append({"lo": lo, "hi": hi, "pairs": len(sel),
                               "joined": sum(int(cluster[i] == cluster[j]) for i, j in sel) / max(1, len(sel))})
            unrelated_merged = int(sum(cluster[i] != i for i in range(2 * args.pairs, len(docs))))
            run = {"threshold": threshold, "bands": name, "b": bands, "r": rows,
                   "candidate_probability_at_threshold": candidate_probability(threshold, bands, rows),
                   "bins": joined, "candidate_pairs": candidate_pairs(sigs, bands, rows),
                   "unrelated_merged": unrelated_merged, "cluster_seconds": seconds}
            results["runs"].append(run)
            lines.append(f"| {name} ({bands} x {rows}) | " + " | ".join(
                f"{100 * b['joined']:.0f} % ({b['pairs']})" for b in joined)
                + f" | {run['candidate_pairs']} | {seconds:.2f} |")
        lines.append("")
    lines += ["Each cell: the share of the bin's planted pairs joined (number of pairs in brackets). "
              "Below the threshold that share is a false join; above it, recall. "
              "No unrelated file was merged: " + str(all(r["unrelated_merged"] == 0 for r in results["runs"])) + "."]
    text = "\n".join(lines) + "\n"
    publish(results, text, args.json)


if __name__ == "__main__":
    main()
