"""Deterministic batches of token windows from memory-mapped token shards.

A batch is a pure function of (seed, step): nothing is carried from one step to the next,
so a resumed run lands on exactly the batch the uninterrupted run would have drawn next,
and N processes split the very batch one process would have seen (each takes its own
rows), which is what makes 2-process training equal 1-process training.

Each window is `seq_len + 1` consecutive tokens of one shard: inputs are the first
`seq_len`, targets the last `seq_len`. Documents inside a shard are separated by the EOD
token and windows run across those boundaries (GPT-NeoX and nanoGPT do the same; attention
is not masked at document boundaries). Windows never cross shards.

With a fill-in-the-middle transform (`polycoder.train.fim_transform`), each window's
document pieces are rearranged after it is read, by draws seeded by (seed, step, row of the
global batch): batches stay a pure function of (seed, step), and targets that are
`<fim_pad>` are ignored (-100).

Two orders (`DataSettings.sampling`):
- `random`: each step draws `batch_size` window starts uniformly over every possible
  start of every shard, with replacement, from a generator seeded by (seed, step).
- `sequential`: the disjoint windows of all shards (shard 0 first), permuted once an epoch
  by a generator seeded by (seed, epoch), consumed `batch_size` at a time. Every token is
  seen once an epoch. The permutation is held in memory: 4 bytes a window (60M windows of
  2048 tokens, about PolyCoder's 249 GB corpus, take 240 MB).

References: nanoGPT's `get_batch` (uint16 memmap, random windows); llm.c's shard header.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polycoder.errors import PolycoderError
from polycoder.token_shards import list_shards, read_shard
from polycoder.train.fim_transform import FimTransform


@dataclass(frozen=True)
class LoaderState:
    """What a checkpoint records about the data, to refuse a resume on different data."""

    sampling: str
    seed: int
    seq_len: int
    batch_size: int
    n_tokens: int
    """Total tokens of the training shards."""
    fim_rate: float = 0.0
    """Fill-in-the-middle rate (0: none; checkpoints from before FIM training read as 0)."""
    fim_spm_rate: float = 0.0
    """Share of the FIM samples in SPM order (0 where fim_rate is 0)."""
    fim_line_rate: float = 0.0
    """Share of the FIM samples cut at lines (checkpoints from before line spans read as 0)."""


class WindowLoader:
    """Batches of windows over a list of token arrays (memmaps of the shards)."""

    def __init__(self, arrays: Sequence[np.ndarray], seq_len: int, batch_size: int,
                 sampling: str = "random", seed: int = 0, transform: FimTransform | None = None):
        if sampling not in ("random", "sequential"):
            raise PolycoderError(f"sampling must be 'random' or 'sequential', got {sampling!r}")
        self.arrays = list(arrays)
        self.seq_len, self.batch_size, self.sampling, self.seed = seq_len, batch_size, sampling, seed
        self.transform = transform
        lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)
        if sampling == "random":
            per_array = np.maximum(lengths - seq_len, 0)  # starts s with s + seq_len + 1 <= len
        else:
            per_array = np.maximum((lengths - 1) // seq_len, 0)  # disjoint windows (targets overlap by 1)
        self._cum = np.concatenate([[0], np.cumsum(per_array)])
        self.n_units = int(self._cum[-1])
        if self.n_units == 0:
            raise PolycoderError(
                f"the token shards hold {int(lengths.sum())} tokens, too few for one window of "
                f"{seq_len + 1}; use more data or a smaller data.seq_len")
        self._perm_epoch, self._perm = -1, None

    @property
    def state(self) -> LoaderState:
        t = self.transform
        rates = (t.fim_rate, t.fim_spm_rate, t.fim_line_rate) if t else (0.0, 0.0, 0.0)
        return LoaderState(self.sampling, self.seed, self.seq_len, self.batch_size,
                           int(sum(len(a) for a in self.arrays)), *rates)

    def _starts(self, step: int) -> list[tuple[int, int]]:
        """(array index, token offset) of each window of the global batch at `step`."""
        if self.sampling == "random":
            rng = np.random.Generator(np.random.PCG64([self.seed, step]))
            units = rng.integers(0, self.n_units, size=self.batch_size)
        else:
            g = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
            units = np.empty(self.batch_size, dtype=np.int64)
            for epoch in np.unique(g // self.n_units):
                sel = g // self.n_units == epoch
                units[sel] = self._permutation(int(epoch))[g[sel] % self.n_units]
        idx = np.searchsorted(self._cum, units, side="right") - 1
        local = units - self._cum[idx]
        scale = 1 if self.sampling == "random" else self.seq_len
        return [(int(i), int(u) * scale) for i, u in zip(idx, local)]

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, 1_000_003, epoch]))
            dtype = np.uint32 if self.n_units < 2**32 else np.int64
            self._perm = rng.permutation(self.n_units).astype(dtype)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole batch of `step`: inputs and targets, int64 [batch_size, seq_len]."""
        return self._gather(self._starts(step), step, 0)

    def micro_batch(self, step: int, rank: int, world_size: int, micro: int, micro_step: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the global batch that `rank` uses in accumulation step `micro_step`.

        Row order: accumulation step, then rank, then row; any fixed split gives the same
        mean gradient, this one keeps each process's rows contiguous.
        """
        first = (micro_step * world_size + rank) * micro
        return self._gather(self._starts(step)[first:first + micro], step, first)

    def _gather(self, starts: list[tuple[int, int]], step: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the windows at `starts`, rows first, first + 1, ... of the step's batch."""
        T = self.seq_len
        rows = np.stack([np.asarray(self.arrays[i][o:o + T + 1], dtype=np.int64) for i, o in starts])
        if self.transform is None:
            t = torch.from_numpy(rows)  # [B, T + 1]
            return t[:, :-1], t[:, 1:]
        t = torch.from_numpy(self.transform.rows(rows, step, range(first, first + len(rows))))
        return t[:, :-1], self.transform.mask_pad(t[:, 1:])


def eval_windows(arrays: Sequence[np.ndarray], seq_len: int, n: int) -> list[tuple[int, int]]:
    """`n` disjoint windows spread evenly over the shards (the same ones at every evaluation)."""
    per = [max(0, (len(a) - 1) // seq_len) for a in arrays]
    total = sum(per)
    if total == 0:
        return []
    picks = np.unique(np.linspace(0, total - 1, num=min(n, total)).round().astype(np.int64))
    cum = np.concatenate([[0], np.cumsum(per)])
    idx = np.searchsorted(cum, picks, side="right") - 1
    return [(int(i), int(p - cum[i]) * seq_len) for i, p in zip(idx, picks)]


def gather_windows(arrays: Sequence[np.ndarray], starts: list[tuple[int, int]], seq_len: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(arrays[i][o:o + seq_len + 1], dtype=np.int64) for i, o in starts])
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


def open_split(tokens_dir: str | Path, split: str) -> tuple[list[np.ndarray], int]:
    """Token memmaps of one split of a `polycoder data tokenize` folder, and the vocab size."""
    tokens_dir = Path(tokens_dir)
    if not tokens_dir.is_dir():
        raise PolycoderError(f"token folder {tokens_dir} not found; make one with `polycoder data tokenize`")
    if split != "train" and not list((tokens_dir / split).glob("shard_*.bin")):
        return [], 0  # validation is optional
    paths = list_shards(tokens_dir, split)
    shards = [read_shard(p) for p in paths]
    vocab = {s.vocab_size for s in shards}
    if len(vocab) != 1:
        raise PolycoderError(f"{tokens_dir}/{split}: shards disagree on the vocabulary size ({sorted(vocab)}); "
                             "tokenize the whole corpus with one tokenizer")
    return [s.tokens for s in shards], vocab.pop()
