"""The bridge between asyncio request handlers and the batching engine's thread.

One thread owns `polycoder.generation.Engine` (continuous batching over one preallocated
KV cache) and the model. Request handlers, on the event loop, `submit` a `Job` (one or
more prompts, n samples each) and read its events from an `asyncio.Queue`; the thread
loops:

    drop cancelled rows -> admit waiting prompts while rows are free (up to a budget of
    prompt tokens a step) -> score (logprobs) -> engine.step(), which hands each row's new
    text to its job's queue as soon as it is final: before the step's forward pass, or
    after the drafts' check when rows speculate

so requests join and leave the running batch at every decode step.

Sharing the batch (admission): the rows are shared fairly between requests, so that a small
request is never starved behind a large one. Waiting requests take turns in arrival order,
one chunk of samples of one prompt a turn; a chunk may take the free rows up to the
request's fair share, which is the batch divided evenly among the requests that hold rows
or wait for them (at least one row each), less the rows the request already holds. A
request that cannot take a row now is passed over, never holding up those behind it; as
others finish, its share grows. A prompt's samples in one chunk share one prefill.

The waiting line is bounded (`max_queue` jobs): past it `submit` raises `QueueFull` and the handler answers
429 at once instead of letting latency grow without limit. A handler whose client went
away calls `Job.cancel()`; its rows leave the batch before the next step.

Log-probabilities (OpenAI's `logprobs`, `echo`) are computed by one causal forward of the
model over prompt + completion after a sample finishes (`score_tokens`): they are the raw
model's (full vocabulary, before temperature / top-p), the same numbers a direct
`log_softmax(model(ids))` gives. Cost: one extra prefill-sized forward per such sample.

Prompt cache (`prompt_cache_mb`, `polycoder.generation.prompt_cache`): each prompt's keys and
values are kept after its prefill, so the next prompt that starts with the same tokens (an
editor's next keystroke) prefills only what follows them, and the prefill budget counts
only those tokens. A cancelled request's prompt stays cached: it was stored when it was
prefilled, and cancelling only frees its rows (before the next step). Each job records what its
prompts ran (`Job.prefilled`), which the APIs report per request (llama.cpp's `tokens_cached`,
OpenAI's `cached_tokens`); a job with `reuse_prompt=False` (llama.cpp's `cache_prompt: false`)
reuses nothing.

Limits: one model and one engine thread per loop (a server with adapters runs one loop per
served model, each with its own weights and cache; scale out with replicas behind a
balancer); a long prompt's prefill holds up the decode step of the others while it runs
(bounded by `prefill_budget` prompt tokens between two steps, at least one prompt); the
fair share is per request, not per client: a client sending many requests gets many shares.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from polycoder.generation import Engine, SamplingParams, Sequence, sample_generator
from polycoder.model import GPTNeoX
from polycoder.tokenizer import Tokenizer

log = logging.getLogger("polycoder.serve")


class QueueFull(Exception):
    """The waiting line is full: the client should retry later (HTTP 429)."""


class NotRunning(Exception):
    """The engine thread has stopped (shutting down): HTTP 503."""


@dataclass
class TokenScores:
    """Log-probabilities of a token sequence under the model (OpenAI's `logprobs` object)."""

    token_ids: list[int]
    """The scored tokens."""
    token_logprobs: list[float | None]
    """log p(token_i | tokens before it); None for a first token that has no context."""
    top: list[list[tuple[int, float]] | None]
    """The `k` most likely (id, logprob) at each position (None where no context)."""


@dataclass
class Choice:
    """The tag of one sample (engine row): which job and which output choice it is."""

    job: Job
    index: int
    """OpenAI's choice index: prompt_index * n + sample_index."""
    prompt_index: int


@dataclass
class Outcome:
    """What a finished choice hands back to its request handler."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_ids: list[int]
    generated_tokens: int = 0
    """Tokens the model generated (including any past a stop string)."""
    scores: TokenScores | None = None
    """Log-probabilities of (prompt if echo) + completion tokens, if asked for."""


@dataclass
class Job:
    """One HTTP request's work: every prompt, its n samples, and where events go."""

    request_id: str
    prompts: list[list[int]]
    """Token ids of each prompt (already checked to fit the context)."""
    params: SamplingParams
    """Sampling settings shared by every sample; params.num_samples is n."""
    seed: int
    """Resolved seed: sample j of prompt p uses sample_generator(seed, p, j)."""
    logprobs: int | None = None
    """Return this many top log-probabilities per token (None: no logprobs)."""
    echo: bool = False
    """Score (and return) the prompt as well."""
    reuse_prompt: bool = True
    """Let the prompt cache supply a prefix of each prompt (llama.cpp's `cache_prompt`); False:
    every prompt token runs through the model (the prompt is still kept for later requests)."""
    prefilled: dict[int, int] = field(default_factory=dict)
    """Prompt index -> its tokens run through the model when its first samples joined the
    batch (written by the engine thread before the prompt's first event)."""
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    next_sample: tuple[int, int] = (0, 0)
    """(prompt, sample) that joins the batch next (engine thread only)."""
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("a job needs at least one prompt")

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the prompt cache supplied, each prompt counted once (as usage counts
        prompt tokens); read it after the job's first event."""
        return sum(len(self.prompts[p]) - n for p, n in self.prefilled.items())

    def cancel(self) -> None:
        """The client went away: the engine thread drops this job's rows before its next step."""
        self.cancelled = True

    # called from the engine thread only:
    def _fail(self, message: str) -> None:
        """This request failed (the others go on): tell its client and drop its rows."""
        log.warning("[%s] %s", self.request_id, message)
        self._emit(("error", message))
        self.cancel()

    def _emit(self, item: tuple) -> None:
        assert self.loop is not None and self.events is not None
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shut down)
            pass


def score_tokens(model: GPTNeoX, ids: list[int], top: int, start: int = 1) -> TokenScores:
    """Log-probabilities of ids[start:] given what precedes each, by one causal forward.

    Position 0 has no context, so a scoring that starts there gets None (as OpenAI's API).
    The softmax runs over the model's whole (padded) vocabulary: the raw distribution.
    """
    T = len(ids)
    lps: list[float | None] = []
    tops: list[list[tuple[int, float]] | None] = []
    if start == 0:
        lps.append(None)
        tops.append(None)
        start = 1
    if start < T:
        device = next(model.parameters()).device
        x = torch.tensor([ids], device=device)
        with torch.inference_mode():
            logits = model(x)[0, start - 1 : T - 1].float()  # [T-start, V]: predicts ids[start:]
        logp = F.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[start:], device=device)
        lps += logp.gather(1, target[:, None])[:, 0].tolist()
        if top > 0:
            values, indices = logp.topk(top, dim=-1)
            tops += [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        else:
            tops += [[] for _ in range(T - start)]
    return TokenScores(list(ids), lps, tops)


def trim_tokens(tokenizer: Tokenizer, token_ids: list[int], text: str) -> list[int]:
    """The fewest leading tokens whose text covers `text` (drops tokens past a stop string)."""
    if not text:
        return []
    n = len(text.encode("utf-8", errors="surrogatepass"))
    size = 0
    for k, t in enumerate(token_ids, start=1):
        size += len(tokenizer.token_bytes(t))
        if size >= n:
            return token_ids[:k]
    return list(token_ids)


class EngineLoop:
    """Runs `Engine` in a thread and serves `Job`s submitted from an asyncio loop."""

    def __init__(self, model: GPTNeoX, tokenizer: Tokenizer, max_rows: int, max_len: int, max_queue: int,
                 metrics: Any = None, prefill_budget: int = 512, speculate: int = 0, draft_model: Any = None,
                 prompt_cache_mb: float = 0):
        self.model, self.tokenizer = model, tokenizer
        # Prompt tokens prefilled between two decode steps (at least one prompt always joins):
        # admitting a burst of 32 prompts at once would stall every running stream for the
        # whole burst; spreading them keeps tokens flowing to those already admitted.
        self.prefill_budget = prefill_budget
        self.engine = Engine(model, tokenizer, max_rows=max_rows, max_len=max_len, speculate=speculate,
                             draft_model=draft_model, prompt_cache_mb=prompt_cache_mb)
        self._counted = self._counters()  # the engine's counters already in the metrics
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: collections.deque[Job] = collections.deque()
        self._scoring: list[Sequence] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="polycoder-engine", daemon=True)
        self.steps = 0

    # ---- the event-loop side ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return len(self.engine.rows)

    def submit(self, job: Job) -> Job:
        """Queue a job (on the running event loop); raises QueueFull or NotRunning."""
        if not self.running:
            raise NotRunning("the engine is not running (the server is shutting down)")
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry shortly")
            self._waiting.append(job)
            self._cond.notify_all()
        self._gauge()
        return job

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self.engine.rows and not self._scoring:
                    self._cond.wait()
                if self._stop:
                    break
            try:
                self._iterate()
            except Exception as e:  # a bug: fail the jobs in flight, keep serving the next ones
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def _iterate(self) -> None:
        try:
            self._iterate_once()
        finally:
            self._export()  # also when every row just left (cancelled): the gauges show it at once

    def _iterate_once(self) -> None:
        engine = self.engine
        gone = engine.cancel(lambda s: s.tag.job.cancelled)
        if gone and self.metrics is not None:
            self.metrics.cancelled_rows.inc(len(gone))
        self._scoring = [s for s in self._scoring if not s.tag.job.cancelled]
        self._admit()
        for s in self._scoring:
            self._finish(s)
        self._scoring = []
        if not engine.rows:
            return
        t0 = time.perf_counter()
        events = engine.step(emit=self._hand_out)  # each token out before the next forward pass
        self.steps += 1
        if self.metrics is not None:
            self.metrics.step_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_rows.observe(len(events))

    def _hand_out(self, events: list) -> None:
        """Each row's new text to its request; finished rows' answers completed."""
        for e in events:
            choice: Choice = e.sequence.tag
            job = choice.job
            if job.cancelled:
                continue
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
                if self.metrics is not None:
                    self.metrics.ttft_seconds.observe(job.first_token_at - job.submitted_at)
            if e.text:
                job._emit(("text", choice.index, e.text))
            if e.finished:
                self._finish(e.sequence)

    def _admit(self) -> None:
        """Move waiting samples into the batch while rows are free, sharing them fairly
        between requests (the module says how), up to `prefill_budget` prompt tokens."""
        budget = self.prefill_budget
        while budget > 0:
            with self._cond:
                if any(j.cancelled for j in self._waiting):
                    self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
                waiting = list(self._waiting)
            if not waiting:
                return
            if self.engine.free_rows == 0 and all(j.params.max_new_tokens > 0 for j in waiting):
                return  # every row is taken, and only scoring-only requests need none
            held = collections.Counter(id(s.tag.job) for s in self.engine.rows)
            share = max(1, self.engine.max_rows // len(set(held) | {id(j) for j in waiting}))
            progressed = False
            for job in waiting:  # one turn each, in arrival order
                if budget <= 0:
                    break
                joined = self._admit_chunk(job, share - held[id(job)])
                if joined:
                    held[id(job)] += joined[1]
                    budget -= joined[0]
                    progressed = True
            if not progressed:
                return

    def _admit_chunk(self, job: Job, allowance: int) -> tuple[int, int] | None:
        """Admit the next chunk of `job`'s samples (at most `allowance` rows): (prompt tokens
        prefilled, those the prompt cache supplied not counted; rows taken), or None when it
        can take no row now."""
        n = job.params.num_samples
        p, j = job.next_sample
        scoring_only = job.params.max_new_tokens == 0  # echo + logprobs with max_tokens 0: no row needed
        chunk = n - j if scoring_only else min(n - j, allowance, self.engine.free_rows)
        if chunk < 1:
            return None
        seqs = [Sequence(job.prompts[p], job.params, self.tokenizer, sample_generator(job.seed, p, k),
                         tag=Choice(job, p * n + k, p)) for k in range(j, j + chunk)]
        computed = len(job.prompts[p])
        if scoring_only:
            for s in seqs:
                s.finish("length")
            self._scoring.extend(seqs)
        else:
            try:
                computed = self.engine.add(seqs, reuse=job.reuse_prompt)
            except Exception as e:
                job._fail(str(e))
        job.prefilled.setdefault(p, computed)  # the prompt's first chunk (later ones reuse its prefill)
        job.next_sample = (p, j + chunk) if j + chunk < n else (p + 1, 0)
        if job.next_sample[0] >= len(job.prompts) or job.cancelled:
            with self._cond:
                if job in self._waiting:
                    self._waiting.remove(job)
        return computed, 0 if scoring_only else chunk

    def _finish(self, s: Sequence) -> None:
        choice: Choice = s.tag
        job = choice.job
        if s.finish_reason == "error":  # this request failed in the engine; the others go on
            job._fail(f"this request failed in the engine ({s.error})")
            return
        # Tokens past a stop string are not part of the answer (its text was cut before them);
        # the first ones may have written the prompt's own whitespace back (healing).
        tokens = (trim_tokens(self.tokenizer, s.token_ids, s.healed + s.text) if s.finish_reason == "stop"
                  else list(s.token_ids))
        if self.metrics is not None:
            self.metrics.generated_tokens.inc(len(s.token_ids))
        scores = None
        if job.logprobs is not None:
            ids = (s.prompt_ids if job.echo else []) + tokens
            if job.echo:
                scores = score_tokens(self.model, s.prompt_ids + tokens, job.logprobs, start=0)
            else:
                full = score_tokens(self.model, s.prompt_ids + tokens, job.logprobs, start=len(s.prompt_ids))
                scores = TokenScores(ids, full.token_logprobs, full.top)
        job._emit(("done", Outcome(choice.index, s.output, tokens, s.finish_reason or "length",
                                   s.prompt_ids, len(s.token_ids), scores)))

    def _fail_all(self, message: str) -> None:
        jobs = {id(s.tag.job): s.tag.job for s in self.engine.rows + self._scoring}
        with self._cond:
            jobs.update({id(j): j for j in self._waiting})
            self._waiting.clear()
        self._scoring = []
        self.engine.cancel(lambda s: True)
        for job in jobs.values():
            job._emit(("error", message))
        self._gauge()

    def _pools(self) -> list:
        """The prompt caches: the engine's, and its draft model's if it has one."""
        drafter = self.engine.drafter
        return [p for p in (self.engine.prompt_cache, drafter.pool if drafter else None) if p is not None]

    def _counters(self) -> dict[str, int]:
        """The engine's running counts that the metrics export (speculation, prefill, prompt cache)."""
        counts = dict(self.engine.stats)
        pool = self.engine.prompt_cache  # the target model's pool decides what is a hit
        counts["hits"], counts["misses"] = (pool.stats["hits"], pool.stats["misses"]) if pool else (0, 0)
        counts["evictions"] = sum(p.stats["evictions"] for p in self._pools())
        return counts

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.active_rows.set(len(self.engine.rows))

    def _export(self) -> None:
        """The gauges, and the engine's counts since the last export (engine thread only)."""
        self._gauge()
        if self.metrics is None:
            return
        m = self.metrics
        counts = self._counters()
        for name, key in (("drafted_tokens", "drafted"), ("accepted_tokens", "accepted"),
                          ("prefill_tokens", "prefilled"), ("prefill_reused_tokens", "reused"),
                          ("prompt_cache_hits", "hits"), ("prompt_cache_misses", "misses"),
                          ("prompt_cache_evictions", "evictions")):
            getattr(m, name).inc(counts[key] - self._counted[key])
        self._counted = counts
        m.prompt_cache_bytes.set(sum(p.nbytes for p in self._pools()))
        m.prompt_cache_entries.set(len(self.engine.prompt_cache or ()))
