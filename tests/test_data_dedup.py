"""MinHash and LSH against exact Jaccard similarity on random sets; exact dedup order."""

from __future__ import annotations

import random

import numpy as np
import pytest

from polycoder.data.dedup import (
    MinHashParams,
    NearIndex,
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


def test_lsh_params_follow_the_threshold():
    b, r = lsh_params(0.85, 128)
    assert b * r <= 128
    s_star = (1 / b) ** (1 / r)  # the S-curve's steepest point lies near the threshold
    assert 0.7 < s_star < 0.95
    assert lsh_params(0.5, 128)[1] < r  # a lower threshold needs fewer rows a band


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
