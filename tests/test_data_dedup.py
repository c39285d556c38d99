"""MinHash and LSH against exact Jaccard similarity on random sets; exact dedup order."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from polycoder.data.dedup import (
    LSH_RECALL,
    MinHashParams,
    NearIndex,
    candidate_probability,
    exact_duplicates,
    lsh_params,
    minhash,
    near_duplicate_clusters,
    shingle_hashes,
)
from polycoder.errors import PolycoderError


def _text(rng: random.Random, n: int, vocab: int = 5000) -> list[str]:
    return [f"t{rng.randrange(vocab)}" for _ in range(n)]


def test_shingles_are_token_5_grams():
    assert len(shingle_hashes("a b c d e")) == 1
    assert len(shingle_hashes("a b c d e f")) == 2
    assert len(shingle_hashes("a.b(c) d-e f")) == 2          # punctuation only separates
    assert len(shingle_hashes("a b c d e a b c d e")) == 5    # distinct shingles only (abcde, bcdea, cdeab, deabc, eabcd)
    assert len(shingle_hashes("")) == 0 and len(shingle_hashes("x y")) == 1


def test_minhash_estimates_exact_jaccard():
    """Independent check: Jaccard of the Python sets of 5-gram tuples vs the signature estimate."""
    rng = random.Random(0)
    params = MinHashParams(num_perm=256)
    errors = []
    for _ in range(12):
        base = _text(rng, 400)
        other = list(base)
        for _ in range(rng.randrange(0, 120)):  # edit a random number of tokens
            other[rng.randrange(len(other))] = f"e{rng.randrange(10**6)}"
        def sh(toks):
            return {tuple(toks[i : i + 5]) for i in range(len(toks) - 4)}

        exact = len(sh(base) & sh(other)) / len(sh(base) | sh(other))
        est = float(np.mean(minhash(" ".join(base), params) == minhash(" ".join(other), params)))
        errors.append(abs(est - exact))
    # standard error of the estimate is sqrt(J(1-J)/256) <= 0.031; allow 4 sigma
    assert max(errors) < 0.125 and np.mean(errors) < 0.04


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.85, 0.95])
def test_lsh_bands_make_pairs_at_the_threshold_candidates(threshold):
    b, r = lsh_params(threshold, 128)
    assert b * r <= 128
    assert candidate_probability(threshold, b, r) >= LSH_RECALL
    assert candidate_probability(0.1, b, r) < 0.05  # unrelated files rarely share a bucket


def _shingles(toks: list[str]) -> set[tuple[str, ...]]:
    return {tuple(toks[i : i + 5]) for i in range(len(toks) - 4)}


def _binomial_tail(n: int, p: float, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _allowed(n: int, p: float, risk: float = 1e-6) -> int:
    """The fewest failures k such that more than k of n trials, each failing with probability
    at most p, happen with probability below `risk`."""
    k = 0
    while _binomial_tail(n, p, k + 1) >= risk:
        k += 1
    return k


@pytest.mark.parametrize("threshold", [0.7, 0.85])
def test_recall_and_precision_on_planted_pairs(threshold):
    """Pairs of known (exact) shingle Jaccard s planted among unrelated files.

    Treating each of the 128 hash functions as agreeing with probability s: LSH misses a pair
    with probability 1 - candidate_probability(s) (at most 1 - LSH_RECALL at the threshold;
    about half the time with the bands we used before), and verification joins it when at
    least ceil(threshold * 128) values agree (a binomial tail). The allowed counts of misses
    and false joins follow from those probabilities: more would happen with probability
    below one in a million."""
    rng = random.Random(7)
    params = MinHashParams(threshold=threshold)
    n_tok, pairs = 600, 240
    docs, planted = [], []
    for _ in range(pairs):
        base = _text(rng, n_tok, vocab=50000)
        other = list(base)
        target = rng.uniform(threshold - 0.2, min(1.0, threshold + 0.15))
        for _ in range(round(n_tok * (1 - target) / (5 * (1 + target)))):  # an edit changes up to 5 shingles
            other[rng.randrange(n_tok)] = f"e{rng.randrange(10**9)}"
        a, b = _shingles(base), _shingles(other)
        planted.append((len(docs), len(docs) + 1, len(a & b) / len(a | b)))
        docs += [" ".join(base), " ".join(other)]
    sigs = np.stack([minhash(d, params) for d in docs])
    bands, rows = lsh_params(threshold, params.num_perm)
    need = math.ceil(threshold * params.num_perm)  # equal values for an estimate >= threshold

    # LSH alone (no verification): every pair at or above the threshold is a candidate.
    candidates = near_duplicate_clusters(sigs, threshold, verify=False)
    assert all(candidates[i] == i for i, _, _ in planted)  # unrelated bases never collide
    at_or_above = [(i, j) for i, j, s in planted if s >= threshold]
    missed = sum(candidates[j] != candidates[i] for i, j in at_or_above)
    assert len(at_or_above) > 60
    assert missed <= _allowed(len(at_or_above), 1 - LSH_RECALL), (missed, len(at_or_above))

    # Verified: pairs 0.1 above the threshold are joined, pairs 0.1 below are not.
    cluster = near_duplicate_clusters(sigs, threshold)
    above = [(i, j) for i, j, s in planted if s >= threshold + 0.1]
    below = [(i, j) for i, j, s in planted if s <= threshold - 0.1]
    s_hi, s_lo = threshold + 0.1, threshold - 0.1
    p_miss = (1 - candidate_probability(s_hi, bands, rows)) + (1 - _binomial_tail(params.num_perm, s_hi, need))
    p_false = _binomial_tail(params.num_perm, s_lo, need)
    assert len(above) > 20 and len(below) > 40
    missed = sum(cluster[j] != cluster[i] for i, j in above)
    false = sum(cluster[j] == cluster[i] for i, j in below)
    assert missed <= _allowed(len(above), p_miss), (missed, len(above), p_miss)
    assert false <= _allowed(len(below), p_false), (false, len(below), p_false)


def test_clusters_find_planted_near_duplicates_only():
    rng = random.Random(1)
    params = MinHashParams()
    docs = [" ".join(_text(rng, 300)) for _ in range(30)]
    dup_of = {}
    for src in (3, 7, 7):
        toks = docs[src].split()
        toks[rng.randrange(len(toks))] = "changed"
        dup_of[len(docs)] = src
        docs.append(" ".join(toks))
    sigs = np.stack([minhash(d, params) for d in docs])
    cluster = near_duplicate_clusters(sigs, params.threshold)
    removed = {i for i in range(len(docs)) if cluster[i] != i}
    assert removed == set(dup_of)
    assert all(cluster[i] == src for i, src in dup_of.items())


def test_near_index_query():
    rng = random.Random(2)
    params = MinHashParams()
    docs = [" ".join(_text(rng, 200)) for _ in range(20)]
    index = NearIndex(np.stack([minhash(d, params) for d in docs]), 0.85)
    probe = docs[5].replace(docs[5].split()[10], "zzz", 1)
    hits = index.query(minhash(probe, params))
    assert hits and hits[0][0] == 5 and hits[0][1] >= 0.85
    assert index.query(minhash(" ".join(_text(rng, 200)), params)) == []
    assert index.query(minhash("", params)) == []  # no tokens: never a duplicate


def test_exact_duplicates_keep_the_first():
    assert exact_duplicates(["a", "b", "a", "c", "b"]).tolist() == [False, False, True, False, True]


def test_params_are_validated():
    with pytest.raises(PolycoderError):
        MinHashParams(threshold=0)
    with pytest.raises(PolycoderError):
        MinHashParams(num_perm=4)
