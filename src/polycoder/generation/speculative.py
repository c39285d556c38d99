"""Speculative decoding with prompt-lookup drafts: several tokens a forward pass, same output.

Code completion repeats its context: identifiers, calls, whole lines. Prompt lookup
(Saxena, 2023; transformers' `prompt_lookup_num_tokens`) guesses the next tokens by
finding the last few tokens earlier in the prompt or the completion and proposing what
followed them there. The engine then runs the last token and the k guesses through the
model in one forward pass (k + 1 positions of the same row: on a CPU that is about the
cost of one token, since the weights are read once) and keeps the guesses the model
agrees with.

Exactness (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al., 2023): the draft is a point mass q on the guessed token d.
- Greedy: keep d while it is the argmax; the first disagreement's argmax is the next
  token. The output is token for token that of plain greedy decoding.
- Sampling: keep d with probability min(1, p(d)/q(d)) = p(d), where p is the row's target
  distribution after temperature, top-k and top-p; after a rejection the next token is
  drawn from max(0, p - q) normalised, which is p without d. The tokens are distributed
  as plain sampling's (the draws differ, so a seed gives another sample than without
  speculation).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
import torch.nn.functional as F

from polycoder.generation.sampling import SamplingParams

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


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampling row draws from [V]: softmax(logits / T) restricted to its
    top_k and top_p set (the set `sampling.sample_tokens` keeps), renormalised."""
    probs = F.softmax(logits.float() / params.temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    remove = (sorted_p.cumsum(0) - sorted_p) >= params.top_p  # the first token always stays
    if params.top_k > 0:
        remove[params.top_k :] = True
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_p.masked_fill(remove, 0.0))
    return kept / kept.sum()


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [V] by inverting its CDF at a uniform draw of `generator`."""
    cdf = probs.cumsum(0)
    u = torch.rand((), generator=generator).to(cdf.dtype) * cdf[-1]
    return int(torch.searchsorted(cdf, u[None], right=True).clamp_max(probs.numel() - 1))


def accept(logits: torch.Tensor, drafts: list[int], params: SamplingParams,
           generator: torch.Generator) -> tuple[int, int | None]:
    """How many of `drafts` the target keeps, given logits [len(drafts) + 1, V] of the row's
    last token and each draft; and for sampling, the draft refused at that point (the next
    token is drawn without it), else None."""
    for i, d in enumerate(drafts):
        if params.temperature == 0:
            if int(logits[i].argmax()) != d:
                return i, None
        elif torch.rand((), generator=generator) >= target_probs(logits[i], params)[d]:
            return i, d
    return len(drafts), None


def draw_without(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, refused: int) -> int:
    """The next token after the draft `refused` was rejected: from p without it, renormalised."""
    probs = target_probs(logits, params)
    probs[refused] = 0.0
    if float(probs.sum()) <= 0.0:  # p was all on the refused token: it cannot have been refused
        raise RuntimeError("speculative sampling: a draft with probability 1 was rejected")
    return draw(probs / probs.sum(), generator)
