"""Output head and next-token cross-entropy fused, gradients computed in the forward pass.

`linear_cross_entropy(h, weight, targets)` equals
`F.cross_entropy((h @ weight.T).float(), targets, ignore_index=-100)` (the mean over the
non-ignored rows), value and gradients, without the usual trail of [N, V] tensors: logits,
their fp32 copy, the log-softmax, the gradient of the log-softmax and that of the logits
(each 2048 x 50304 floats for one 4 x 512 PolyCoder batch, each one or more passes over
memory). Here the logits are one buffer in the compute dtype; the softmax runs over row
chunks upcast to fp32 while they sit in the cache, and overwrites the logits with their
gradient in the same forward pass (the loss is a scalar, so its gradient needs nothing from
backward but one scale); then dL/dh and dL/dW are two matrix products with that buffer.
The idea is Liger-Kernel's FusedLinearCrossEntropy (Hsu et al., 2024, arXiv:2410.10989),
written with plain torch operations; with `native=True` (the backend's choice where the
kernels are built, `polycoder.kernels`), the softmax pass over bf16 CPU logits is one native
call instead, and with `onednn=True` the fp32 CPU products go through oneDNN
(`polycoder.backend.onednn`). Its row-chunked matrix products are not used: a 64-row fp32
product of the head measured under half the rate of one over all rows
(docs/benchmarks/README.md).

Precision: the matrix products run in the compute dtype (bf16 under CPU autocast, as
`nn.Linear` would under autocast; fp32 otherwise), the softmax, log-sum-exp and loss in
fp32, the gradient of the logits is rounded to the compute dtype before the products, as
autocast's backward does. Limits: one head weight without bias (GPT-NeoX's `embed_out`);
no double backward.
"""

from __future__ import annotations

import torch

from polycoder import kernels
from polycoder.backend import onednn

IGNORE_INDEX = -100


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


def _matmul_nt(a: torch.Tensor, b: torch.Tensor, use_onednn: bool) -> torch.Tensor:
    """a @ b.T, through oneDNN for fp32 CPU matrices when asked."""
    if use_onednn and a.dtype == torch.float32 and a.device.type == "cpu":
        return onednn.matmul_nt(a, b)
    return torch.mm(a, b.t())


def _loss_and_grad(h, w, targets, chunk: int, need_grad: bool, native: bool, use_onednn: bool):
    """(sum of the per-row losses, number of counted rows, d(mean loss)/d(logits) or None).

    `h` [N, C] and `w` [V, C] in the compute dtype. The logits are one matrix product into
    a buffer of the compute dtype (a large product runs near the GEMM peak; 64-row products
    reach under half of it in fp32 here); the softmax then runs over `chunk` rows at a time,
    upcast to fp32 while they sit in the cache, and overwrites the logits with their
    gradient.
    """
    N = h.size(0)
    valid = targets != IGNORE_INDEX
    n = valid.sum().clamp(min=1).to(torch.float32)
    # Row weights of the mean: 1/n, 0 for ignored rows; as a log so that the scale folds
    # into the exponent (log 0 = -inf gives exp(-inf) = 0 for ignored rows).
    log_w = torch.where(valid, -torch.log(n), float("-inf"))
    safe_t = targets.clamp(min=0)
    logits = _matmul_nt(h, w, use_onednn)  # [N, V] compute dtype
    if native and logits.dtype == torch.bfloat16 and logits.device.type == "cpu" and kernels.available():
        # One native pass a row: no fp32 copy of the logits (polycoder.kernels).
        lse, picked = kernels.cross_entropy_bf16_(logits, safe_t, log_w.exp(), need_grad)
        total = torch.where(valid, lse - picked, 0.0).sum()
        return total, n, logits if need_grad else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        z = logits[s:e].float()  # [R, V] fp32: the same tensor in fp32, a copy in bf16
        lse = torch.logsumexp(z, dim=-1)  # [R]
        picked = z.gather(1, safe_t[s:e, None])[:, 0]  # [R]
        total += torch.where(valid[s:e], lse - picked, 0.0).sum()
        if need_grad:
            # softmax / n, then -1/n at the target: the gradient of the mean loss in the logits.
            z.sub_((lse - log_w[s:e])[:, None]).exp_()
            z.scatter_add_(1, safe_t[s:e, None], -log_w[s:e, None].exp())
            if z.data_ptr() != logits[s:e].data_ptr():
                logits[s:e].copy_(z)
    return total, n, logits if need_grad else None


def _head_grad(h: torch.Tensor, grad_logits: torch.Tensor, dtype: torch.dtype, native: bool,
               use_onednn: bool) -> torch.Tensor:
    """dL/dW [V, C] = grad_logits.T @ h, contiguous, in `dtype` (the weight's).

    With MKL (and bf16 everywhere) the product is taken in that order: it measured faster
    than the transpose of h.T @ grad_logits, and a transposed [V, C] gradient costs a slow
    transposing copy later. Two exceptions: oneDNN's fp32 route (non-Intel CPUs) measured
    faster the other way round; and a bf16 product for an fp32 weight (autocast) runs as
    h.T @ grad_logits, transposed and widened to fp32 in one native pass
    (`kernels.transpose_bf16_to_f32`), which the weight's fp32 gradient needs anyway and
    which measured faster than g.T @ h and its cast (`benchmarks/train_kernels.py`;
    figures in docs/benchmarks/README.md).
    """
    if use_onednn and h.dtype == torch.float32 and h.device.type == "cpu":
        return onednn.matmul_nt(h.t(), grad_logits.t()).t()
    if native and h.dtype == torch.bfloat16 and dtype == torch.float32 and h.device.type == "cpu" and kernels.available():
        return kernels.transpose_bf16_to_f32(torch.mm(h.t().contiguous(), grad_logits))
    return torch.mm(grad_logits.t(), h)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype, native, use_onednn):
        hc, wc = h.to(dtype), weight.to(dtype)
        total, n, grad_logits = _loss_and_grad(hc, wc, targets, chunk, True, native, use_onednn)  # grad_logits [N, V]
        dh = _matmul_nt(grad_logits, wc.t(), use_onednn)  # [N, C]
        dw = _head_grad(hc, grad_logits, weight.dtype, native, use_onednn) if ctx.needs_input_grad[1] else None  # [V, C]
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        scale = None if grad_out.item() == 1.0 else grad_out.to(torch.float32)
        dh = dh.to(ctx.dtypes[0]) if scale is None else (dh.float() * scale).to(ctx.dtypes[0])
        if dw is not None:
            dw = dw.to(ctx.dtypes[1]) if scale is None else (dw.float() * scale).to(ctx.dtypes[1])
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 64,
                         native: bool = False, onednn: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the logits `h @ weight.T` against `targets`, -100 ignored.

    h: [N, C] hidden states, weight: [V, C] (the output head), targets: [N] (already
    shifted). `chunk`: rows whose softmax is computed at a time (64 x 50304 fp32 is 13 MB,
    within a server CPU's L3 cache). Gradients flow to `h` and `weight` when grad mode is
    on and they require it; they are computed here, during the forward pass. `native`,
    `onednn`: the backend's fast paths (see the module).
    """
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"expected h [N, C] and targets [N], got {tuple(h.shape)} and {tuple(targets.shape)}")
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):  # the dtypes here are explicit
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, targets, chunk, dtype, native, onednn)
        total, n, _ = _loss_and_grad(h.to(dtype), weight.to(dtype), targets, chunk, False, native, onednn)
        return total / n
