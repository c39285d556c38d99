"""Native decode kernels (polycoder.kernels) against PyTorch's own operations.

Skipped with the reason where the kernels cannot be built (no C compiler, no AVX-512);
PyTorch's path then serves every step and the rest of the suite covers it.
"""

from __future__ import annotations

import copy

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
from polycoder.quantize import quantize

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels unavailable: {kernels.status()}")

SHAPES = [(1, 8, 16), (1, 5, 3), (3, 7, 40), (4, 12, 770), (8, 33, 64), (2, 2304, 768), (5, 40, 3072),
          (6, 9, 300), (7, 13, 1000), (8, 5, 20), (8, 768, 3072), (12, 11, 48), (8, 5, 3072), (6, 7, 2000)]


def _int8(w: torch.Tensor):
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_linear_fp32_bf16_int8_equal_pytorch(M, N, K):
    if N < 4:
        pytest.skip("kernel needs 4 output rows")
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    ref = F.linear(x, w, b)
    assert (kernels.linear(x, w, b) - ref).abs().max().item() < 1e-4 * K ** 0.5
    # bf16 weights and activations: the kernel sums in fp32, so it matches fp32 arithmetic
    # on the bf16 values up to the final rounding to bf16.
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    exact = F.linear(xb.float(), wb.float(), bb.float())
    got = kernels.linear(xb, wb, bb)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5).all()
    # int8 weights with per-row scales (activations to int16 inside: 15 significant bits).
    q, scale = _int8(w)
    exact = F.linear(x, q.float() * scale[:, None], b)
    got = kernels.linear(x, q, b, scale)
    tol = 2e-4 * (x.abs().amax(1, keepdim=True) * (q.float() * scale[:, None]).abs().sum(1)) + 1e-5
    assert ((got - exact).abs() <= tol).all()


@pytest.mark.parametrize("activation,approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_fused_gelu(activation, approximate):
    for M, K in [(2, 48), (8, 3000)]:  # 3000 columns: summed in chunks, activation after the last
        x, w, b = torch.randn(M, K), torch.randn(20, K) / K ** 0.5 * 4, torch.randn(20)
        ref = F.gelu(F.linear(x, w, b), approximate=approximate)
        assert (kernels.linear(x, w, b, activation=activation) - ref).abs().max().item() < 1e-4
        got = kernels.linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), activation=activation)  # scalar path
        ref = F.gelu(F.linear(x.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float()), approximate=approximate)
        assert ((got.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-4).all()


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
        assert not kernels.usable(torch.randn(1, 16), w[:3])  # fewer than 4 output rows


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
    torch.testing.assert_close(lse, torch.logsumexp(ref, -1), rtol=0, atol=1e-5)
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
