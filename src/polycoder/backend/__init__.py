"""The fast paths, chosen in one place.

The model (`polycoder.model`) is plain PyTorch. Everything faster is an object that the
code running the model owns, made from one `Backend`:

| fast path | where it runs | module |
|---|---|---|
| native CPU kernels: the whole decode step in one call (`native_kernels`) | `Backend.decode_step` | `native_decode` |
| native CPU kernels: the prefill's products of a few rows (`native_kernels`) | `Backend.prefill_ops` | `few_rows` |
| native CPU kernels for training (listed below) | `Backend.train_ops` | `attention`, `fused_loss` |
| fp32 training products through oneDNN (`onednn_fp32`; non-Intel CPUs) | `Backend.train_ops` | `onednn` |
| output head fused with the cross-entropy (always in training) | `Backend.train_ops` | `fused_loss` |
| decode step replayed as CUDA graphs (`cuda_graphs`; GPUs) | `Backend.decode_step` | `cuda_graphs` |
| decode step under torch.compile (asked for, never chosen; GPUs only) | `Backend.decode_step` | `decode` |
| PyTorch's decode step, CPU-tuned (everything else) | `Backend.decode_step` | `decode` |

The native CPU kernels for training: QKV split + rotary, bf16 attention backward, bf16 softmax of the loss.

`choose(device)` reads the machine and the switches once: POLYCODER_KERNELS=0 (no native
kernels), POLYCODER_FP32_GEMM=onednn|mkl (the fp32 product route), POLYCODER_CUDA_GRAPHS=0
(no graphs). The engine (`polycoder.generation.engine`) and the trainer
(`polycoder.train.loop`) each call it once; tests and benchmarks compare paths by
building a `Backend` with the fields they want, never by replacing functions.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from polycoder import kernels
from polycoder.backend import onednn
from polycoder.backend.cuda_graphs import StaticDecode
from polycoder.backend.decode import CompiledDecode, DecodeStep, EagerDecode, decode_layout
from polycoder.backend.few_rows import FEW_ROW_OPS
from polycoder.backend.native_decode import NativeDecode
from polycoder.backend.train_ops import TrainOps
from polycoder.model import TORCH_OPS, GPTNeoX, KVCache
from polycoder.ops import Ops

__all__ = ["Backend", "choose", "PLAIN", "DecodeStep", "TrainOps", "physical_cores", "set_threads"]


@dataclass(frozen=True)
class Backend:
    """Which fast paths run (see the module for what each one is)."""

    native_kernels: bool = False
    """polycoder's C kernels on the CPU (decode step, training's rotary/attention/softmax)."""
    onednn_fp32: bool = False
    """fp32 training products through oneDNN instead of MKL."""
    cuda_graphs: bool = False
    """Replay the GPU decode step as CUDA graphs."""

    def train_ops(self) -> TrainOps:
        """The operations the model's training path runs (`polycoder.ops`)."""
        return TrainOps(native=self.native_kernels, onednn_fp32=self.onednn_fp32)

    def prefill_ops(self, device: str | torch.device) -> Ops:
        """The operations of the engine's prefill on `device` (`polycoder.ops`): native
        products of a few rows (every prompt's output head, short prompts) where the native
        kernels run, else plain PyTorch (`TorchOps`)."""
        return FEW_ROW_OPS if self._native_on(device) else TORCH_OPS

    def verify_positions(self, device: str | torch.device) -> int:
        """Token positions one cached forward pass takes at about the cost of one decode step:
        speculative decoding's budget (rows x (drafts + 1)). On a CPU the decode step streams
        the weights once for up to `kernels.MAX_ROWS` rows (the native kernels' limit, where
        PyTorch's small products are as memory-bound); a GPU step is launch-bound far beyond
        (64: a guess, not yet measured on a GPU)."""
        return 64 if torch.device(device).type == "cuda" else kernels.MAX_ROWS

    def decode_step(self, model: GPTNeoX, cache: KVCache, compile: bool = False,
                    static_shapes: bool | None = None) -> DecodeStep:
        """The decode step for `model` over `cache` (rows 0..B-1 of it at each call).

        `compile`: torch.compile the step, on a GPU (on a CPU it is refused with a warning, and
        the step below is used: `CPU_COMPILE_REFUSED`). `static_shapes`: the CUDA-graph step's
        padded, bucketed shapes (default: on a GPU with `cuda_graphs`, unless compiling); True
        on the CPU runs them eagerly (how they are tested without a GPU), and wins over `compile`."""
        device = cache.k[0].device.type
        on_gpu = device == "cuda"
        if compile and device == "cpu":
            _warn_once(CPU_COMPILE_REFUSED)
            compile = False
        if static_shapes is None:
            static_shapes = on_gpu and self.cuda_graphs and not compile
        if static_shapes:
            return StaticDecode(model, cache, graphs=on_gpu)
        if compile:
            return CompiledDecode(model, cache)
        if self._native_on(cache.k[0].device):
            return NativeDecode(model, cache)
        return EagerDecode(decode_layout(model), cache)

    def _native_on(self, device: str | torch.device) -> bool:
        return self.native_kernels and torch.device(device).type == "cpu"


CPU_COMPILE_REFUSED = (
    "compile: the decode step is not compiled on a CPU, and runs as it does without --compile. torch.compile "
    "miscompiled it on torch 2.13's CPU code (NaN logits with its AVX2 code, a corrupted heap with its AVX-512 "
    "code, at PolyCoder's shapes); where it compiled, it decoded no faster than the native kernels.")
"""Why `compile` is refused on a CPU (the warning `Backend.decode_step` logs once a process)."""


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger("polycoder").warning(message)

PLAIN = Backend()
"""No fast path: PyTorch only (the reference the others are tested against)."""


def choose(device: str | torch.device = "cpu") -> Backend:
    """The fast paths that apply on `device` of this machine, with the environment's switches."""
    kind = torch.device(device).type
    return Backend(
        native_kernels=kind == "cpu" and kernels.available(),
        onednn_fp32=kind == "cpu" and onednn.preferred(),
        cuda_graphs=kind == "cuda" and os.environ.get("POLYCODER_CUDA_GRAPHS", "1") != "0",
    )


def physical_cores() -> int:
    """Physical cores this process may run on (logical CPUs / threads per core)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read().strip()
        per_core = sum(int(b) - int(a) + 1 if "-" in part else 1
                       for part in siblings.split(",") for a, _, b in [part.partition("-")])
    except OSError:
        per_core = 1
    return max(1, logical // max(1, per_core))


def set_threads(n: int | None = None) -> int:
    """torch's intra-op threads: n, or one a physical core (hyperthreads share the load and
    store units, and decoding is bound by memory bandwidth). Returns the number set."""
    n = n or physical_cores()
    torch.set_num_threads(n)
    return n
