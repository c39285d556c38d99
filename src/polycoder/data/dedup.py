"""Exact and near-duplicate detection: SHA-256 of bytes, and MinHash + LSH over token shingles.

Exact: PolyCoder deduplicated on the SHA-256 of each file's bytes; the copy kept is the
first in (repository, path) order, so the choice does not depend on the order of work.

Near: as The Stack (Kocetkov et al. 2022, BigCode's near-dedup): a file is the set of its
5-token shingles, tokens being runs of `[A-Za-z0-9_]` (all else is a separator); MinHash
(Broder 1997) with `num_perm` hash functions estimates the Jaccard similarity of two sets;
LSH (Indyk & Motwani) finds candidate pairs: two files are candidates when all `rows`
MinHash values of one of `bands` bands agree, which happens with probability
1 - (1 - s^rows)^bands for Jaccard s. The bands are chosen for recall: a pair at the
threshold is a candidate with probability at least `LSH_RECALL` (0.995), and among such
choices the one with the fewest candidates below the threshold (`lsh_params`). Balancing
false positives against false negatives instead (datasketch's `_optimal_param`, which we
used before) leaves a pair at the threshold a candidate only about half the time. The
candidates are then verified: a pair joins when its estimated Jaccard (the fraction of
equal MinHash values) reaches the threshold, every pair within an LSH bucket checked (The
Stack kept every candidate). Clusters are the connected components of the joined pairs;
each keeps its first file in (repository, path) order. Our own numpy implementation (no
datasketch/scipy dependency), checked in the tests against exact Jaccard on random sets
and on planted pairs of known similarity (benchmarks/near_dedup.py measures the same).

Hashes: a token's hash is the first 8 bytes of its BLAKE2b digest (the same in every
process, unlike Python's `hash`); a shingle's is a fixed linear combination of its
tokens' hashes modulo 2^64, folded to 32 bits; the permutations are multiply-add-shift
hashes `((a*x + b) mod 2^64) >> 32` with seeded odd `a`.

Limits: connected components may chain (A~B, B~C, A not ~ C): all but one are removed,
as in The Stack. Files with fewer than 5 tokens are one shingle of all their tokens. The
estimate itself has a standard deviation of sqrt(s (1 - s) / num_perm) (0.03 at s = 0.85
with 128 functions), so a pair just above the threshold is joined only about half the
time, and one a few deviations above it almost always. A bucket of more than
`EXHAUSTIVE_BUCKET` files (many near copies of one file) checks each file against one
member of each cluster found so far in it instead of against every member.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from polycoder.errors import PolycoderError

_TOKEN = re.compile(r"[A-Za-z0-9_]+")
_MULT = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                  0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x27D4EB2F165667C5, 0x94D049BB133111EB], dtype=np.uint64)


@dataclass(frozen=True)
class MinHashParams:
    """Settings of near-duplicate detection."""

    num_perm: int = 128
    """Number of MinHash functions (signature length)."""
    shingle: int = 5
    """Tokens per shingle (The Stack: 5)."""
    threshold: float = 0.85
    """Estimated Jaccard similarity at or above which two files are near duplicates (The Stack: 0.85)."""
    seed: int = 1
    """Seed of the hash functions; signatures made with different seeds do not compare."""

    def __post_init__(self) -> None:
        if not 16 <= self.num_perm <= 1024:
            raise PolycoderError(f"num_perm must be in 16..1024, got {self.num_perm}")
        if not 1 <= self.shingle <= len(_MULT):
            raise PolycoderError(f"shingle must be in 1..{len(_MULT)}, got {self.shingle}")
        if not 0.0 < self.threshold <= 1.0:
            raise PolycoderError(f"near-dedup threshold must be in (0, 1], got {self.threshold}")

    def permutations(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, 2**63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)
        return a, b


def _token_hash(tok: str) -> int:
    return int.from_bytes(hashlib.blake2b(tok.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def shingle_hashes(text: str, shingle: int = 5) -> np.ndarray:
    """The distinct 32-bit hashes of the text's `shingle`-token shingles (uint64 array)."""
    toks = _TOKEN.findall(text)
    if not toks:
        return np.zeros(0, dtype=np.uint64)
    ids: dict[str, int] = {}
    idx = np.fromiter((ids.setdefault(t, len(ids)) for t in toks), dtype=np.int64, count=len(toks))
    th = np.fromiter((_token_hash(t) for t in ids), dtype=np.uint64, count=len(ids))[idx]
    k = min(shingle, len(th))
    n = len(th) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h += th[j : j + n] * _MULT[j]
    h = (h >> np.uint64(32)) ^ (h & np.uint64(0xFFFFFFFF))
    return np.unique(h)


def minhash(text: str, params: MinHashParams, perms: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The MinHash signature of `text`: `num_perm` uint32 values (all 0xFFFFFFFF for a text without tokens)."""
    a, b = perms if perms is not None else params.permutations()
    x = shingle_hashes(text, params.shingle)
    sig = np.full(params.num_perm, 0xFFFFFFFF, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for s in range(0, len(x), 4096):  # blocks bound the memory: num_perm x 4096 x 8 bytes
            block = x[None, s : s + 4096]
            v = (a[:, None] * block + b[:, None]) >> np.uint64(32)
            np.minimum(sig, v.min(axis=1), out=sig)
    return sig.astype(np.uint32)


def estimated_jaccard(sigs: np.ndarray, sig: np.ndarray) -> np.ndarray:
    """The estimated Jaccard similarity of each signature of `sigs` [..., num_perm] with `sig`:
    the fraction of equal MinHash values."""
    return np.mean(sigs == sig, axis=-1)


LSH_RECALL = 0.995
"""The least probability that a pair exactly at the threshold becomes an LSH candidate."""
EXHAUSTIVE_BUCKET = 2048
"""Buckets up to this size check every pair of members; larger ones, one member a cluster."""


def candidate_probability(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """The probability that two files of Jaccard similarity s (a number or an array) share a
    band: 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - s ** rows) ** bands


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm: of those that make a pair at `threshold` a
    candidate with probability >= `recall`, the one with the least candidate probability
    integrated over similarities below the threshold (the fewest pairs to verify); if none
    reaches `recall` (few hash functions), the one that comes closest."""
    below = np.linspace(0.0, threshold, 41)
    best, best_key = None, None
    for r in range(1, num_perm + 1):
        for b in range(1, num_perm // r + 1):
            at = candidate_probability(threshold, b, r)
            key = (0, np.trapezoid(candidate_probability(below, b, r), below)) if at >= recall else (1, -at)
            if best_key is None or key < best_key:
                best, best_key = (b, r), key
    return best


def near_duplicate_clusters(signatures: np.ndarray, threshold: float, bands: int | None = None,
                            rows: int | None = None, verify: bool = True) -> np.ndarray:
    """Cluster ids (the smallest member index of each cluster) for signatures [N, num_perm].

    Row order is priority: a file whose cluster id differs from its own index is a near
    duplicate of an earlier file and is removed.
    """
    n, num_perm = signatures.shape
    if bands is None or rows is None:
        bands, rows = lsh_params(threshold, num_perm)
    parent = np.arange(n)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    empty = np.all(signatures == 0xFFFFFFFF, axis=1)  # files without any token never match
    sigs = np.ascontiguousarray(signatures)
    for band in range(bands):
        keys = np.ascontiguousarray(sigs[:, band * rows : (band + 1) * rows]).view(
            np.dtype((np.void, rows * sigs.itemsize))).ravel()
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for s, m in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = np.sort(order[s : s + m])
            members = members[~empty[members]]
            if len(members) < 2 or len({find(int(j)) for j in members}) == 1:
                continue  # nothing to join (a large bucket of near copies comes back in every band)
            labels = _bucket_clusters(sigs[members], threshold) if verify else np.zeros(len(members), dtype=np.int64)
            for j, label in zip(members, labels):
                ra, rb = find(int(members[label])), find(int(j))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def _bucket_clusters(block: np.ndarray, threshold: float) -> np.ndarray:
    """For the signatures [m, num_perm] of one LSH bucket: each member's cluster, as the index
    of the cluster's first member, joining the pairs whose estimated Jaccard reaches the
    threshold (every pair; in a bucket over EXHAUSTIVE_BUCKET, each member against the first
    member of each cluster so far)."""
    m = len(block)
    label = np.arange(m)
    exhaustive = m <= EXHAUSTIVE_BUCKET
    for i in range(1, m):
        earlier = np.arange(i) if exhaustive else np.unique(label[:i])
        sim = estimated_jaccard(block[earlier], block[i])
        joined = np.unique(label[earlier[sim >= threshold]])
        if len(joined):
            label[np.isin(label, joined)] = joined[0]  # joined[0]: the smallest, the earliest first member
            label[i] = joined[0]
    return label


def exact_duplicates(sha256: list[str]) -> np.ndarray:
    """For files in priority order, a boolean mask: True where an earlier file has the same hash."""
    seen: set[str] = set()
    out = np.zeros(len(sha256), dtype=bool)
    for i, h in enumerate(sha256):
        if h in seen:
            out[i] = True
        else:
            seen.add(h)
    return out


class NearIndex:
    """LSH buckets over a fixed set of signatures, queried with new ones (contamination checks)."""

    def __init__(self, signatures: np.ndarray, threshold: float):
        self.sigs = np.ascontiguousarray(signatures, dtype=np.uint32)
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, self.sigs.shape[1])
        self.buckets: list[dict[bytes, list[int]]] = []
        empty = np.all(self.sigs == 0xFFFFFFFF, axis=1)
        for band in range(self.bands):
            d: dict[bytes, list[int]] = {}
            block = self.sigs[:, band * self.rows : (band + 1) * self.rows]
            for i in np.flatnonzero(~empty):
                d.setdefault(block[i].tobytes(), []).append(int(i))
            self.buckets.append(d)

    def query(self, sig: np.ndarray) -> list[tuple[int, float]]:
        """(row, estimated Jaccard) of indexed signatures at or above the threshold, best first."""
        if np.all(sig == 0xFFFFFFFF):
            return []
        cand: set[int] = set()
        for band, d in enumerate(self.buckets):
            cand.update(d.get(np.ascontiguousarray(sig[band * self.rows : (band + 1) * self.rows]).tobytes(), ()))
        if not cand:
            return []
        ids = np.array(sorted(cand))
        sim = estimated_jaccard(self.sigs[ids], sig)
        hits = [(int(i), float(s)) for i, s in zip(ids, sim) if s >= self.threshold]
        return sorted(hits, key=lambda h: (-h[1], h[0]))
