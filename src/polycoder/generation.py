"""Text generation: sampling functions, a batching engine, beam search and the CLI verb.

Shape of the code (after gpt-fast and nanochat):
- `sample_tokens` is a pure function of logits, per-row settings and per-row uniform
  draws; the draws come from one seeded `torch.Generator` per sample, so sample j of a
  request is the same whatever else shares the batch and however many samples are asked.
- `Engine` owns one preallocated KV cache of `max_rows` rows. `add` prefills a prompt
  once into a free row and copies that row to its other n-1 samples; `step` samples one
  token for every active row, retires finished rows (moving the last rows into the holes,
  so active rows are always 0..B-1) and runs one decode forward for the rest. Rows join
  and leave between steps: this is continuous batching, and `generate`, `stream`, the
  evaluation's sampling and the server all use it.
- `prefill` and `decode_one_token` are the two model calls, as small functions so that only
  the decode step is compiled (`compile=True`, off by default: it did not pay on a 2-core
  CPU). Each decode step runs under `polycoder.inference.decode_kernels`, which picks the
  faster CPU kernels for a single bf16 row; int8/int4 weights come from `load_model(quantize=)`.
- `Sequence` turns a row's tokens into text, holding back text that might be the start of
  a stop string and never emitting half a UTF-8 character.
- `beam_search` follows transformers' beam search (length penalty, finished hypotheses).
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence as Seq

import torch
import torch.nn.functional as F

from polycoder.errors import PolycoderError
from polycoder.inference import decode_kernels, prepare_decode
from polycoder.model import GPTNeoX, KVCache
from polycoder.tokenizer import Tokenizer

FinishReason = Literal["stop", "eod", "length"]


@dataclass
class SamplingParams:
    """How to continue a prompt."""

    max_new_tokens: int = 128
    """Most tokens to generate for each sample."""
    temperature: float = 0.0
    """0 means greedy (argmax); higher is more random."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    num_samples: int = 1
    """Samples per prompt; they share one prefill."""
    num_beams: int = 1
    """Beam search width (1: no beam search). Beam search is deterministic."""
    stop: tuple[str, ...] = ()
    """Stop strings: output is cut before the first occurrence of any of them."""
    stop_at_eod: bool = True
    """End a sample at `<|endoftext|>` (the end of a document)."""
    seed: int | None = None
    """Seed for sampling; None draws a fresh one."""
    truncate: bool = False
    """Keep only the last tokens of a prompt too long for the context, instead of an error."""
    length_penalty: float = 1.0
    """Beam search: scores are divided by length ** length_penalty."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        if self.max_new_tokens < 0:
            raise PolycoderError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PolycoderError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise PolycoderError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PolycoderError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if self.num_samples < 1 or self.num_beams < 1:
            raise PolycoderError("num_samples and num_beams must be at least 1")
        if self.num_beams > 1 and self.num_samples > 1:
            raise PolycoderError("beam search returns one sequence a prompt: use num_beams or num_samples, not both")


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int = 0


# ---- sampling: pure functions ------------------------------------------------------------


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """One token a row from logits [B, V] with per-row settings and uniform draws [B].

    Rows with temperature 0 take the argmax. Others: softmax(logits / T), keep the top_k
    most likely (if > 0) and the smallest prefix of the sorted distribution whose mass
    reaches top_p, then invert the CDF of what is kept at the row's uniform draw.
    Sorting all 50k logits is the slow part, so only the top candidates are sorted when
    that provably covers every row's top_k and top_p (else the whole vocabulary is).
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    sampling = temperature > 0
    if not bool(sampling.any()):
        return greedy
    V = logits.size(-1)
    probs = F.softmax(logits / temperature.clamp_min(1e-6)[:, None], dim=-1)
    truncating = sampling & ((top_k > 0) | (top_p < 1.0))
    if not bool(truncating.any()):  # plain temperature sampling: no sort at all
        cdf = probs.cumsum(dim=-1)
        choice = torch.searchsorted(cdf, (uniforms.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)
        sampled = choice.clamp_max(V - 1)[:, 0]
        return torch.where(sampling, sampled, greedy)
    C = min(V, max(1024, int(top_k.max())))
    sorted_p, order = probs.topk(C, dim=-1)  # [B, C], descending
    needs_all = sampling & (top_k == 0) & (sorted_p.sum(dim=-1) < top_p)
    if C < V and bool(needs_all.any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    remove = mass_before >= top_p[:, None]  # the first token always stays
    ranks = torch.arange(sorted_p.size(-1), device=logits.device)[None, :]
    remove |= (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    kept = sorted_p.masked_fill(remove, 0.0)
    cdf = kept.cumsum(dim=-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1])[:, None]
    choice = torch.searchsorted(cdf, target, right=True).clamp_max(sorted_p.size(-1) - 1)  # [B, 1]
    sampled = order.gather(1, choice)[:, 0]
    return torch.where(sampling, sampled, greedy)


def sample_generator(seed: int, prompt_index: int, sample_index: int) -> torch.Generator:
    """The generator of sample `sample_index` of prompt `prompt_index` under `seed`."""
    mixed = (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB) % (2**63)
    return torch.Generator().manual_seed(mixed)


def resolve_seed(seed: int | None) -> int:
    return seed if seed is not None else random.SystemRandom().randrange(2**63)


def encode_prompt(tokenizer: Tokenizer, prompt: str | bytes | list[int], block_size: int, params: SamplingParams) -> list[int]:
    """Prompt ids that fit the context with room for max_new_tokens (or a clear error)."""
    ids = list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eod_id]  # an empty prompt starts a new document
    room = block_size - params.max_new_tokens
    if room < 1:
        raise PolycoderError(
            f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the model's context of {block_size} tokens; lower it"
        )
    if len(ids) > room:
        if not params.truncate:
            raise PolycoderError(
                f"the prompt is {len(ids)} tokens; with max_new_tokens {params.max_new_tokens} it exceeds the model's "
                f"context of {block_size}: shorten the prompt, lower max_new_tokens, or allow left truncation "
                f"(--truncate keeps the last {room} prompt tokens)"
            )
        ids = ids[-room:]
    return ids


# ---- one sample's text ---------------------------------------------------------------------


class Sequence:
    """A sample being generated: its tokens, its text, and what may be emitted yet."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 generator: torch.Generator, tag: object = None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = generator
        self.tag = tag  # the caller's handle (prompt index, request id, ...)
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: FinishReason | None = None
        self._decoder = tokenizer.stream_decoder()
        self._eod = tokenizer.eod_id
        self._max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)

    def push(self, token: int, room_left: bool = True) -> str:
        """Take the next token; returns the text that is now safe to emit (may be "")."""
        if token == self._eod and self.params.stop_at_eod:
            return self._finish("eod")
        self.token_ids.append(token)
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += self._decoder.push([token])
        if self._cut_at_stop(start):
            return self._take(len(self.text))
        if len(self.token_ids) >= self.params.max_new_tokens or not room_left:
            return self._finish("length")
        return self._take(len(self.text) - self._held_back())

    def finish(self, reason: FinishReason) -> str:
        return self._finish(reason)

    def completion(self) -> Completion:
        return Completion(self.text, list(self.token_ids), self.finish_reason or "length", len(self.prompt_ids))

    def _finish(self, reason: FinishReason) -> str:
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += self._decoder.flush()
        self.finish_reason = reason
        self._cut_at_stop(start)
        return self._take(len(self.text))

    def _cut_at_stop(self, start: int) -> bool:
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish_reason = "stop"
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.params.stop):
                return n
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out


# ---- the engine ----------------------------------------------------------------------------


@dataclass
class Event:
    """What one step produced for one sequence."""

    sequence: Sequence
    text: str
    finished: bool


class CacheRows:
    """A view of rows [start, stop) of a KV cache (shares its storage)."""

    def __init__(self, cache: KVCache, start: int, stop: int):
        self.k = [t[start:stop] for t in cache.k]
        self.v = [t[start:stop] for t in cache.v]


def prefill(model: GPTNeoX, x: torch.Tensor, cache) -> torch.Tensor:
    """Run prompt ids x [1, T] into cache rows at positions 0..T-1; next-token logits [1, V]."""
    T = x.size(1)
    pos = torch.arange(T, device=x.device)[None]
    return model(x, pos=pos, cache=cache, kv_len=T, select=torch.tensor([T - 1], device=x.device))[:, 0]


def decode_one_token(model: GPTNeoX, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len: int) -> torch.Tensor:
    """One token a row: x, pos [B, 1] for cache rows 0..B-1; next-token logits [B, V] (fp32)."""
    return model(x, pos=pos, cache=cache, kv_len=kv_len)[:, -1].float()


_COMPILED = None


def compiled_decode():
    """`decode_one_token` under torch.compile, shapes dynamic in rows and cache length."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(decode_one_token, dynamic=True)
    return _COMPILED


class StaticDecode:
    """The decode step at static shapes, captured as CUDA graphs on a GPU.

    Rows are padded up to a bucket (1, 2, 4, ... up to the cache's rows) and attention
    reads a cache length rounded up to `kv_block` positions, so each (rows, length) bucket
    is one fixed computation: on a GPU it is captured once as a CUDA graph and replayed,
    one launch a token instead of one per kernel (a 2.7B model's 32 blocks are hundreds of
    launches a step, milliseconds of host time against about a millisecond of reading the
    weights on an H100/H200).

    Padding rows carry token 0 at position 0. They write only into cache rows the engine is
    not using (its active rows are always 0..B-1, and a row that joins is prefilled from
    position 0), and their logits are dropped. Positions between a row's own and the
    rounded length are masked by position, as in every step. With `graphs=False` the same
    padded static step runs eagerly (how it is tested without a GPU).
    """

    def __init__(self, cache: KVCache, graphs: bool, kv_block: int = 256):
        self.cache, self.use_graphs, self.kv_block = cache, graphs, kv_block
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None  # one memory pool shared by every captured graph

    def bucket(self, rows: int, kv_len: int) -> tuple[int, int]:
        b = 1
        while b < rows:
            b *= 2
        return min(b, self.cache.rows), min(self.cache.max_len, -(-kv_len // self.kv_block) * self.kv_block)

    def __call__(self, model: GPTNeoX, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len: int) -> torch.Tensor:
        if cache is not self.cache:
            raise ValueError("StaticDecode serves the cache it was made for")
        B = x.size(0)
        b, s = self.bucket(B, kv_len)
        if not self.use_graphs:
            pad = b - B
            if pad:
                x, pos = torch.cat([x, x.new_zeros(pad, 1)]), torch.cat([pos, pos.new_zeros(pad, 1)])
            return decode_one_token(model, x, pos, cache, s)[:B]
        entry = self.graphs.get((b, s))
        if entry is None:
            try:
                entry = self.graphs[(b, s)] = self._capture(model, b, s, x, pos)
            except RuntimeError as e:  # a step that cannot be captured still decodes, eagerly
                print(f"polycoder: CUDA graph capture failed ({str(e)[:200]}); decoding without graphs "
                      "(POLYCODER_CUDA_GRAPHS=0 skips the attempt)", file=sys.stderr)
                self.use_graphs = False
                return self(model, x, pos, cache, kv_len)
        graph, static_x, static_pos, out = entry
        static_x[:B], static_pos[:B] = x, pos
        static_x[B:], static_pos[B:] = 0, 0  # padding rows: token 0 at position 0
        graph.replay()
        return out[:B].clone()

    def _capture(self, model: GPTNeoX, b: int, s: int, x: torch.Tensor, pos: torch.Tensor) -> tuple:
        """Capture the step for bucket (b, s). The static inputs hold this step's real rows
        while the warm-up runs execute, so what they write into the cache is what the replay
        writes again (the same keys and values at the same positions)."""
        B, device = x.size(0), x.device
        static_x = torch.zeros(b, 1, dtype=x.dtype, device=device)
        static_pos = torch.zeros(b, 1, dtype=pos.dtype, device=device)
        static_x[:B] = x
        static_pos[:B] = pos
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture (allocations, library handles)
            for _ in range(2):
                decode_one_token(model, static_x, static_pos, self.cache, s)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = decode_one_token(model, static_x, static_pos, self.cache, s)
        self.pool = graph.pool()
        return graph, static_x, static_pos, out


def cuda_graphs_enabled() -> bool:
    """CUDA graphs for the decode step on GPUs, unless POLYCODER_CUDA_GRAPHS=0."""
    return os.environ.get("POLYCODER_CUDA_GRAPHS", "1") != "0"


class Engine:
    """Continuous batching over one preallocated KV cache of `max_rows` rows."""

    def __init__(self, model: GPTNeoX, tokenizer: Tokenizer, max_rows: int, max_len: int, compile: bool = False,
                 static_shapes: bool | None = None):
        self.model, self.tokenizer = prepare_decode(model), tokenizer
        self.max_rows, self.max_len = max_rows, max_len
        self.cache = model.new_cache(max_rows, max_len)
        self.rows: list[Sequence] = []
        self.logits: torch.Tensor | None = None  # [B, V] next-token logits of each active row
        self.real_vocab = tokenizer.vocab_size
        # Only the decode step is compiled (prefill shapes vary with every prompt). On the
        # 2-core CPU this was measured not to pay (about 160 s to compile, no steady gain),
        # so it is off by default; see benchmarks/decode.py --compile.
        # On a GPU the decode step is replayed as CUDA graphs over static shapes
        # (StaticDecode); `static_shapes=True` runs those shapes eagerly anywhere (tests).
        on_gpu = self.cache.k[0].device.type == "cuda"
        if static_shapes is None:
            static_shapes = on_gpu and not compile and cuda_graphs_enabled()
        if static_shapes:
            self._decode = StaticDecode(self.cache, graphs=on_gpu)
        else:
            self._decode = compiled_decode() if compile else decode_one_token

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.rows)

    @torch.inference_mode()
    def add(self, sequences: list[Sequence]) -> None:
        """Prefill one prompt once for `sequences` (all share its prompt ids) and join them."""
        if not sequences:
            return
        n, r = len(sequences), len(self.rows)
        if n > self.free_rows:
            raise ValueError(f"{n} rows asked, {self.free_rows} free")
        ids = sequences[0].prompt_ids
        T = len(ids)
        if T >= self.max_len:
            raise PolycoderError(f"prompt of {T} tokens does not fit the engine's {self.max_len}-token cache")
        x = torch.tensor([ids], device=self.cache.k[0].device)
        logits = prefill(self.model, x, CacheRows(self.cache, r, r + 1))  # [1, V]
        for t in self.cache.k + self.cache.v:
            t[r + 1 : r + n, :, :T] = t[r : r + 1, :, :T]  # the other samples copy the prefill
        logits = self._mask(logits.float()).expand(n, -1)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.rows.extend(sequences)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Sample a token for every row, retire finished rows, run one decode step."""
        if not self.rows:
            return []
        rows = self.rows
        device = self.logits.device
        temps = torch.tensor([s.params.temperature for s in rows], device=device)
        top_k = torch.tensor([s.params.top_k for s in rows], device=device)
        top_p = torch.tensor([s.params.top_p for s in rows], device=device)
        uniforms = torch.stack([torch.rand((), generator=s.generator) if s.params.temperature > 0 else torch.zeros(())
                                for s in rows]).to(device)
        tokens = sample_tokens(self.logits, temps, top_k, top_p, uniforms).tolist()
        events = []
        for s, tok in zip(rows, tokens):
            # The new token sits at position s.length; it needs a cache slot to continue.
            text = s.push(tok, room_left=s.length + 1 < self.max_len)
            events.append(Event(s, text, s.done))
        self._retire([i for i, s in enumerate(rows) if s.done])
        if self.rows:
            last = torch.tensor([[s.token_ids[-1]] for s in self.rows], device=device)  # [B, 1]
            positions = [s.length - 1 for s in self.rows]
            pos = torch.tensor(positions, device=device)[:, None]  # [B, 1]
            # Active rows are always 0..B-1, so the whole cache is passed: the model reads rows [:B].
            with decode_kernels(self.model, len(positions)):
                self.logits = self._mask(self._decode(self.model, last, pos, self.cache, max(positions) + 1))
        else:
            self.logits = None
        return events

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
            n = self.rows[src].length
            for t in self.cache.k + self.cache.v:
                t[dst, :, :n] = t[src, :, :n]
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


# ---- the public functions ------------------------------------------------------------------


def generate(
    model: GPTNeoX,
    tokenizer: Tokenizer,
    prompts: str | list[str] | list[list[int]],
    params: SamplingParams | None = None,
    max_rows: int = 64,
    compile: bool = False,
) -> list[list[Completion]]:
    """Complete each prompt `params.num_samples` times; one list of completions a prompt."""
    params = params or SamplingParams()
    if isinstance(prompts, str):
        prompts = [prompts]
    block = model.config.block_size
    ids = [encode_prompt(tokenizer, p, block, params) for p in prompts]
    if params.num_beams > 1:
        return [[beam_search(model, tokenizer, p, params)] for p in ids]
    seed = resolve_seed(params.seed)
    max_len = min(block, max(len(p) for p in ids) + params.max_new_tokens + 1)
    total = len(ids) * params.num_samples
    engine = Engine(model, tokenizer, max_rows=max(1, min(max_rows, total)), max_len=max_len, compile=compile)
    pending = [(p, j) for p in range(len(ids)) for j in range(params.num_samples)]
    done: list[Sequence] = []
    while pending or engine.rows:
        while pending and engine.free_rows:
            p = pending[0][0]
            group = []
            while pending and pending[0][0] == p and len(group) < engine.free_rows:
                _, j = pending.pop(0)
                group.append(Sequence(ids[p], params, tokenizer, sample_generator(seed, p, j), tag=(p, j)))
            if params.max_new_tokens == 0:
                for s in group:
                    s.finish("length")
                done.extend(group)
                continue
            engine.add(group)
        done.extend(e.sequence for e in engine.step() if e.finished)
    results: list[list[Completion]] = [[None] * params.num_samples for _ in ids]  # type: ignore[list-item]
    for s in done:
        p, j = s.tag
        results[p][j] = s.completion()
    return results


def stream(model: GPTNeoX, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams | None = None,
           compile: bool = False) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece (whole UTF-8 characters only)."""
    params = params or SamplingParams()
    if params.num_samples != 1 or params.num_beams != 1:
        raise PolycoderError("streaming produces one sample; set num_samples and num_beams to 1")
    ids = encode_prompt(tokenizer, prompt, model.config.block_size, params)
    if params.max_new_tokens == 0:
        return
    engine = Engine(model, tokenizer, max_rows=1, max_len=min(model.config.block_size, len(ids) + params.max_new_tokens + 1),
                    compile=compile)
    engine.add([Sequence(ids, params, tokenizer, sample_generator(resolve_seed(params.seed), 0, 0))])
    while engine.rows:
        for event in engine.step():
            if event.text:
                yield event.text


@torch.inference_mode()
def beam_search(model: GPTNeoX, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> Completion:
    """Beam search as in transformers (scores: summed log-probs / length ** length_penalty)."""
    nb, eod = params.num_beams, tokenizer.eod_id
    prepare_decode(model)
    T = len(prompt_ids)
    max_len = min(model.config.block_size, T + params.max_new_tokens + 1)
    cache = model.new_cache(nb, max_len)
    device = cache.k[0].device
    logits = model(torch.tensor([prompt_ids], device=device), pos=torch.arange(T, device=device)[None],
                   cache=CacheRows(cache, 0, 1), kv_len=T, select=torch.tensor([T - 1], device=device))[:, 0]
    for t in cache.k + cache.v:
        t[1:, :, :T] = t[:1, :, :T]
    logits = logits.float().expand(nb, -1).clone()
    beams: list[list[int]] = [[] for _ in range(nb)]
    scores = torch.full((nb,), -1e9, device=device)
    scores[0] = 0.0  # only the first beam is live at the start: the others are copies
    finished: list[tuple[float, list[int]]] = []
    V = tokenizer.vocab_size

    def normalized(score: float, length: int) -> float:
        return score / (max(length, 1) ** params.length_penalty)

    for step in range(params.max_new_tokens):
        # Normalise over the whole (padded) vocabulary, then rule out the padding ids, as
        # transformers does with suppressed tokens; a trained model gives them ~0 anyway.
        logp = F.log_softmax(logits, dim=-1)[:, :V] + scores[:, None]  # [nb, V]
        top, flat = logp.view(-1).topk(2 * nb)
        next_beams, next_scores, parents = [], [], []
        for rank, (score, idx) in enumerate(zip(top.tolist(), flat.tolist())):
            b, tok = divmod(idx, V)
            if tok == eod and params.stop_at_eod:
                if rank < nb:  # only the top nb candidates may finish (as transformers)
                    finished.append((normalized(score, len(beams[b]) + 1), beams[b]))
                continue
            if len(next_beams) < nb:
                next_beams.append(beams[b] + [tok])
                next_scores.append(score)
                parents.append(b)
        finished = sorted(finished, key=lambda f: -f[0])[:nb]
        beams = next_beams
        scores = torch.tensor(next_scores, device=device)
        if len(finished) == nb and normalized(max(next_scores), len(beams[0])) <= finished[-1][0]:
            break  # no running beam can beat the worst kept hypothesis
        src = torch.tensor(parents, device=device)
        for t in cache.k + cache.v:
            t[:, :, : T + step] = t[src, :, : T + step]
        if T + step + 1 >= max_len:
            break
        x = torch.tensor([[b[-1]] for b in beams], device=device)
        pos = torch.full((nb, 1), T + step, device=device)
        logits = model(x, pos=pos, cache=cache, kv_len=T + step + 1)[:, -1].float()
    candidates = finished + [(normalized(s, len(b)), b) for s, b in zip(scores.tolist(), beams)]
    best = max(candidates, key=lambda c: c[0])[1]
    seq = Sequence(prompt_ids, SamplingParams(max_new_tokens=len(best) + 1, stop=params.stop, stop_at_eod=False),
                   tokenizer, torch.Generator())
    for tok in best:
        seq.push(tok)
        if seq.done:
            break
    if not seq.done:  # a stop string already ended (and cut) it otherwise
        seq.finish("eod" if any(best == f[1] for f in finished) else "length")
    return seq.completion()


# ---- the command line ----------------------------------------------------------------------


def cli_generate(
    prompt: str | None = None,
    prompt_file: Path | None = None,
    model: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | None = None,
    num_samples: int = 1,
    num_beams: int = 1,
    echo: bool = False,
    json_output: bool = False,
    truncate: bool = False,
    stop_at_eod: bool = True,
    dtype: str = "float32",
    device: str = "cpu",
    random_init: bool = False,
    tokenizer: str | None = None,
    quantize: Literal["int8", "int4"] | None = None,
    threads: int = 0,
    compile: bool = False,
) -> None:
    """Complete a prompt with a model and print the completion (streamed for one sample).

    Args:
        prompt: the prompt text, taken exactly (tabs, newlines, spaces kept).
        prompt_file: read the prompt from this file; `-` or no prompt at all reads stdin.
        model: a model folder, a hub id, or a preset with --random-init (default: the bundled model).
        max_new_tokens: most tokens to generate.
        temperature: sampling temperature; 0 means greedy.
        top_p: nucleus sampling threshold.
        top_k: keep only the k most likely tokens (0: no limit).
        seed: random seed for reproducible sampling.
        stop: stop string(s): the output is cut before the first one (repeatable).
        num_samples: how many completions to draw (they share one prefill).
        num_beams: beam search width (1: none).
        echo: print the prompt before the completion.
        json_output: print a JSON list of completions (text, finish_reason, tokens).
        truncate: keep the last tokens of a prompt too long for the context instead of failing.
        stop_at_eod: stop at <|endoftext|> (the end of a document).
        dtype: weights' precision: float32, bfloat16 or float16.
        device: cpu, cuda, cuda:1, ...
        random_init: run a preset with random weights (for speed tests).
        tokenizer: take the tokenizer from this folder (for weights saved without one).
        quantize: weight-only quantization for faster CPU decoding: int8 (per-channel scales) or int4 (groups of 32); see benchmarks/decode.py for their cost.
        threads: CPU threads (0: one a physical core).
        compile: torch.compile the decode step (minutes to compile on a CPU; pays only for long runs, if at all).
    """
    text = _read_prompt(prompt, prompt_file)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            num_samples=num_samples, num_beams=num_beams, stop=tuple(stop or ()), seed=seed,
                            truncate=truncate, stop_at_eod=stop_at_eod)
    from polycoder.checkpoint import load_model

    from polycoder.inference import set_threads

    if device == "cpu":
        set_threads(threads or None)
    net, tok = load_model(model, dtype=dtype, device=device, random_init=random_init, tokenizer=tokenizer, quantize=quantize)
    out = sys.stdout
    if json_output:
        completions = generate(net, tok, [text], params, compile=compile)[0]
        out.write(json.dumps([{"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)}
                              for c in completions], ensure_ascii=False) + "\n")
        return
    if echo:
        out.flush()
        sys.stdout.buffer.write(text.encode("utf-8", errors="surrogateescape"))
        sys.stdout.buffer.flush()
    if num_samples == 1 and num_beams == 1:
        for piece in stream(net, tok, text, params, compile=compile):
            out.write(piece)
            out.flush()
        out.write("\n")
        return
    for i, c in enumerate(generate(net, tok, [text], params, compile=compile)[0]):
        if num_samples > 1:
            out.write(f"\n===== sample {i + 1} ({c.finish_reason}) =====\n")
        out.write(c.text + "\n")


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise PolycoderError("give either --prompt or --prompt-file, not both")
    if prompt is not None:
        return prompt
    if prompt_file is not None and str(prompt_file) != "-":
        try:
            return Path(prompt_file).read_bytes().decode("utf-8", errors="surrogateescape")
        except FileNotFoundError:
            raise PolycoderError(f"prompt file not found: {prompt_file}") from None
    if sys.stdin is None or sys.stdin.isatty():
        raise PolycoderError("no prompt: give --prompt TEXT, --prompt-file F, or pipe it on stdin")
    return sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
