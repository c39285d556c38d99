"""A prompt cache across requests: recent prompts' keys and values, reused by the next
prompt that starts with the same tokens (after llama.cpp's `cache_prompt`).

An editor sends the whole file again every few keystrokes and cancels the request before;
each new prompt shares almost all of its tokens with the last one. `PromptCache` keeps the
KV of recent prompts in a pool bounded in bytes (least recently used entries evicted), and
`prefill_reusing` prefills a prompt into a cache row by copying the longest cached token
prefix into the row and running only the rest through the model.

Exact token prefixes, not vLLM's hashed blocks: a keystroke adds a token or two, and a
block-aligned match would recompute up to a block of them (16 tokens: often more than the
keystroke itself); a prefix is found by comparing the prompt with every entry (vectorised,
microseconds for tens of entries of 2,048 tokens). The price is memory: an entry is a whole
contiguous copy, so prompts that share a long prefix but end differently each hold it. The
editor's usual chain costs one entry: a stored prompt replaces the entries it covers but for
their last `SUPERSEDED_TAIL` tokens (typing also changes the last token or two: "pr" then
"print"; what such an entry held beyond the new one is a few tokens to recompute). It
replaces one of them in place, writing only the positions where the two differ, when that
entry has room (entries are made with `HEADROOM` to grow): a keystroke's store copies a few
tokens' keys and values, not the whole prompt's (151 MB for a 2,048-token PolyCoder-160M
prompt in fp32: 2 x 12 layers x 768 x 4 bytes a token).

A row keeps what it held after its request leaves, and an editor's next keystroke (one
request at a time) lands in the same row: the engine says which prompt each row holds
(`Engine.held`), and `prefill_reusing` copies from the pool only what the row lacks, nothing
for a keystroke. A short rest of the prompt runs in the decode step's native call where it
offers one (`NativeDecode.extend`).

Where a row's KV lives: every decode step the engine can pick (PyTorch's, the native
kernels', the CUDA-graph one) reads and writes the one `KVCache` of the engine, tensors
[rows, heads, max_len, head_size] a layer, so a copy into those tensors serves them all
(the CUDA graphs keep the same tensors: copies are in place). Entries live on the cache's
device.

Exactness: the reused keys and values are the same numbers a full prefill writes for those
positions up to rounding: a prefill of T tokens and one of T - P tokens after P cached
ones sum in other block shapes (the products' row blocking, the native few-row kernel for
a short rest). In fp32 those differences are far below the gaps between logits, and the
greedy tokens are the cold ones (tests/test_prompt_cache.py, every backend); in bf16 they
are rounding of bf16's size (about 1e-2 relative), as between any two batchings of a bf16
run, so a near-tie can go the other way.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from polycoder.backend.decode import prefill
from polycoder.model import CacheRows, GPTNeoX, KVCache

SUPERSEDED_TAIL = 8
"""A stored prompt replaces entries that it shares all but at most this many last tokens with."""
HEADROOM = 8
"""An entry is made with room for 1/HEADROOM more tokens than its prompt's (at least
`MIN_HEADROOM`), within the engine's cache length and the pool's free bytes (room is never
made by evicting): the room typing grows it in place."""
MIN_HEADROOM = 16
"""The least room an entry is made with, in tokens (a short prompt's eighth is a keystroke or two)."""


def shared_prefix(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    """Length of the common prefix of token arrays a and b, at most `limit`."""
    n = min(len(a), len(b), limit)
    same = a[:n] == b[:n]
    return n if same.all() else int(same.argmin())


@dataclass
class Entry:
    """One cached prompt."""

    ids: np.ndarray
    """Its tokens (int64 [T])."""
    kv: torch.Tensor
    """Keys and values, positions 0..T-1 those of `ids`: [2, layers, heads, capacity >= T, head_size]."""

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PromptCache:
    """Prompts' KV in a pool of at most `max_bytes`, least recently used evicted first.

    `stats` counts lookups that reused tokens (`hits`) and those that did not (`misses`), the
    prompt tokens run through the model (`computed`) and not run (`reused`: copied from the
    pool, or kept where the row held them), and the entries evicted to make room
    (`evictions`).
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"a prompt cache's size must be >= 0 bytes (0: off), got {max_bytes}")
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()  # oldest use first
        self._next = 0
        self.nbytes = 0
        self.stats = {"hits": 0, "misses": 0, "computed": 0, "reused": 0, "evictions": 0}

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, ids: list[int] | np.ndarray, limit: int) -> tuple[int | None, int]:
        """(key, length) of the entry sharing the longest token prefix with `ids`, at most
        `limit` tokens of it; (None, 0) when none shares a token. Marks it recently used."""
        ids = np.asarray(ids, dtype=np.int64)
        best, best_len = None, 0
        for key, e in self.entries.items():
            if min(len(e.ids), len(ids), limit) <= best_len or e.ids[0] != ids[0]:
                continue
            shared = shared_prefix(e.ids, ids, limit)
            if shared > best_len:
                best, best_len = key, shared
        if best is not None:
            self.entries.move_to_end(best)
        return best, best_len

    def load(self, key: int, cache: KVCache, row: int, length: int, begin: int = 0) -> None:
        """Positions begin..length-1 of entry `key` into `row` of `cache`, every layer."""
        kv = self.entries[key].kv
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            k[row, :, begin:length] = kv[0, layer, :, begin:length]
            v[row, :, begin:length] = kv[1, layer, :, begin:length]

    def store(self, ids: list[int] | np.ndarray, cache: KVCache, row: int) -> None:
        """Positions 0..len(ids)-1 of `row` of `cache` as the entry of prompt `ids`. Entries
        it covers but for at most their last `SUPERSEDED_TAIL` tokens are replaced: the one
        sharing the most with it is rewritten in place where the two differ, if it has room."""
        T = len(ids)
        H, hs = cache.k[0].shape[1], cache.k[0].shape[3]
        per_token = cache.bytes_per_token()
        if T == 0 or T * per_token > self.max_bytes:
            return
        a = np.asarray(ids, dtype=np.int64)
        covered = sorted(((shared, key) for key, e in self.entries.items()
                          if 0 < (shared := shared_prefix(e.ids, a, T)) >= len(e.ids) - SUPERSEDED_TAIL), reverse=True)
        grown = next(((shared, key) for shared, key in covered if self.entries[key].kv.size(3) >= T), None)
        for _, key in covered:
            if grown is None or key != grown[1]:
                self._drop(key)
        if grown is not None:
            shared, key = grown
            self._copy(cache, row, self.entries[key].kv, shared, T)
            self.entries[key].ids = a
            self.entries.move_to_end(key)
            return
        room = min(T + max(MIN_HEADROOM, T // HEADROOM), cache.k[0].size(2))
        capacity = max(T, min(room, (self.max_bytes - self.nbytes) // per_token))
        while self.nbytes + capacity * per_token > self.max_bytes:
            self._drop(next(iter(self.entries)))
            self.stats["evictions"] += 1
        kv = torch.empty((2, len(cache.k), H, capacity, hs), dtype=cache.k[0].dtype, device=cache.k[0].device)
        self._copy(cache, row, kv, 0, T)
        self.entries[self._next] = Entry(a, kv)
        self._next += 1
        self.nbytes += capacity * per_token

    @staticmethod
    def _copy(cache: KVCache, row: int, kv: torch.Tensor, start: int, end: int) -> None:
        """Positions start..end-1 of `row` of `cache` into an entry's `kv`, every layer."""
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            kv[0, layer, :, start:end] = k[row, :, start:end]
            kv[1, layer, :, start:end] = v[row, :, start:end]

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes


def kv_bytes_per_token(model: GPTNeoX) -> int:
    """Bytes of keys and values one token takes in every layer of `model`'s cache."""
    c = model.config
    dtype = model.gpt_neox.embed_in.weight.dtype  # the cache's dtype (KVCache follows the embedding)
    return 2 * c.n_layer * c.n_head * c.head_size * torch.empty((), dtype=dtype).element_size()


def prefill_reusing(model: GPTNeoX, ids: list[int] | np.ndarray, cache: KVCache, row: int, ops,
                    pool: PromptCache | None, reuse: bool = True,
                    extend: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor | None] | None = None,
                    held: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
    """Prompt `ids` into `row` of `cache` (positions 0..T-1), reusing what it can.

    The longest prefix `pool` holds is copied in, less what the row still holds: `held`, the
    tokens whose keys and values are at its first positions (the last prompt prefilled
    there; an editor's next keystroke lands in the row its last one left). With `reuse`
    False (llama.cpp's `cache_prompt: false`) every token runs. The rest runs through
    `extend(x, pos, row)` where the decode step has one for so few positions (the native
    kernels' one call for all blocks), else through the
    model with `ops` (the backend's prefill operations). The prompt is then stored in the
    pool either way, for the prompts after it.

    Returns the next-token logits [1, V] and the number of tokens reused (at most T - 1:
    the last token always runs, for its logits)."""
    T = len(ids)
    device = cache.k[0].device
    start = 0
    a = np.asarray(ids, dtype=np.int64)  # once (free for an int64 array), for every comparison below
    if pool is not None and not reuse:
        pool.stats["computed"] += T  # no lookup: neither a hit nor a miss
    elif pool is not None:
        kept = shared_prefix(held, a, T - 1) if held is not None else 0
        key, start = pool.lookup(a, limit=T - 1)
        if key is not None and start > kept:
            pool.load(key, cache, row, start, begin=kept)
        start = max(start, kept)
        pool.stats["hits" if start else "misses"] += 1
        pool.stats["reused"] += start
        pool.stats["computed"] += T - start
    x = torch.from_numpy(a[start:]).to(device)[None]  # [1, T - start]
    logits = None
    if extend is not None:
        logits = extend(x, torch.arange(start, T, device=device)[None], row)
    if logits is None:
        logits = prefill(model, x, CacheRows(cache, row, row + 1), ops, start=start)
    if pool is not None:
        pool.store(a, cache, row)
    return logits, start
