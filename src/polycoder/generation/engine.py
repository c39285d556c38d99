"""Continuous batching over one preallocated KV cache (after gpt-fast and nanochat).

`Engine` owns one KV cache of `max_rows` rows and one decode step chosen for this machine
(`polycoder.backend.Backend.decode_step`: the native CPU kernels, CUDA graphs, or
PyTorch's). `add` prefills a prompt once into a free row and copies that row to its
other n-1 samples; `step` samples one token for every active row, retires finished rows
(moving the last rows into the holes, so active rows are always 0..B-1) and runs one
decode step for the rest; with `speculate=k`, rows that have a prompt-lookup draft verify up
to k guessed tokens in that forward pass instead (`polycoder.generation.speculative`).
Rows join and leave between steps: `generate`, `stream`, the evaluation's sampling and the
server all run on it. With `prompt_cache_mb`, a prompt's prefill reuses the keys and values
of the longest token prefix it shares with a recent prompt (`polycoder.generation.prompt_cache`;
the server turns it on, for editors that resend the file every few keystrokes). Beam search
(`polycoder.generation.beam`) uses its model calls, `prefill` and `decode`, and the
cache's row copies directly.

The model is never changed by the engine, except that PyTorch's CPU decode step lays fp32
weights out for faster products once (`polycoder.backend.decode.decode_layout`: same
names, shapes and values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from polycoder.backend import Backend, choose
from polycoder.backend.decode import prefill  # noqa: F401  (re-exported by polycoder.generation)
from polycoder.errors import PolycoderError
from polycoder.generation.penalties import penalize
from polycoder.generation.prompt_cache import PromptCache, kv_bytes_per_token, prefill_reusing
from polycoder.generation.sampling import sample_tokens
from polycoder.generation.speculative import DraftModel, Guessing, accept, accept_sampled
from polycoder.generation.text import Sequence
from polycoder.model import CacheRows, GPTNeoX  # noqa: F401  (CacheRows: re-exported by polycoder.generation)
from polycoder.tokenizer import Tokenizer


@dataclass
class Event:
    """What one step produced for one sequence."""

    sequence: Sequence
    text: str
    finished: bool


class Engine:
    """Continuous batching over one preallocated KV cache of `max_rows` rows.

    `backend`: the fast paths to use (default `polycoder.backend.choose` for the model's
    device); `compile`: torch.compile the decode step on a GPU (refused on a CPU, where torch
    2.13 miscompiled it: `polycoder.backend.CPU_COMPILE_REFUSED`); `static_shapes`: the
    CUDA-graph step's padded shapes, run eagerly on the CPU when True (tests); `speculate`:
    draft tokens a row verifies a step (0: plain decoding), guessed by prompt lookup or,
    given a `draft_model` (same tokenizer), by that model;
    `prompt_cache_mb`: megabytes of recent prompts' keys and values kept for the next prompts
    that share a prefix with them (0: off; with a draft model its cache takes its share, by
    bytes a token, so that both hold the same prompts); `stats` counts the forward passes,
    the drafted and accepted tokens, and the prompt tokens prefilled (`prefilled`) and
    reused from the prompt cache (`reused`).

    Speculation pays while the verifying pass costs about what one decode step does: while
    its positions (rows x (drafts + 1)) fit the backend's `verify_positions` (on a CPU, the
    rows one weight-streaming pass takes). A larger batch gets fewer drafts a row, and none
    once each row would get less than one.
    """

    def __init__(self, model: GPTNeoX, tokenizer: Tokenizer, max_rows: int, max_len: int, compile: bool = False,
                 static_shapes: bool | None = None, backend: Backend | None = None, speculate: int = 0,
                 draft_model: GPTNeoX | None = None, prompt_cache_mb: float = 0):
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.max_len = max_rows, max_len
        self.cache = model.new_cache(max_rows, max_len)
        self.device = self.cache.k[0].device
        self.backend = backend or choose(self.device)
        self.decode_step = self.backend.decode_step(model, self.cache, compile=compile, static_shapes=static_shapes)
        self.prefill_ops = self.backend.prefill_ops(self.device)
        self.rows: list[Sequence] = []
        self.logits: torch.Tensor | None = None  # [B, V] next-token logits of each active row
        self.real_vocab = tokenizer.vocab_size
        if speculate < 0:
            raise PolycoderError(f"speculate must be >= 0 (draft tokens a step; 0: off), got {speculate}")
        if draft_model is not None and speculate < 1:
            raise PolycoderError("a draft model guesses the tokens speculation verifies: add --speculate N "
                                 "(speculate=N, e.g. 4)")
        self.speculate = speculate
        self.verify_positions = self.backend.verify_positions(self.device)
        if prompt_cache_mb < 0:
            raise PolycoderError(f"the prompt cache's size must be >= 0 MB (0: off), got {prompt_cache_mb}")
        pool_bytes = int(prompt_cache_mb * 2**20)
        draft_bytes = 0
        if draft_model is not None and pool_bytes:
            per_token, draft_per_token = kv_bytes_per_token(model), kv_bytes_per_token(draft_model)
            draft_bytes = pool_bytes * draft_per_token // (per_token + draft_per_token)
        self.prompt_cache = PromptCache(pool_bytes - draft_bytes) if pool_bytes else None
        # Guesses from a small model with the same tokenizer instead of prompt lookup.
        self.drafter = (DraftModel(draft_model, tokenizer, max_rows, max_len, self.backend,
                                   PromptCache(draft_bytes) if draft_bytes else None) if draft_model else None)
        self.stats = {"forwards": 0, "drafted": 0, "accepted": 0, "prefilled": 0, "reused": 0}
        # The prompt whose keys and values each cache row holds at its first positions (decode
        # steps write only later ones), for the prompt cache to skip copying what is there;
        # not kept where the decode step writes into free rows (static shapes' padding).
        self.held: list[np.ndarray | None] | None = (
            None if self.decode_step.writes_free_rows or self.prompt_cache is None else [None] * max_rows)

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.rows)

    # ---- the model calls ---------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: list[int], row: int, copies: int = 1, reuse: bool = True) -> torch.Tensor:
        """Prompt `ids` into cache row `row` (positions 0..T-1), copied to the next
        `copies - 1` rows; the next-token logits [1, V], fp32. The prompt cache, if on,
        supplies the longest prefix it holds (unless `reuse` is False) and keeps the prompt
        for later ones."""
        T = len(ids)
        if T == 0:
            raise PolycoderError("an empty prompt has nothing to continue: send at least one token")
        if T >= self.max_len:
            raise PolycoderError(f"prompt of {T} tokens does not fit the engine's {self.max_len}-token cache")
        held = None
        if self.held is not None:
            # Until this prefill succeeds, the rows hold parts of two prompts: trusted for neither.
            held, self.held[row : row + copies] = self.held[row], [None] * copies
        a = np.asarray(ids, dtype=np.int64)  # once, for the row's, the pool's and the store's comparisons
        logits, reused = prefill_reusing(self.model, a, self.cache, row, self.prefill_ops, self.prompt_cache,
                                         reuse, extend=self.decode_step.extend, held=held)
        self.stats["prefilled"] += T - reused
        self.stats["reused"] += reused
        self.cache.repeat_row(row, copies, T)  # the other samples copy the prefill
        if self.held is not None:
            self.held[row : row + copies] = [a] * copies
        return logits.float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of rows 0..B-1 at its position; next-token logits [B, V], fp32."""
        x = torch.tensor([[t] for t in tokens], device=self.device)  # [B, 1]
        pos = torch.tensor([[p] for p in positions], device=self.device)  # [B, 1]
        return self.decode_step(x, pos, max(positions) + 1)

    # ---- continuous batching -----------------------------------------------------------------

    @torch.inference_mode()
    def add(self, sequences: list[Sequence], reuse: bool = True) -> int:
        """Prefill one prompt once for `sequences` (all share its prompt ids) and join them;
        the prompt tokens run through the model (fewer than the prompt's when the prompt
        cache held a prefix of it; all of them with `reuse=False`)."""
        if not sequences:
            return 0
        n, r = len(sequences), len(self.rows)
        if n > self.free_rows:
            raise ValueError(f"{n} rows asked, {self.free_rows} free")
        before = self.stats["prefilled"]
        logits = self._mask(self.prefill(sequences[0].prompt_ids, r, copies=n, reuse=reuse)).expand(n, -1)
        if self.drafter is not None:
            self.drafter.start(r, sequences[0].prompt_ids, n, self.prefill_ops)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        for s in sequences:
            s.guessing = Guessing()
        self.rows.extend(sequences)
        return self.stats["prefilled"] - before

    @torch.inference_mode()
    def step(self, emit: Callable[[list[Event]], None] | None = None) -> list[Event]:
        """Sample a token for every row, retire finished rows, run one decode step. `emit`, if
        given, is handed the events as soon as they are final: before the decode step when no
        row speculates (a server streams each token a forward pass sooner: the first token
        of a request does not wait for the second's computation), after the drafts' check
        otherwise."""
        if not self.rows:
            return []
        rows = self.rows
        try:
            tokens = self._sample(rows, self.logits)
        except Exception:
            # One row's settings must never fail the batch: sample row by row, and end only
            # the rows that fail on their own (the caller sees finish_reason "error").
            tokens = []
            for i, s in enumerate(rows):
                try:
                    tokens.append(self._sample([s], self.logits[i : i + 1])[0])
                except Exception as e:
                    s.fail(e)
                    tokens.append(None)
        events: dict[int, Event] = {}
        for s, tok in zip(rows, tokens):
            if tok is not None:
                try:
                    # The new token sits at position s.length; it needs a cache slot to continue.
                    text = s.push(tok, room_left=s.length + 1 < self.max_len)
                except Exception as e:
                    text = s.fail(e)
            else:
                text = ""
            events[id(s)] = Event(s, text, s.done)
        self._retire([i for i, s in enumerate(rows) if s.done])
        drafts = self._drafts()
        self.stats["forwards"] += bool(self.rows)
        if any(drafts):
            self._verify(drafts, events)  # adds the accepted drafts' text to the events
        out = list(events.values())
        if emit is not None:  # the events are final: out before the decode step
            emit(out)
        if not any(drafts):
            if self.rows:
                # Active rows are always 0..B-1: the step reads rows [:B] of the cache.
                self.logits = self._mask(self.decode([s.token_ids[-1] for s in self.rows],
                                                     [s.length - 1 for s in self.rows]))
            else:
                self.logits = None
        return out

    # ---- speculative decoding ----------------------------------------------------------------

    def _drafts(self) -> list[list[int]]:
        """Each active row's guesses (prompt lookup, or the draft model's), within its token
        budget and the cache."""
        if not self.rows:
            return []
        # Every row's padded positions (up to its last + k) must lie in the cache: k is bounded
        # by the row nearest the cache's end too, so no position is clamped onto a real one.
        k = min(self.speculate, self.verify_positions // len(self.rows) - 1,
                min(self.max_len - s.length for s in self.rows))
        if k < 1:
            return []
        # A row still restoring the cursor's whitespace takes constrained tokens: no guesses;
        # nor does one whose guesses have lately been refused (`speculative.Guessing`), nor one
        # with repetition penalties (its logits change with each token it keeps).
        rooms = [min(k, s.params.max_new_tokens - len(s.token_ids))
                 if not s.healing and s.guessing.wants_guesses() and not s.params.penalties.active else 0
                 for s in self.rows]
        if self.drafter is not None:
            return self.drafter.propose([s.prompt_ids + s.token_ids for s in self.rows], rooms)
        return [s.guessing.draft(s.prompt_ids + s.token_ids, room) if room > 0 else []
                for s, room in zip(self.rows, rooms)]

    @torch.inference_mode()
    def _verify(self, drafts: list[list[int]], events: dict[int, Event]) -> None:
        """One forward pass over each row's last token and its drafts; keep what the model
        agrees with (`speculative.accept`), and the logits after the last kept token."""
        K = max(len(d) for d in drafts)
        x, pos = [], []
        for s, d in zip(self.rows, drafts):
            last = s.length - 1
            x.append([s.token_ids[-1], *d] + [d[-1] if d else s.token_ids[-1]] * (K - len(d)))
            # Padding positions hold junk keys past the row's end: later tokens overwrite them,
            # and the causal mask hides them from the real queries before them.
            pos.append([last + i for i in range(K + 1)])
        xt, pt = torch.tensor(x, device=self.device), torch.tensor(pos, device=self.device)  # [B, K+1]
        logits = self.decode_step.verify(xt, pt)  # [B, K+1, V], fp32
        logits = self._mask(logits.flatten(0, 1)).view(logits.shape)
        next_logits = []
        for b, (s, d) in enumerate(zip(self.rows, drafts)):
            p = s.params
            if p.temperature == 0 or not d:
                kept = accept(logits[b], d)
            else:
                kept, s.guessing.next_uniform = accept_sampled(logits[b], d, p.temperature, p.top_k, p.top_p, s.generator)
            if d:
                s.guessing.checked(len(d), kept)
            self.stats["drafted"] += len(d)
            self.stats["accepted"] += kept
            event = events.setdefault(id(s), Event(s, "", False))
            for tok in d[:kept]:
                event.text += s.push(tok, room_left=s.length + 1 < self.max_len)
                if s.done:
                    break
            event.finished = s.done
            next_logits.append(logits[b, min(kept, len(d))])
        self.logits = torch.stack(next_logits)
        self._retire([i for i, s in enumerate(self.rows) if s.done])

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token for each of `rows` from its logits, with its own settings and generator."""
        device = logits.device
        allowed = [s.allowed_tokens() for s in rows]  # token healing: polycoder.generation.text
        penalized = [i for i, s in enumerate(rows) if s.params.penalties.active]
        if penalized or any(a is not None for a in allowed):
            logits = logits.clone()  # rows of one prompt share their logits' memory
            for i in penalized:  # before the healing mask and the sampler, as llama.cpp's chain
                p = rows[i].params.penalties
                penalize(logits[i], p.window(rows[i].prompt_ids, rows[i].token_ids), p)
            for i, ids in enumerate(allowed):
                if ids is not None:
                    keep = torch.full_like(logits[i], float("-inf"))
                    index = torch.tensor(ids, device=device)
                    keep[index] = logits[i, index]
                    logits[i] = keep
        temps = torch.tensor([s.params.temperature for s in rows], device=device)
        # A k above the vocabulary is no limit at all; clamped here so no k can overflow.
        top_k = torch.tensor([min(s.params.top_k, logits.size(-1)) for s in rows], device=device)
        top_p = torch.tensor([s.params.top_p for s in rows], device=device)
        uniforms = torch.stack([torch.zeros(()) if s.params.temperature == 0 else self._draw(s) for s in rows]).to(device)
        return sample_tokens(logits, temps, top_k, top_p, uniforms).tolist()

    @staticmethod
    def _draw(s: Sequence) -> torch.Tensor:
        """The row's next uniform draw: the one its last refused guess drew, else a new one."""
        if s.guessing.next_uniform is not None:
            u, s.guessing.next_uniform = s.guessing.next_uniform, None
            return u
        return torch.rand((), generator=s.generator)

    def cancel(self, predicate) -> list[Sequence]:
        """Remove the rows for which predicate(sequence) is true (e.g. a client went away)."""
        gone = [i for i, s in enumerate(self.rows) if predicate(s)]
        removed = [self.rows[i] for i in gone]
        for s in removed:
            s.finish_reason = s.finish_reason or "stop"
        self._retire(gone)
        return removed

    def _retire(self, finished: list[int]) -> None:
        """Drop finished rows, moving the last active rows into their places."""
        if not finished:
            return
        gone = set(finished)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        new_b = len(keep)
        holes = [i for i in finished if i < new_b]
        movers = [i for i in keep if i >= new_b]
        for dst, src in zip(holes, movers):
            self.cache.copy_rows([src], [dst], self.rows[src].length)
            if self.held is not None:
                self.held[dst] = self.held[src]
            if self.drafter is not None:
                self.drafter.move(src, dst)
        order = list(range(new_b))
        for dst, src in zip(holes, movers):
            order[dst] = src
        self.rows = [self.rows[i] for i in order]
        self.logits = self.logits[order] if new_b else None

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Ids past the tokenizer's vocabulary (the padded tail) can never be sampled."""
        if logits.size(-1) > self.real_vocab:
            logits[:, self.real_vocab :] = float("-inf")
        return logits
