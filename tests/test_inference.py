"""The fast decode path: int8/int4 weights, the fp32 gemv layout, bf16, compiled decode.

Independent references: each quantized layer against F.linear on its own dequantized
weights (fp32), the whole model against transformers' GPTNeoXForCausalLM (fp32 and bf16).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPO
from transformers import AutoModelForCausalLM

from polycoder import backend, quantize
from polycoder.backend import CPU_COMPILE_REFUSED, physical_cores
from polycoder.backend.decode import decode_layout, decode_one_token, single_row_bf16_kernels
from polycoder.checkpoint import build_model, load_model
from polycoder.config import ModelConfig
from polycoder.errors import PolycoderError
from polycoder.generation import Engine, SamplingParams, Sequence, generate, sample_generator
from polycoder.quantize import Int4Linear, Int8Linear


def _linear(n_out=96, n_in=128, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.bias.normal_()
    return lin


def test_int8_linear_equals_its_dequantized_weights():
    lin = _linear()
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (96,)
    x = torch.randn(5, 128)
    # The kernel takes bf16 activations: the reference does the same rounding, in fp32.
    deq = q.weight.float() * q.weight_scale.to(torch.bfloat16).float()[:, None]
    ref = F.linear(x.to(torch.bfloat16).float(), deq, lin.bias)
    assert (q(x) - ref).abs().max().item() < 2e-2 * ref.abs().max().item()
    # per-channel absmax: every weight within half a step of the original
    assert ((deq - lin.weight).abs() <= q.weight_scale.float()[:, None] * 0.51 + 1e-3).all()


def test_int8_linears_two_products_equal_the_dequantized_weights():
    """A prefill's rows go through the bf16-widened weights where bf16 products are native,
    through torch's int8 kernel elsewhere; both are checked here whatever this CPU does.
    Each rounds the activations to bf16 and its [M, out] result to bf16 (at most 2^-9 of
    each value; the references round the activations, and the int8 kernel's its scales, as
    the products do); fp32 accumulation over K = 128 terms stays under 2^-16 of sum |x| |w|.
    Fewer rows than WIDEN_FROM_ROWS always take the int8 kernel."""
    lin = _linear()
    q = Int8Linear.from_linear(lin)
    x = torch.randn(quantize.WIDEN_FROM_ROWS + 8, 128).to(torch.bfloat16)
    magnitude = F.linear(x.float().abs(), (q.weight.float() * q.scale32[:, None]).abs())
    for product, scale in [(q.widened_product, q.scale32), (q.packed_product, q.weight_scale.to(torch.bfloat16).float())]:
        ref = F.linear(x.float(), q.weight.float() * scale[:, None])
        err = (product(x).float() - ref).abs()
        assert (err <= 2.0 ** -8 * ref.abs() + 2.0 ** -16 * magnitude).all(), product.__name__
    chosen = q.widened_product if quantize.bf16_products_native() else q.packed_product
    assert torch.equal(q(x.float()), (chosen(x).float() + lin.bias).float())
    few = x[: quantize.WIDEN_FROM_ROWS - 1]
    assert torch.equal(q(few.float()), (q.packed_product(few).float() + lin.bias).float())


def test_int4_linear_equals_its_dequantized_weights():
    lin = _linear(n_in=256)
    q = Int4Linear.from_linear(lin, group_size=32)
    x = torch.randn(3, 256)
    # Independent dequantization: groups of 32 inputs, asymmetric 4-bit, as quantize() computes it.
    w = lin.weight.detach().reshape(96, 8, 32)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    levels = torch.round((w - lo) / scale).clamp(0, 15)
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    deq = ((levels - 8) * scale.to(torch.bfloat16).float() + zero).reshape(96, 256)
    ref = F.linear(x.to(torch.bfloat16).float(), deq, lin.bias)
    assert (q(x) - ref).abs().max().item() < 2e-2 * ref.abs().max().item()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_quantized_models_stay_close_to_fp32(tiny_folder):
    """Tolerances (random test-tiny weights, 40 tokens): relative L2 error of the logits
    under 2 % for int8 and 15 % for int4; the argmax agrees on >= 90 % (int8) of positions."""
    ref, _ = load_model(tiny_folder)
    x = torch.randint(3, 5000, (2, 40))
    with torch.no_grad():
        r = ref(x)
        q8 = load_model(tiny_folder, quantize="int8")[0]
        q4 = load_model(tiny_folder, quantize="int4")[0]
        a, b = q8(x), q4(x)
    assert not any(isinstance(m, nn.Linear) for m in q8.modules())
    assert q8.gpt_neox.embed_in.weight.dtype == torch.float32  # the lookup stays in the model's dtype
    assert _rel(a, r) < 0.02
    assert (a.argmax(-1) == r.argmax(-1)).float().mean() >= 0.9
    assert _rel(b, r) < 0.15


def test_unknown_quantization_is_a_clear_error(tiny_folder):
    with pytest.raises(PolycoderError, match="int8"):
        load_model(tiny_folder, quantize="int3")


def test_decode_layout_keeps_names_shapes_and_values_and_matches_transformers(tiny_folder):
    model, tok = load_model(tiny_folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decode_layout(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not model.embed_out.weight.is_contiguous()  # stored as the transpose of [in, out]
    hf = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    x = torch.randint(3, 5000, (2, 30))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4
    prompt = tok.encode("def add(a, b):\n    return")
    (c,), = generate(model, tok, [prompt], SamplingParams(max_new_tokens=16, stop_at_eod=False))
    padding = list(range(tok.vocab_size, hf.config.vocab_size))
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=1,
                      suppress_tokens=padding)
    assert c.token_ids == ref[0, len(prompt):].tolist()


def test_tied_embeddings_stay_tied_under_decode_layout():
    model = build_model(ModelConfig.from_preset("test-tiny").replace(tie_word_embeddings=True), seed=3)
    decode_layout(model)
    assert model.embed_out.weight is model.gpt_neox.embed_in.weight


def test_bf16_equals_transformers_bf16(tiny_folder):
    """Our bf16 model against transformers in bf16 on the same weights: both round every
    product to bf16, so they agree to bf16 precision (not bit for bit)."""
    ours, _ = load_model(tiny_folder, dtype="bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.bfloat16).eval()
    fp32, _ = load_model(tiny_folder)
    x = torch.randint(3, 5000, (2, 30))
    with torch.no_grad():
        a, b, r = ours(x).float(), hf(x).logits.float(), fp32(x)
    assert _rel(a, b) < 0.02
    assert _rel(a, r) < 0.03  # and both near fp32
    # cached decoding in bf16 equals bf16 recomputation (to bf16 precision)
    cache = ours.new_cache(2, 40)
    with torch.no_grad():
        first = ours(x[:, :20], pos=torch.arange(20)[None].expand(2, 20), cache=cache)
        steps = [ours(x[:, t : t + 1], pos=torch.full((2, 1), t), cache=cache) for t in range(20, 30)]
    assert _rel(torch.cat([first] + steps, 1).float(), a) < 0.02


def test_int8_engine_generates_through_every_path(tiny_folder):
    model, tok = load_model(tiny_folder, quantize="int8")
    p = SamplingParams(max_new_tokens=10, stop_at_eod=False)
    together = generate(model, tok, ["int x", "def f(a):"], p)
    alone = [generate(model, tok, [q], p)[0][0].token_ids for q in ["int x", "def f(a):"]]
    assert [c[0].token_ids for c in together] == alone and all(len(t) == 10 for t in alone)
    samples = generate(model, tok, ["x ="], SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=3, seed=1,
                                                           stop_at_eod=False))[0]
    assert len(samples) == 3


def test_compile_on_a_cpu_is_refused_with_a_warning(tiny_folder, caplog):
    """torch.compile's CPU code for the decode step gave NaN logits (AVX2) or corrupted the
    heap (AVX-512) on torch 2.13, so on a CPU `compile` keeps the usual step and says why."""
    model, tok = load_model(tiny_folder)
    p = SamplingParams(max_new_tokens=12, stop_at_eod=False)
    prompts = [tok.encode("def f(x):\n"), tok.encode("#include <stdio.h>")]
    out = {}
    backend._warn_once.cache_clear()  # an earlier test may have asked for compile already
    for compiled in (False, True):
        with caplog.at_level("WARNING", logger="polycoder"):
            engine = Engine(model, tok, max_rows=2, max_len=64, compile=compiled)
        assert type(engine.decode_step).__name__ != "CompiledDecode"
        seqs = [Sequence(q, p, tok, sample_generator(0, i, 0)) for i, q in enumerate(prompts)]
        for s in seqs:
            engine.add([s])
        while engine.rows:
            engine.step()
        out[compiled] = [s.token_ids for s in seqs]
    assert out[True] == out[False]
    # logged once a process, however many engines ask (generate() builds one a call)
    with caplog.at_level("WARNING", logger="polycoder"):
        Engine(model, tok, max_rows=2, max_len=64, compile=True)
    assert [r.message for r in caplog.records] == [CPU_COMPILE_REFUSED]


def test_physical_cores_is_sane():
    assert 1 <= physical_cores() <= (torch.get_num_threads() * 64)


def test_cli_generate_int8_bf16(tiny_folder):
    r = subprocess.run([sys.executable, "-m", "polycoder", "generate", "--model", str(tiny_folder), "--prompt", "def f():",
                        "--max-new-tokens", "5", "--quantize", "int8", "--dtype", "bfloat16", "--json-output",
                        "--no-stop-at-eod", "--threads", "1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"tokens": 5' in r.stdout


def test_bf16_single_row_kernels_agree_with_the_default_ones(tiny_folder):
    """single_row_bf16_kernels switches a 1-row bf16 step to other kernels: same logits to bf16 precision."""
    model, _ = load_model(tiny_folder, dtype="bfloat16")
    x = torch.randint(3, 5000, (1, 25))
    out = []
    for switch in (False, True):
        cache = model.new_cache(1, 32)
        with torch.no_grad():
            model(x[:, :24], pos=torch.arange(24)[None], cache=cache)
            with single_row_bf16_kernels(model, 1) if switch else torch.autograd.grad_mode.no_grad():
                out.append(decode_one_token(model, x[:, 24:], torch.tensor([[24]]), cache, 25))
    assert torch._C._get_mkldnn_enabled()  # switched back on afterwards
    assert _rel(out[1], out[0]) < 0.02
