"""fp32 matrix products of training through oneDNN, the other BLAS inside torch's CPU build.

torch routes an fp32 `F.linear` / `torch.mm` on the CPU to MKL's sgemm. On AMD EPYC CPUs
MKL takes a slower code path, and oneDNN (which torch already uses for its bf16 products)
was measured clearly faster on the same fp32 shapes. Both are IEEE fp32 products with fp32
accumulation (no bf16/tf32 "fast math": oneDNN's default strict mode); they differ in
summation order only.

On an Intel Xeon the opposite holds: MKL runs at its full rate, and this module's
products, whose backward passes hand oneDNN transposed operands, measured slower than
MKL's for a linear's forward + backward. (Figures: docs/benchmarks/README.md.) So
`preferred()` (the vendor in /proc/cpuinfo;
POLYCODER_FP32_GEMM=onednn or mkl overrides) says yes only on CPUs that are not Intel's,
and `polycoder.backend.choose` takes the oneDNN route where it does.

`linear(x, weight, bias)` is a differentiable `F.linear` whose three products (y, dL/dx,
dL/dW) go through `torch.ops.mkldnn._linear_pointwise`, the op torch's own compiler uses
for CPU linears; `matmul_nt(a, b)` is `a @ b.T` the same way. Limits: the op is private
to torch (checked once by `available()`); CPU, fp32, no autocast; speed measured on the
two machines of docs/benchmarks/README.md only.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from polycoder import cpu


@functools.cache
def available() -> bool:
    """Whether the oneDNN linear op exists here and agrees with torch.mm on a small product."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(33, 40, generator=g), torch.randn(17, 40, generator=g)
        return torch.allclose(_lp(a, b), a @ b.t(), rtol=1e-5, atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def preferred() -> bool:
    """Whether fp32 training products should go through oneDNN on this machine."""
    choice = os.environ.get("POLYCODER_FP32_GEMM", "").lower()
    if choice in ("onednn", "mkl"):
        return choice == "onednn" and available()
    return cpu.vendor() not in ("", "GenuineIntel") and available()


def _lp(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [None], "")


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes this call: fp32 CPU tensors, gradients being recorded, no autocast."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T through oneDNN for fp32 CPU matrices a [M, K], b [N, K] (any strides), no autograd."""
    return _lp(a, b)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.size(-1))  # [M, in]
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _lp(x2, weight, bias).view(*x.shape[:-1], weight.size(0))  # [..., out]

    @staticmethod
    def backward(ctx, gy):
        x2, weight = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.size(-1))  # [M, out]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _lp(g2, weight.t()).view(*gy.shape[:-1], weight.size(1))  # g @ W: [..., in]
        if ctx.needs_input_grad[1]:
            dw = _lp(g2.t(), x2.t())  # g.T @ x: [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN where `applies` (differentiable)."""
    if applies(x, weight):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
