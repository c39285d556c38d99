"""The decode step at static shapes, captured as CUDA graphs on a GPU.

`StaticDecode(model, cache, graphs)` is a decode step (`polycoder.backend.decode`). Rows
are padded up to a bucket (1, 2, 4, ... up to the cache's rows) and attention reads a
cache length rounded up to `kv_block` positions, so each (rows, length) bucket is one
fixed computation: on a GPU it is captured once as a CUDA graph and replayed, one launch
a token instead of one per kernel (a 2.7B model's 32 blocks are hundreds of launches a
step, milliseconds of host time against about a millisecond of reading the weights on an
H100/H200).

Padding rows carry token 0 at position 0. They write only into cache rows the engine is
not using (its active rows are always 0..B-1, and a row that joins is prefilled from
position 0), and their logits are dropped. Positions between a row's own and the rounded
length are masked by position, as in every step. With `graphs=False` the same padded
static step runs eagerly (how it is tested without a GPU). A capture that fails falls
back to eager decoding with a message; POLYCODER_CUDA_GRAPHS=0 skips graphs altogether
(`polycoder.backend.choose`).

Limit: not yet run on a GPU by this project (tested eagerly on the CPU).
"""

from __future__ import annotations

import sys

import torch

from polycoder.backend.decode import cached_forward, decode_one_token
from polycoder.model import GPTNeoX, KVCache


class StaticDecode:
    """The decode step at static (bucketed) shapes; CUDA graphs when `graphs`."""

    writes_free_rows = True
    """Its padding rows write into cache rows the engine is not using (see the module)."""

    def __init__(self, model: GPTNeoX, cache: KVCache, graphs: bool, kv_block: int = 256):
        self.model, self.cache, self.use_graphs, self.kv_block = model, cache, graphs, kv_block
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None  # one memory pool shared by every captured graph

    def extend(self, x: torch.Tensor, pos: torch.Tensor, row: int) -> None:
        return None  # the prefill's pass, eagerly

    def verify(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The speculative check, eagerly (its shapes vary with every check): it writes only
        the rows and positions it verifies, so the captured graphs' buffers stay valid."""
        return cached_forward(self.model, x, pos, self.cache)

    def bucket(self, rows: int, kv_len: int) -> tuple[int, int]:
        b = 1
        while b < rows:
            b *= 2
        return min(b, self.cache.rows), min(self.cache.max_len, -(-kv_len // self.kv_block) * self.kv_block)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        B = x.size(0)
        b, s = self.bucket(B, kv_len)
        if not self.use_graphs:
            pad = b - B
            if pad:
                x, pos = torch.cat([x, x.new_zeros(pad, 1)]), torch.cat([pos, pos.new_zeros(pad, 1)])
            return decode_one_token(self.model, x, pos, self.cache, s)[:B]
        entry = self.graphs.get((b, s))
        if entry is None:
            try:
                entry = self.graphs[(b, s)] = self._capture(b, s, x, pos)
            except RuntimeError as e:  # a step that cannot be captured still decodes, eagerly
                print(f"polycoder: CUDA graph capture failed ({str(e)[:200]}); decoding without graphs "
                      "(POLYCODER_CUDA_GRAPHS=0 skips the attempt)", file=sys.stderr)
                self.use_graphs = False
                return self(x, pos, kv_len)
        graph, static_x, static_pos, out = entry
        static_x[:B], static_pos[:B] = x, pos
        static_x[B:], static_pos[B:] = 0, 0  # padding rows: token 0 at position 0
        graph.replay()
        return out[:B].clone()

    def _capture(self, b: int, s: int, x: torch.Tensor, pos: torch.Tensor) -> tuple:
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
                decode_one_token(self.model, static_x, static_pos, self.cache, s)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = decode_one_token(self.model, static_x, static_pos, self.cache, s)
        self.pool = graph.pool()
        return graph, static_x, static_pos, out
