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

Exactness, for sampling rows: a row's token at each position is drawn from its own
generator with one uniform draw a token (`polycoder.generation.sampling.sample_tokens`:
inverse CDF over the filtered distribution). A guess d at a position is kept when the token
that plain sampling would draw there, from the verified logits with the row's next draw,
is d (`accept_sampled`); at the first that is not, that draw is kept for the token the row
takes there (`Guessing.next_uniform`). Each token thus uses the draw and the distribution
plain sampling gives it, so a seed gives the same sample as without speculation, whatever
shares the batch, and a guess is kept with probability p(d): the standard rule
(Leviathan et al., 2023; Chen et al., 2023) for a guess that is certain, with its
randomness coupled to the plain sampler's. The caveat of floating point above applies.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from polycoder.backend import Backend
from polycoder.errors import PolycoderError
from polycoder.generation.prompt_cache import PromptCache, prefill_reusing
from polycoder.generation.sampling import sample_tokens
from polycoder.model import GPTNeoX
from polycoder.tokenizer import Tokenizer

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


class Guessing:
    """A row's speculative decoding state: its prompt-lookup index, the draw made for its
    last refused guess, and whether guessing pays for it now.

    Prompt lookup (`draft`) gives `lookup_draft`'s guesses from an index of the row's n-grams
    (n <= MAX_NGRAM: the start of each one's latest occurrence), extended by the tokens
    added since the last step: a step costs O(1), where searching the whole text each step
    cost most of a step when nothing matched.

    A check costs more than a plain step (k + 1 positions; for a sampling row, the draws
    and the filtered distribution at each), so a row whose guesses are mostly refused
    (sampling at a high temperature, text that does not repeat) pauses guessing for
    PAUSE_STEPS steps, then tries again. The output never depends on either: only the speed."""

    MIN_RATE = 0.2
    """Below this moving average of the share of guesses kept, guessing pauses (at
    temperature 0.8 the bundled model kept 7-12 %: docs/benchmarks/README.md)."""
    PAUSE_STEPS = 16

    def __init__(self) -> None:
        self.next_uniform: torch.Tensor | None = None  # the draw of the last refused guess's position
        self.rate = 1.0  # moving average of the share of guesses kept, a check at a time
        self.pause = 0
        self._latest: list[dict[tuple[int, ...], int]] = [{} for _ in range(MAX_NGRAM + 1)]  # n -> n-gram -> start
        self._indexed = 0  # n-grams ending before this position are in the index

    def wants_guesses(self) -> bool:
        """Whether the row guesses this step (called once a step)."""
        if self.pause:
            self.pause -= 1
            return False
        return True

    def checked(self, drafted: int, kept: int) -> None:
        """Note a check's outcome: `kept` of `drafted` guesses kept."""
        self.rate = 0.7 * self.rate + 0.3 * kept / drafted
        if self.rate < self.MIN_RATE:
            self.pause, self.rate = self.PAUSE_STEPS, 2 * self.MIN_RATE  # a few refusals more and it pauses again

    def draft(self, tokens: Seq[int], k: int) -> list[int]:
        """`lookup_draft(tokens, k)`, from the index; `tokens` only ever grows between calls."""
        L = len(tokens)
        if k <= 0 or L < 2:
            return []
        for end in range(self._indexed, L - 1):  # not the tail itself: it ends at L - 1
            for n in range(1, min(MAX_NGRAM, end + 1) + 1):
                self._latest[n][tuple(tokens[end - n + 1: end + 1])] = end - n + 1
        self._indexed = max(self._indexed, L - 1)
        for n in range(min(MAX_NGRAM, L - 1), 0, -1):
            start = self._latest[n].get(tuple(tokens[L - n:]))
            if start is not None:
                return list(tokens[start + n: start + n + k])
        return []


def accept_sampled(logits: torch.Tensor, drafts: list[int], temperature: float, top_k: int, top_p: float,
                   generator: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """How many of `drafts` a sampling row keeps, given logits [len(drafts) + 1, V] of its last
    token and of each draft, and the uniform draw of the first position whose guess is not
    kept (None when all are): see the module. The generator is left having made one draw a
    kept guess, plus that one."""
    n = len(drafts)
    states, draws = [], []
    for _ in range(n):
        states.append(generator.get_state())
        draws.append(torch.rand((), generator=generator))
    states.append(generator.get_state())
    V = logits.size(-1)
    drawn = sample_tokens(logits[:n], torch.full((n,), temperature, device=logits.device),
                          torch.full((n,), min(top_k, V), device=logits.device),
                          torch.full((n,), top_p, device=logits.device), torch.stack(draws).to(logits.device)).tolist()
    kept = next((i for i, (t, d) in enumerate(zip(drawn, drafts)) if t != d), n)
    if kept == n:
        return n, None
    generator.set_state(states[kept + 1])
    return kept, draws[kept]


class DraftModel:
    """Drafts from a small model with the same tokenizer (e.g. PolyCoder-160M for 2.7B): its
    own KV cache, row r of it mirroring the engine's row r. Each step it first catches up on
    the tokens its cache has not seen (the last token, and what the target kept or chose
    differently), in one pass, then guesses k tokens greedily, a decode step each.

    Which tokens its cache holds is kept a row (`seen`), so a rejected guess is simply
    overwritten: only the prefix it shares with the row's tokens counts. With a `pool` (its
    own prompt cache: its keys and values are not the target's), a prompt's prefill reuses
    the prefix the pool holds, as the engine's does; without one it prefills in full.
    """

    def __init__(self, model: GPTNeoX, tokenizer: Tokenizer, max_rows: int, max_len: int, backend: Backend,
                 pool: PromptCache | None = None):
        if model.config.vocab_size < tokenizer.vocab_size:
            raise PolycoderError(f"the draft model has {model.config.vocab_size} vocabulary rows but the tokenizer "
                                 f"{tokenizer.vocab_size} tokens: a draft model needs the target's tokenizer")
        self.model, self.real_vocab, self.max_len = model, tokenizer.vocab_size, max_len
        self.cache = model.new_cache(max_rows, max_len)
        self.step = backend.decode_step(model, self.cache)
        self.seen: list[list[int]] = [[] for _ in range(max_rows)]
        self.pool = pool

    def start(self, row: int, prompt: list[int], copies: int, ops) -> None:
        """The prompt of rows row .. row + copies - 1, but its last token (fed with the first guesses)."""
        T = len(prompt) - 1
        if T > 0:
            prefill_reusing(self.model, list(prompt[:-1]), self.cache, row, ops, self.pool)
            self.cache.repeat_row(row, copies, T)
        for r in range(row, row + copies):
            self.seen[r] = list(prompt[:-1])

    def move(self, src: int, dst: int) -> None:
        self.cache.copy_rows([src], [dst], len(self.seen[src]))
        self.seen[dst] = self.seen[src]

    def propose(self, rows: list[list[int]], ks: list[int]) -> list[list[int]]:
        """Up to ks[b] greedy guesses after the tokens of each row b (rows 0..B-1 of the cache)."""
        k = max(ks)
        if k < 1:
            return [[] for _ in rows]
        valid = [_common_prefix(self.seen[b], toks) for b, toks in enumerate(rows)]
        missing = [toks[v:] for toks, v in zip(rows, valid)]
        T = max(len(m) for m in missing)
        # Padded positions run past a row's end (junk that later tokens overwrite); the last
        # guess is fed too, so every position up to len + k - 2 must lie in the cache.
        if any(v + T > self.max_len or len(toks) + k - 1 > self.max_len for toks, v in zip(rows, valid)):
            return [[] for _ in rows]
        device = self.cache.k[0].device
        x = torch.tensor([m + [m[-1]] * (T - len(m)) for m in missing], device=device)  # [B, T]
        pos = torch.tensor([[v + i for i in range(T)] for v in valid], device=device)  # [B, T]
        logits = self.step.verify(x, pos)  # [B, T, V]
        last = torch.tensor([len(m) - 1 for m in missing], device=device)
        guess = logits[torch.arange(len(rows), device=device), last, : self.real_vocab].argmax(-1)  # [B]
        drafts = [guess.tolist()]
        for j in range(1, k):
            p = [len(toks) - 1 + j for toks in rows]
            step = self.step(guess[:, None], torch.tensor(p, device=device)[:, None], max(p) + 1)  # [B, V]
            guess = step[:, : self.real_vocab].argmax(-1)
            drafts.append(guess.tolist())
        per_row = [list(d) for d in zip(*drafts)]  # [B][k]
        for b, toks in enumerate(rows):
            self.seen[b] = list(toks) + per_row[b][: k - 1]
        return [d[: kb] for d, kb in zip(per_row, ks)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
