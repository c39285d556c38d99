"""Native decode kernels (polycoder.kernels) against PyTorch's own operations.

Skipped with the reason where the kernels cannot be built (no C compiler, no AVX2 + FMA);
PyTorch's path then serves every step and the rest of the suite covers it. The file runs
the variant this machine builds by default; where that is AVX-512 and the CPU also runs
AVX2 + FMA, `test_avx2_variant_passes_this_file` runs the whole file again for the AVX2
variant (POLYCODER_KERNELS_ISA=avx2), so every variant the machine can execute is tested.

Tolerances follow from the arithmetic, not from one CPU's rounding: a sum of fp32 products
evaluated in any order is within depth * u * sum|x w| of the exact one (u = 2^-24, depth
the longest chain of additions), and the references are computed in fp64.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from polycoder import kernels
from polycoder.backend import PLAIN, Backend, choose
from polycoder.backend.decode import EagerDecode
from polycoder.backend.few_rows import FEW_ROW_OPS
from polycoder.backend.native_decode import NativeDecode
from polycoder.checkpoint import build_model
from polycoder.config import ModelConfig
from polycoder.generation import CacheRows, Engine
from polycoder.model import RotaryEmbedding, split_qkv_rotary
from polycoder.quantize import quantize

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels unavailable: {kernels.status()}")

SHAPES = [(1, 8, 16), (1, 5, 3), (1, 1, 16), (3, 2, 40), (8, 3, 300), (3, 7, 40), (4, 12, 770), (8, 33, 64),
          (2, 2304, 768), (5, 40, 3072), (6, 9, 300), (7, 13, 1000), (8, 5, 20), (8, 768, 3072), (12, 11, 48),
          (8, 5, 3072), (6, 7, 2000)]


U = 2.0 ** -24  # fp32's unit roundoff
U_BF16 = 2.0 ** -8  # bf16's (8 significant bits)
GELU_ERR = 2e-6  # the vector GELU's error, relative to max(1, |y|) (test_vector_gelu_over_its_range)


def _int8(w: torch.Tensor):
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _depth(K: int) -> int:
    """The longest chain of fp32 additions in one output of a product over K columns, on
    any variant: a lane adds at most ceil(K/8) products (8 lanes or more), the lanes meet
    in a tree of at most 4 levels, the column chunks (16 columns or more) add up in a row,
    then the scale and the bias."""
    return math.ceil(K / 8) + math.ceil(K / 16) + 8


def _bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N]: how far an fp32 evaluation of x w^T + b in any order may be from the exact value."""
    mag = x.double().abs() @ w.double().abs().T + (b.double().abs() if b is not None else 0)
    return _depth(x.shape[-1]) * U * mag


def _exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), b.double() if b is not None else None)


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_linear_fp32_bf16_int8_equal_pytorch(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    assert ((kernels.linear(x, w, b).double() - _exact(x, w, b)).abs() <= _bound(x, w, b)).all()
    # bf16 weights and activations: the kernel sums in fp32, so it matches the exact result
    # on the bf16 values up to the fp32 sum's error and the final rounding to bf16.
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    exact = _exact(xb, wb, bb)
    got = kernels.linear(xb, wb, bb)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= exact.abs() * U_BF16 + (1 + U_BF16) * _bound(xb, wb, bb)).all()
    # int8 weights with per-row scales: activations to int16 inside (each off by at most
    # half a step of amax / 32767, plus the rounding of the scaling), products and sums of
    # a 256-column chunk exact in integers, the chunks' sums added in fp32.
    q, scale = _int8(w)
    wq = q.double() * scale.double()[:, None]
    exact = _exact(x, wq, b)
    mag = x.double().abs().amax(1, keepdim=True) * wq.abs().sum(1)
    tol = (0.51 / 32767 + (2 * math.ceil(K / 256) + 8) * U) * mag + 2 * U * (exact.abs() + b.double().abs())
    assert ((kernels.linear(x, q, b, scale).double() - exact).abs() <= tol).all()


@pytest.mark.parametrize("activation,approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_fused_gelu(activation, approximate):
    # GELU's slope is at most 1.13, so an error e of its input moves the output by 1.13 e.
    for M, K in [(2, 48), (8, 3000)]:  # 3000 columns: summed in chunks, activation after the last
        x, w, b = torch.randn(M, K), torch.randn(20, K) / K ** 0.5 * 4, torch.randn(20)
        ref = F.gelu(_exact(x, w, b), approximate=approximate)
        tol = 1.13 * _bound(x, w, b) + GELU_ERR * ref.abs().clamp_min(1)
        assert ((kernels.linear(x, w, b, activation=activation).double() - ref).abs() <= tol).all()
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        got = kernels.linear(xb, wb, bb, activation=activation)  # scalar path
        ref = F.gelu(_exact(xb, wb, bb), approximate=approximate)
        tol = ref.abs() * U_BF16 + (1 + U_BF16) * (1.13 * _bound(xb, wb, bb) + GELU_ERR * ref.abs().clamp_min(1))
        assert ((got.double() - ref).abs() <= tol).all()


@pytest.mark.parametrize("activation,approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_vector_gelu_over_its_range(activation, approximate):
    # x [8, 1] times w [N, 1]: outputs from -18 to 18 in fine steps, the exp clamp included.
    x = torch.linspace(-12, 12, 8)[:, None]
    w = torch.linspace(-1.5, 1.5, 2001)[:, None]
    got = kernels.linear(x, w, activation=activation).double()
    ref = F.gelu((x.double() @ w.double().T), approximate=approximate)
    assert ((got - ref).abs() <= 2e-6 * ref.abs().clamp_min(1)).all()


def test_not_used_for_gradients_or_many_rows():
    w = torch.randn(8, 16, requires_grad=True)
    assert not kernels.usable(torch.randn(1, 16), w)  # autograd needs PyTorch's product
    with torch.no_grad():
        assert kernels.usable(torch.randn(1, 16), w)
        assert not kernels.usable(torch.randn(kernels.MAX_ROWS + 1, 16), w)
        assert not kernels.usable(torch.randn(1, 16), w.detach().t().contiguous().t())  # layout
        assert kernels.usable(torch.randn(1, 16), w[:1])  # one output row is a product too


def _decode_logits(model, x, prompt_len: int, native: bool):
    """Prefill x[:, :prompt_len] then one token at a time through the cache with the native
    decode step (or PyTorch's); all logits [B, T, V]."""
    B, T = x.shape
    cache = model.new_cache(B, T + 1)
    step = NativeDecode(model, cache) if native else EagerDecode(model, cache)
    with torch.no_grad():
        out = [model(x[:, :prompt_len], pos=torch.arange(prompt_len)[None].expand(B, -1), cache=cache)]
        for t in range(prompt_len, T):
            out.append(step(x[:, t : t + 1], torch.full((B, 1), t), t + 1)[:, None])
    return torch.cat(out, dim=1).float()


@pytest.mark.parametrize("preset,arch", [
    ("test-tiny", {}),
    ("test-tiny-parallel", {}),
    ("test-tiny", {"rotary_pct": 0.25, "hidden_act": "gelu_new"}),
    ("test-tiny", {"n_embd": 160, "n_head": 2, "rotary_pct": 0.5}),  # head size 80 (as PolyCoder-2.7B's)
    ("test-tiny", {"n_embd": 160, "n_head": 10}),  # head size 16
])
def test_decode_steps_equal_pytorch_path(preset, arch):
    config = ModelConfig.from_preset(preset).replace(**arch)
    model = build_model(config, seed=3)
    cache = model.new_cache(1, 8)
    step = Backend(native_kernels=True).decode_step(model, cache)
    assert isinstance(step, NativeDecode) and step._stack_plan(torch.float32) is not None  # one native call for all blocks
    x = torch.randint(0, 500, (3, 53))  # attention over 6 .. 52 positions: groups of 16 and their tails
    diff = (_decode_logits(model, x, 6, native=True) - _decode_logits(model, x, 6, native=False)).abs().max().item()
    assert diff < 1e-4
    with torch.no_grad():  # and both equal the uncached training path
        assert (_decode_logits(model, x, 6, native=True) - model(x)).abs().max().item() < 1e-4


def test_plan_follows_replaced_storage():
    """The step keeps pointers into the weights; .half() swaps .data under the same
    parameters, and the step must read the new storage."""
    ref = build_model(ModelConfig.from_preset("test-tiny"), seed=4)
    model = copy.deepcopy(ref)
    x = torch.randint(0, 500, (2, 12))
    cache = model.new_cache(2, 13)
    step = NativeDecode(model, cache)
    step(x[:, :1], torch.zeros(2, 1, dtype=torch.long), 1)  # builds the plans
    model.half().float()  # same parameter objects, new storage
    want = _decode_logits(copy.deepcopy(ref).half().float(), x, 4, native=False)
    with torch.no_grad():
        model(x[:, :4], pos=torch.arange(4)[None].expand(2, -1), cache=cache)
        got = torch.stack([step(x[:, t : t + 1], torch.full((2, 1), t), t + 1) for t in range(4, 12)], dim=1)
    assert (got - want[:, 4:]).abs().max().item() < 1e-4


def test_native_step_after_a_pytorch_step_of_the_same_model(code_tokenizer):
    """A PyTorch step stores fp32 weights transposed (decode_layout); a native step made
    afterwards for the same model must still take every step natively, and the engine's
    default on this CPU is the native step."""
    model = build_model(ModelConfig.from_preset("test-tiny"), seed=5)
    cache = model.new_cache(2, 16)
    PLAIN.decode_step(model, cache)
    assert not model.embed_out.weight.is_contiguous()
    step = choose("cpu").decode_step(model, cache)
    assert isinstance(step, NativeDecode)
    with torch.no_grad():
        step(torch.tensor([[1], [2]]), torch.zeros(2, 1, dtype=torch.long), 1)
    assert step._stack is not None and step._stack[1] is not None  # the whole stack in one native call
    engine = Engine(model, code_tokenizer, max_rows=2, max_len=16)
    assert isinstance(engine.decode_step, NativeDecode) and engine.prefill_ops is FEW_ROW_OPS


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_prefill_head_is_the_native_product(kind, code_tokenizer):
    """The engine's prefill runs its output head (one row) through the native product, as
    the decode steps do: the logits equal kernels.linear over the prefill's last hidden state."""
    model = build_model(ModelConfig.from_preset("test-tiny"), seed=8)
    if kind == "int8":
        quantize(model, "int8")
    else:
        model.to(torch.bfloat16)
    hidden = []
    model.gpt_neox.final_layer_norm.register_forward_hook(lambda m, i, out: hidden.append(out))
    ids = list(range(3, 3 + kernels.MAX_ROWS + 6))  # more rows than the blocks' native products take
    engine = Engine(model, code_tokenizer, max_rows=1, max_len=32)
    got = engine.prefill(ids, 0)
    head = model.embed_out
    scale = head.scale32 if kind == "int8" else None
    want = kernels.linear(hidden[-1].view(1, -1), head.weight, head.bias, scale).float()
    assert torch.equal(got, want)
    # A prompt of a few tokens runs natively throughout: like PyTorch's prefill, within
    # rounding of the fp32 model (the kernel sums in fp32, so on average at least as close).
    few = ids[:5]
    native = Engine(model, code_tokenizer, max_rows=1, max_len=32).prefill(few, 0)
    plain = Engine(model, code_tokenizer, max_rows=1, max_len=32, backend=PLAIN).prefill(few, 0)
    fp32 = build_model(ModelConfig.from_preset("test-tiny"), seed=8)
    exact = Engine(fp32, code_tokenizer, max_rows=1, max_len=32, backend=PLAIN).prefill(few, 0)
    assert not torch.equal(native, plain)  # the native products did run
    assert (native - exact).abs().mean() <= 1.25 * (plain - exact).abs().mean() + 1e-4


def test_rows_at_different_positions():
    model = build_model(ModelConfig.from_preset("test-tiny"), seed=6)
    a, b = torch.randint(0, 500, (1, 11)), torch.randint(0, 500, (1, 5))
    logits = []
    for native in (False, True):
        cache = model.new_cache(2, 16)
        step = NativeDecode(model, cache) if native else EagerDecode(model, cache)
        with torch.no_grad():
            model(a[:, :10], pos=torch.arange(10)[None], cache=CacheRows(cache, 0, 1))
            model(b[:, :4], pos=torch.arange(4)[None], cache=CacheRows(cache, 1, 2))
            logits.append(step(torch.cat([a[:, 10:], b[:, 4:]]), torch.tensor([[10], [4]]), 11))
    assert (logits[1] - logits[0]).abs().max().item() < 1e-4
    with torch.no_grad():
        assert (logits[0][0] - model(a)[0, -1]).abs().max().item() < 1e-4
        assert (logits[0][1] - model(b)[0, -1]).abs().max().item() < 1e-4


def test_bf16_and_int8_decode_track_pytorch():
    config = ModelConfig.from_preset("test-tiny")
    x = torch.randint(0, 500, (2, 16))
    ref32 = _decode_logits(build_model(config, seed=7), x, 5, native=False)
    for dtype in (torch.bfloat16, torch.float32):
        model = build_model(config, seed=7).to(dtype)
        if dtype == torch.float32:  # int8 weights: kernel and PyTorch's int8 path
            quantize(model, "int8")
        got, want = _decode_logits(model, x, 5, native=True), _decode_logits(model, x, 5, native=False)
        # Both sit within rounding of the fp32 model; the kernel keeps fp32 inside a block,
        # so on average it is at least about as close to fp32 as PyTorch's bf16 path.
        assert (got - ref32).abs().mean() <= 1.25 * (want - ref32).abs().mean() + 1e-4
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("V", [17, 1000, 50304])
def test_cross_entropy_bf16_equals_fp32_softmax(V):
    """The training head's fused cross-entropy kernel against torch in fp32 on the same bf16
    logits: log-sum-exp and target logit to fp32 rounding, the gradient to bf16 rounding,
    an ignored row (weight 0) zeroed, a vocabulary that is not a multiple of 16."""
    g = torch.Generator().manual_seed(V)
    R = 9
    z = (torch.randn(R, V, generator=g) * 4).bfloat16()
    t = torch.randint(0, V, (R,), generator=g)
    w = torch.full((R,), 1 / (R - 1))
    w[3] = 0.0
    ref = z.float()
    want_grad = (torch.softmax(ref, -1) - F.one_hot(t, V)) * w[:, None]
    out = z.clone()
    lse, picked = kernels.cross_entropy_bf16_(out, t, w, grad=True)
    # lse = max + log(sum of V exponentials): the sum (at most ceil(V/8) additions a lane,
    # 4 levels of lanes) to depth * u relative, each exponential to 2e-7, then the log and
    # the final addition rounded.
    exact = torch.logsumexp(z.double(), -1)
    tol = (math.ceil(V / 8) + 6) * U + 2e-7 + 2 * U * exact.abs()
    assert ((lse.double() - exact).abs() <= tol).all()
    torch.testing.assert_close(picked, ref.gather(1, t[:, None])[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out.float(), want_grad.bfloat16().float(), rtol=1e-2, atol=1e-6)
    assert (out[3] == 0).all()
    untouched = z.clone()
    lse2, _ = kernels.cross_entropy_bf16_(untouched, t, w, grad=False)
    assert torch.equal(untouched, z) and torch.equal(lse2, lse)


@pytest.mark.parametrize("C,V", [(768, 50304), (5, 7), (17, 33), (16, 1), (1, 2), (31, 65)])
def test_transpose_bf16_to_f32_is_exact(C, V):
    x = torch.randn(C, V, generator=torch.Generator().manual_seed(C + V)).bfloat16()
    got = kernels.transpose_bf16_to_f32(x)
    assert got.is_contiguous() and torch.equal(got, x.t().float())


@pytest.mark.parametrize("hs,rot,out_dtype", [(64, 64, torch.float32), (80, 20, torch.bfloat16), (24, 8, torch.float32)])
def test_rotary_split_equals_the_model_path(hs, rot, out_dtype):
    """Training's fused split + rotary (forward and its transpose) against the model's own
    torch path. Each output is x1 c - x2 s (or x2 c + x1 s, |c|, |s| <= 1): fp32 to
    4 u max|x| either way; bf16 outputs one rounding (2^-8 relative) on top."""
    B, T, H = 2, 19, 3
    rope = RotaryEmbedding(ModelConfig(n_embd=H * hs, n_head=H, n_layer=1, intermediate_size=4 * H * hs,
                                       rotary_pct=rot / hs, block_size=64))
    cos, sin = rope.cos[:T].contiguous(), rope.sin[:T].contiguous()
    g = torch.Generator().manual_seed(hs + rot)
    qkv = torch.randn(B, T, 3 * H * hs, generator=g, requires_grad=True)
    ref = split_qkv_rotary(qkv, H, cos[:, None, None], sin[:, None, None])
    x = qkv.detach().view(B, T, H, 3, hs)
    outs = [torch.empty(B, H, T, hs, dtype=out_dtype) for _ in range(3)]
    kernels.rotary_qkv_(x, *outs, cos, sin, grad=False)
    fp32_tol = 8 * U * x.abs().max()
    for got, want in zip(outs, ref):
        assert ((got.double() - want.double()).abs() <= want.abs().double() * (U_BF16 if out_dtype == torch.bfloat16 else 0)
                + fp32_tol).all()
    grads = [torch.randn(B, H, T, hs, generator=g) for _ in range(3)]
    sum((o * d).sum() for o, d in zip(ref, grads)).backward()
    dx = torch.empty_like(x)
    kernels.rotary_qkv_(dx, *grads, cos, sin, grad=True)
    tol = 8 * U * max(d.abs().max() for d in grads)
    assert ((dx.reshape(B, T, -1) - qkv.grad).abs() <= tol).all()


def test_variant_is_named_and_the_one_asked_for():
    asked = os.environ.get("POLYCODER_KERNELS_ISA", "native")
    assert kernels.variant() in kernels.VARIANTS.values() and kernels.variant() in kernels.status()
    if asked == "avx2":
        assert kernels.variant() == "AVX2+FMA"


def test_weight_prefetches_reach_the_built_library():
    """The decode products prefetch weights (decode.c); a compiler once deleted every one of
    them (GCC 12, a prefetch helper not inlined), silently."""
    if kernels.variant() == "NEON" or not shutil.which("objdump"):
        pytest.skip("x86 only, with binutils' objdump")
    code = subprocess.run(["objdump", "-d", str(kernels._build())], capture_output=True, text=True, timeout=120).stdout
    assert code.count("prefetcht0") >= 4


@pytest.mark.slow
def test_avx2_variant_passes_this_file():
    """This file once more with the AVX2 + FMA variant, where the default build is another
    one (AVX-512) and the CPU runs AVX2 too: a developer's AVX-512 machine tests both."""
    flags = set(kernels._cpu_flags().split())
    needs = set(kernels.ISAS["avx2"][1])
    if kernels.variant() == "AVX2+FMA" or not needs <= flags:
        pytest.skip(f"the default build is the AVX2 variant already, or the CPU lacks {sorted(needs - flags)}")
    env = {**os.environ, "POLYCODER_KERNELS_ISA": "avx2"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                        str(Path(__file__))], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-500:]


def test_unknown_variant_is_one_clear_error():
    env = {**os.environ, "POLYCODER_KERNELS_ISA": "avx3"}
    r = subprocess.run([sys.executable, "-m", "polycoder", "generate", "--prompt", "def f(", "--max-new-tokens", "1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "POLYCODER_KERNELS_ISA='avx3' is not one of native, avx2" in r.stderr
