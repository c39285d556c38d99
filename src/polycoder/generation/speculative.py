"""Speculative decoding with prompt-lookup drafts: several tokens a forward pass, same output.

Code completion repeats its context: identifiers, calls, whole lines. Prompt lookup
(Saxena, 2023; transformers' `prompt_lookup_num_tokens`) guesses the next tokens by
finding the last few tokens earlier in the prompt or the completion and proposing what
followed them there. The engine then runs the last token and the k guesses through the
model in one forward pass (k + 1 positions of the same row: on a CPU that is about the
cost of one token, since the weights are read once) and keeps the guesses the model
agrees with.

Exactness, for greedy rows: the engine keeps a guess while it is the model's argmax, and
the first disagreement's argmax is the next token, so the tokens are those plain greedy
decoding picks. One caveat of floating point: the check computes k + 1 positions in one
pass, whose sums run in another order than k + 1 single steps (other kernel block shapes),
so two tokens whose logits tie to within that rounding could be ordered the other way; in
our runs (benchmarks/speculative.py, tests) every completion was the plain one.

Sampling rows are not speculated. The standard rule (Leviathan et al., 2023; Chen et al.,
2023: keep a guess d with probability p(d), else draw from p without d) keeps the
distribution, but it draws from a row's generator once a guess, and the number of guesses
a row gets depends on what else shares the batch (the engine shares one verifying pass
among the rows): a seed would then give another sample in another batch, which seeded
evaluation and the server's `seed` promise not to do.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

MAX_NGRAM = 3
"""Longest tail searched for; longer tails match less often and gained nothing in our runs."""


def lookup_draft(tokens: Seq[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens
    (n from max_ngram down to 1); [] when the tail occurs nowhere earlier."""
    L = len(tokens)
    if k <= 0 or L < 2:
        return []
    for n in range(min(max_ngram, L - 1), 0, -1):
        tail = list(tokens[L - n :])
        first = tail[0]
        for start in range(L - n - 1, -1, -1):  # the most recent occurrence first: code repeats what is near
            if tokens[start] == first and list(tokens[start : start + n]) == tail:
                return list(tokens[start + n : start + n + k])
    return []


def accept(logits: torch.Tensor, drafts: list[int]) -> int:
    """How many of `drafts` a greedy row keeps, given logits [len(drafts) + 1, V] of its last
    token and of each draft: the guesses up to the first that is not the argmax."""
    for i, d in enumerate(drafts):
        if int(logits[i].argmax()) != d:
            return i
    return len(drafts)
