"""The decode step in PyTorch: one token for each of B cached rows, and its CPU tuning.

A decode step is an object the engine owns (`polycoder.generation.engine.Engine`), made by
`polycoder.backend.Backend.decode_step` for one model and one KV cache:

    step(x [B, 1], pos [B, 1], kv_len) -> next-token logits [B, V], fp32

for cache rows 0..B-1 (the engine keeps its active rows there). This module holds the
PyTorch forms: `EagerDecode` (the model's cached forward) and `CompiledDecode` (the same
under torch.compile, shapes dynamic in rows and cache length). The native CPU step is in
`polycoder.backend.native_decode`, the CUDA-graph step in `polycoder.backend.cuda_graphs`.

`EagerDecode` on the CPU tunes two things, both measured on PolyCoder-160M shapes
(figures in docs/benchmarks/README.md):
- `decode_layout`: fp32 linear weights [out, in] stored as the transpose of a contiguous
  [in, out] tensor (same shape, names and values), which sends a few-row product down
  BLAS's gemv path, faster on the 50304-wide head; bf16 weights keep their layout
  (transposing them measured slower). Done once, in place, when the step is made; the
  native step (which reads contiguous weights) undoes it with `standard_layout`, so the
  layout follows the last step made for a model.
- `single_row_bf16_kernels`: for one bf16 row, ATen's bf16 product over oneDNN's and SDPA's
  math backend over its flash kernel (both faster for one row, slower for several).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from polycoder.model import GPTNeoX, KVCache
from polycoder.ops import Ops


class DecodeStep(Protocol):
    writes_free_rows: bool
    """Whether a step also writes into cache rows past the B it computes (padding), so that a
    free row does not keep what it held."""

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Next-token logits [B, V] (fp32) of tokens x [B, 1] at positions pos [B, 1],
        written into cache rows 0..B-1 (and padding rows past them where `writes_free_rows`),
        attending to positions 0..kv_len-1."""
        ...

    def extend(self, x: torch.Tensor, pos: torch.Tensor, row: int) -> torch.Tensor | None:
        """The next-token logits [1, V] (fp32) of the end of one prompt, x [1, T] at positions
        pos [1, T] of cache row `row` (its earlier positions already there), where this step
        runs such a few positions in about one step's time; None leaves them to the prefill."""
        ...

    def verify(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] (fp32) of tokens x [B, T] at positions pos [B, T] of cache rows
        0..B-1 (each attending to its row's positions up to its own)."""
        ...


def prefill(model: GPTNeoX, x: torch.Tensor, cache, ops: Ops | None = None, start: int = 0) -> torch.Tensor:
    """Run prompt ids x [1, T] into cache rows at positions start..start+T-1 (positions
    0..start-1 already hold the prompt's first tokens, e.g. from a prompt cache); the
    next-token logits [1, V]. `ops`: the model's operations for it (default its own; the
    engine's backend chooses)."""
    T = x.size(1)
    pos = torch.arange(start, start + T, device=x.device)[None]
    return model(x, pos=pos, cache=cache, kv_len=start + T, select=torch.tensor([T - 1], device=x.device),
                 ops=ops)[:, 0]


def cached_forward(model: GPTNeoX, x: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                   ops: Ops | None = None) -> torch.Tensor:
    """Tokens x [B, T] at positions pos [B, T] through cache rows 0..B-1: logits [B, T, V] (fp32)."""
    return model(x, pos=pos, cache=cache, kv_len=int(pos.max()) + 1, ops=ops).float()


def decode_one_token(model: GPTNeoX, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len: int,
                     ops: Ops | None = None) -> torch.Tensor:
    """One token a row: x, pos [B, 1] for cache rows 0..B-1; next-token logits [B, V] (fp32)."""
    return model(x, pos=pos, cache=cache, kv_len=kv_len, ops=ops)[:, -1].float()


class EagerDecode:
    """The model's own cached forward, with the single-row bf16 tuning of the module
    docstring (`ops`: the model's operations for these steps, default its own). The weight
    layout is the caller's: `Backend.decode_step` applies `decode_layout` first."""

    writes_free_rows = False

    def __init__(self, model: GPTNeoX, cache: KVCache, ops: Ops | None = None):
        self.model, self.cache, self.ops = model, cache, ops

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        with single_row_bf16_kernels(self.model, x.size(0)):
            return decode_one_token(self.model, x, pos, self.cache, kv_len, self.ops)

    def verify(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return cached_forward(self.model, x, pos, self.cache, self.ops)

    def extend(self, x: torch.Tensor, pos: torch.Tensor, row: int) -> None:
        return None  # the prefill's own pass is this step's


class CompiledDecode:
    """`decode_one_token` under torch.compile.

    Only the decode step is compiled (prefill shapes vary with every prompt). Shapes use
    torch.compile's automatic dynamism: the first step compiles for its shapes, and the
    rows and the cache length become symbolic when they first change (one recompile each).
    `dynamic=True`, which makes every size symbolic from the start (the weights' included),
    miscompiled on torch 2.13 with AVX-512 (NaN logits, or a corrupted heap, at some
    vocabulary sizes with 2 rows). On a CPU `Backend.decode_step` no longer builds this
    step: with automatic dynamism too, and with static shapes, torch 2.13's CPU code gave
    NaN logits (its AVX2 code, ATEN_CPU_CAPABILITY=avx2, what a CPU without AVX-512 gets,
    at every vocabulary size tried, 8,320 and 50,304 included) or corrupted the heap (its
    AVX-512 code, at some shapes; the keys' `scatter_` into the cache appeared to be involved),
    with or without our kernels loaded (found by `ATEN_CPU_CAPABILITY=avx2 pytest
    tests/test_inference.py -k compiled` at 99fede3; the other shapes and the heap
    corruption by ad hoc scripts, not kept). There it also took minutes to compile on 2
    cores and did not pay (benchmarks/decode.py --compile)."""

    _compiled = None  # one compiled function for the process: its guards tell models apart
    writes_free_rows = False

    def __init__(self, model: GPTNeoX, cache: KVCache):
        self.model, self.cache = model, cache
        if CompiledDecode._compiled is None:
            CompiledDecode._compiled = torch.compile(decode_one_token)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        return CompiledDecode._compiled(self.model, x, pos, self.cache, kv_len)

    def verify(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return cached_forward(self.model, x, pos, self.cache)  # eager: T varies with every check

    def extend(self, x: torch.Tensor, pos: torch.Tensor, row: int) -> None:
        return None  # prefill shapes vary with every prompt: not compiled


def decode_layout(model: nn.Module) -> nn.Module:
    """Store fp32 CPU linear weights transposed (same shape, names and values): faster gemv.
    Idempotent; a tied input embedding follows its head."""
    return _relayout(model, lambda w: w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous(),
                     lambda w: w.t().contiguous().t())


def standard_layout(model: nn.Module) -> nn.Module:
    """Undo `decode_layout`: linear weights stored contiguous again (same shape, names and
    values). Idempotent; a tied input embedding follows its head."""
    return _relayout(model, lambda w: not w.is_contiguous(), lambda w: w.contiguous())


@torch.no_grad()
def _relayout(model: nn.Module, wants, make) -> nn.Module:
    """Replace each linear weight for which wants(weight) by make(weight) (a new Parameter of
    the same values); an embedding tied to a replaced weight follows it."""
    moved: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) and wants(m.weight):
            new = nn.Parameter(make(m.weight.detach()), requires_grad=m.weight.requires_grad)
            moved[id(m.weight)] = new
            m.weight = new
    for m in model.modules():
        if isinstance(m, nn.Embedding) and id(m.weight) in moved:
            m.weight = moved[id(m.weight)]
    return model


def single_row_bf16_kernels(model: GPTNeoX, rows: int):
    """The context to run a decode step of `rows` tokens in: for one row of a bf16 CPU
    model, ATen's bf16 products (oneDNN off) and SDPA's math backend; else nothing."""
    w = model.gpt_neox.embed_in.weight
    if rows == 1 and w.dtype == torch.bfloat16 and w.device.type == "cpu":
        return _bf16_single_row()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _bf16_single_row():
    with _onednn_off(), sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def _onednn_off():
    # The process-wide switch behind torch.backends.mkldnn.flags(enabled=False), without the
    # TF32 warning that flags() emits on every CPU build. Process-wide: run decode steps of
    # one process from one thread at a time (the engine does).
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)
