"""The bf16 causal attention of CPU training (polycoder.backend.attention) against SDPA and
an fp64 reference: same forward, gradients at least as close to fp64 as SDPA's own.

Skipped with the reason where its kernel cannot run (no compiler, no AVX512-BF16); SDPA
then serves training and the rest of the suite covers it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polycoder import kernels
from polycoder.backend import TrainOps
from polycoder.backend.attention import causal_attention, rotary_qkv
from polycoder.checkpoint import build_model
from polycoder.config import ModelConfig
from polycoder.model import RotaryEmbedding, split_qkv_rotary

pytestmark = pytest.mark.skipif(not kernels.has_attention_grad_bf16(),
                                reason=f"attention kernel unavailable here (kernels: {kernels.status()}, or no AVX512-BF16)")

SHAPES = [(1, 1, 1, 16), (2, 3, 37, 80), (1, 3, 200, 32), (2, 4, 64, 64), (1, 2, 129, 128), (2, 12, 512, 64)]


def _inputs(B, H, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    return (q * 2).bfloat16(), k.bfloat16(), v.bfloat16(), do.bfloat16()


def _grads(fn, q, k, v, do, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _relative(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()  # dq of T = 1 is exactly 0


@pytest.mark.parametrize("B,H,T,D", SHAPES)
def test_gradients_as_close_to_fp64_as_sdpa(B, H, T, D):
    q, k, v, do = _inputs(B, H, T, D, seed=T + D)
    out, ours = _grads(causal_attention, q, k, v, do)
    sdpa_out, theirs = _grads(_sdpa, q, k, v, do)
    _, exact = _grads(_sdpa, q, k, v, do, torch.float64)
    assert torch.equal(out, sdpa_out)  # the forward is SDPA's own
    for name, a, b, ref in zip("qkv", ours, theirs, exact):
        assert a.dtype == torch.bfloat16 and a.shape == ref.shape
        # bf16 gradients: the only rounding is p and ds to bf16 and the results to bf16
        assert _relative(a, ref) <= max(1.1 * _relative(b, ref), 8e-3), name


def test_amx_and_vector_paths_agree(monkeypatch):
    q, k, v, do = _inputs(2, 3, 150, 64, seed=1)
    _, amx = _grads(causal_attention, q, k, v, do)
    monkeypatch.setenv("POLYCODER_AMX", "0")
    _, vec = _grads(causal_attention, q, k, v, do)
    for a, b in zip(amx, vec):  # the same fp32 sums in another order: bf16 results within a few ulps
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()


def test_autocast_takes_bf16_and_returns_gradients_to_fp32_inputs():
    q, k, v, do = _inputs(1, 2, 48, 64, seed=2)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_attention(*leaves)
    assert out.dtype == torch.bfloat16
    out.backward(do)
    _, ref = _grads(_sdpa, q, k, v, do, torch.float64)
    for t, r in zip(leaves, ref):
        assert t.grad.dtype == torch.float32 and _relative(t.grad, r) < 1e-2


def test_without_gradients_or_in_fp32_it_is_sdpa():
    q, k, v, _ = _inputs(1, 2, 33, 32, seed=3)
    with torch.no_grad():
        assert torch.equal(causal_attention(q, k, v), _sdpa(q, k, v))
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    out = causal_attention(qf, kf, vf)
    assert out.grad_fn.name() != "_CausalAttentionBackward" and torch.equal(out, _sdpa(qf, kf, vf))


def _torch_rotary(qkv, H, cos, sin):
    """The model's torch path for the same split."""
    return split_qkv_rotary(qkv, H, cos[:, None, None], sin[:, None, None])


@pytest.mark.parametrize("hs,rot,autocast", [(64, 64, False), (64, 64, True), (80, 20, False), (24, 8, True)])
def test_rotary_split_equals_the_torch_path(hs, rot, autocast):
    B, T, H = 2, 19, 3
    rope = RotaryEmbedding(ModelConfig(n_embd=H * hs, n_head=H, n_layer=1, intermediate_size=4 * H * hs,
                                       rotary_pct=rot / hs, block_size=64))
    cos, sin = rope.cos[:T], rope.sin[:T]
    assert cos.shape == (T, rot)
    g = torch.Generator().manual_seed(hs + rot)
    qkv = torch.randn(B, T, 3 * H * hs, generator=g)
    grads = [torch.randn(B, H, T, hs, generator=g) for _ in range(3)]
    results = []
    for fn in (rotary_qkv, _torch_rotary):
        x = (qkv.bfloat16() if autocast else qkv).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = fn(x, H, cos, sin)
            outs = [o.to(torch.bfloat16) for o in outs] if autocast else outs  # as SDPA casts them
        sum((o.float() * d).sum() for o, d in zip(outs, grads)).backward()
        results.append(([o.detach().float() for o in outs], x.grad.float()))
    (ours, dx), (theirs, dx_ref) = results
    tol = 1e-2 if autocast else 1e-6  # bf16: one rounding either way, at most an ulp apart
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= tol * b.abs().max()
    assert (dx - dx_ref).abs().max() <= tol * dx_ref.abs().max()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_gradients_equal_the_torch_paths(precision):
    """A whole model's loss and gradients with the native rotary pass and attention against
    the same model on torch's split/rotate and SDPA: the same TrainOps with and without
    `native` (the fused loss in both, oneDNN off in both)."""
    cfg = ModelConfig.from_preset("test-tiny").replace(vocab_size=300)
    model = build_model(cfg, seed=0).requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 300, (3, 40), generator=g), torch.randint(0, 300, (3, 40), generator=g)

    def loss_and_grads(native: bool):
        model.ops = TrainOps(native=native)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x, targets=y)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ours, theirs = loss_and_grads(native=True), loss_and_grads(native=False)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-6 if precision == "fp32" else 1e-3)
    tol = 1e-5 if precision == "fp32" else 3e-2  # bf16: different roundings inside attention's backward
    for name, grad in theirs[1].items():
        assert (ours[1][name] - grad).abs().max() <= tol * grad.abs().max() + 1e-12, name
