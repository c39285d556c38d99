"""CPU training's attention: q, k, v from the fused projection, and causal attention.

`rotary_qkv` splits the interleaved query_key_value output into q, k, v and rotates q and
k in one native pass each way (fp32 or bf16; `polycoder.kernels.rotary_qkv_`), where torch
took a split, a rotation, a concatenation and transposing copies, and as many again in
backward (measured several times faster, forward + backward, at 160M shapes:
`benchmarks/train_kernels.py`, figures in docs/benchmarks/README.md).

`causal_attention` keeps PyTorch's flash forward and gives bf16 a faster backward. On the
CPU, `F.scaled_dot_product_attention` (flash) spends most of a bf16 forward + backward in
the backward (profiled at PolyCoder-160M's shapes). This backward recomputes the attention probabilities from the forward's
log-sum-exp, as flash attention's backward does, in one native pass over a group of heads
(`polycoder.kernels.attention_grad_bf16_`: q.k and dO.v as AMX tile products accumulated
in fp32, or vdpbf16ps where the CPU has no AMX; p and ds written in bf16, zero above the
diagonal), then

    dv = p^T dO,   dq = ds k,   dk = ds^T q

as whole bf16 matrix products (oneDNN, on AMX). Products over blocks that skip the zero
triangle measured slower (their strided operands are copied). Forward + backward measured
about twice as fast as SDPA's with AMX and 1.5x on the vdpbf16ps path (POLYCODER_AMX=0;
`benchmarks/train_kernels.py`, docs/benchmarks/README.md), with gradients closer to fp64
than SDPA's
(tests/test_train_attention.py). p and ds exist for one group of heads at a time
(at most `GROUP_BYTES`, buffers kept between calls). Anything else (fp32, other devices,
no gradients, a CPU without AVX512-BF16, `POLYCODER_KERNELS=0`) is plain SDPA.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F

from polycoder import kernels

GROUP_BYTES = 64 << 20  # p and ds of one group of heads together
_local = threading.local()


def _workspace(name: str, numel: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A buffer of at least `numel` elements kept between calls (one a thread): fresh
    buffers of this size cost more in page faults than the kernel that fills them."""
    spaces = _local.__dict__.setdefault("spaces", {})
    buf = spaces.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = spaces[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _padded(x: torch.Tensor, Tp: int, Dp: int) -> torch.Tensor:
    """[n, T, D] -> [n, Tp, Dp], zeros beyond (a copy only where padding is needed)."""
    n, T, D = x.shape
    return x if (T, D) == (Tp, Dp) else F.pad(x, (0, Dp - D, 0, Tp - T))


@functools.cache
def _flash_cpu():
    """torch's CPU flash attention op (private, so looked up once; None where absent)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = _flash_cpu()(q, k, v, 0.0, True)  # SDPA's own CPU kernel, with its log-sum-exp
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        n, scale = B * H, 1.0 / math.sqrt(D)
        Tp, Dp = kernels.round_up32(T), kernels.round_up32(D)
        q, k, v, do, out = (t.reshape(n, T, D).contiguous() for t in (q, k, v, grad_out.to(q.dtype), out))
        qp, dop = _padded(q, Tp, Dp), _padded(do, Tp, Dp)
        lse = lse.reshape(n, T).contiguous()
        dq, dk, dv = (torch.empty(n, T, D, dtype=q.dtype) for _ in range(3))
        group = max(1, GROUP_BYTES // (4 * T * T))
        for h0 in range(0, n, group):
            h1 = min(n, h0 + group)
            p = _workspace("p", (h1 - h0) * T * T).view(h1 - h0, T, T)
            ds = _workspace("ds", (h1 - h0) * T * T).view(h1 - h0, T, T)
            work = _workspace("work", kernels.attention_work(h1 - h0, T, D), torch.float32)
            kernels.attention_grad_bf16_(qp[h0:h1], dop[h0:h1], out[h0:h1], k[h0:h1], v[h0:h1], lse[h0:h1],
                                         scale, p, ds, work)
            torch.bmm(ds, k[h0:h1], out=dq[h0:h1])
            torch.bmm(ds.transpose(1, 2), q[h0:h1], out=dk[h0:h1])
            torch.bmm(p.transpose(1, 2), do[h0:h1], out=dv[h0:h1])
        return dq.view(B, H, T, D), dk.view(B, H, T, D), dv.view(B, H, T, D)


class _RotaryQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head, cos, sin, dtype):
        B, T, C3 = qkv.shape
        x = qkv.view(B, T, n_head, 3, C3 // (3 * n_head))
        q, k, v = (torch.empty(B, n_head, T, x.shape[-1], dtype=dtype) for _ in range(3))
        kernels.rotary_qkv_(x, q, k, v, cos, sin, grad=False)
        ctx.save_for_backward(cos, sin)
        ctx.shape, ctx.dtype = x.shape, qkv.dtype
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        B, T, H, _, hs = ctx.shape
        like = next(g for g in (dq, dk, dv) if g is not None)  # an output nothing used has no gradient
        dq, dk, dv = ((torch.zeros_like(like) if g is None else g).contiguous() for g in (dq, dk, dv))
        dx = torch.empty(ctx.shape, dtype=ctx.dtype)
        kernels.rotary_qkv_(dx, dq, dk, dv, cos, sin, grad=True)
        return dx.view(B, T, H * 3 * hs), None, None, None, None


def rotary_qkv(qkv: torch.Tensor, n_head: int, cos: torch.Tensor, sin: torch.Tensor):
    """q, k, v [B, H, T, hs] from the fused projection [B, T, 3C] (interleaved per head),
    q and k rotated by cos/sin [T, rot] (fp32), in one native pass each way
    (`polycoder.kernels.rotary_qkv_`); None where that does not apply (then the caller's
    torch path runs). Under CPU autocast to bf16 the outputs are bf16, as SDPA would cast
    them; in fp32, fp32."""
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    dtype = torch.bfloat16 if autocast else torch.float32
    if not (qkv.device.type == "cpu" and qkv.is_contiguous() and cos.dtype == sin.dtype == torch.float32
            and (autocast or qkv.dtype == torch.float32) and qkv.dtype in (torch.float32, torch.bfloat16)
            and kernels.available()):
        return None
    return _RotaryQKV.apply(qkv, n_head, cos.contiguous(), sin.contiguous(), dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), causal) v for q, k, v [B, H, T, d]; see the module.

    Under CPU autocast to bf16, q, k and v go in as bf16, as SDPA would take them."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    if (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.size(-1) % 2 == 0
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and kernels.has_attention_grad_bf16() and _flash_cpu() is not None):
        return _CausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
