"""Generation against transformers' generate, and the engine's promises."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from polycoder.backend.cuda_graphs import StaticDecode
from polycoder.backend.decode import decode_one_token
from polycoder.checkpoint import load_model
from polycoder.errors import PolycoderError
from polycoder.generation import (
    CacheRows,
    Engine,
    SamplingParams,
    Sequence,
    generate,
    prefill,
    sample_generator,
    sample_tokens,
    stream,
)


def hf_generate(hf, tok, ids, **kw):
    padding = list(range(tok.vocab_size, hf.config.vocab_size))  # never real tokens
    return hf.generate(ids, do_sample=False, eos_token_id=None, pad_token_id=1, suppress_tokens=padding, **kw)


PROMPTS = ["def hello(name):\n    return", "#include <stdio.h>\nint main() {\n\t", "x"]


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load_model(tiny_folder)


@pytest.fixture(scope="module")
def hf(tiny_folder):
    return AutoModelForCausalLM.from_pretrained(tiny_folder).eval()


def test_greedy_equals_transformers_generate(tiny, hf):
    model, tok = tiny
    ours = generate(model, tok, PROMPTS, SamplingParams(max_new_tokens=24, stop_at_eod=False))
    for prompt, (c,) in zip(PROMPTS, ours):
        ids = torch.tensor([tok.encode(prompt)])
        ref = hf_generate(hf, tok, ids, max_new_tokens=24)
        assert c.token_ids == ref[0, ids.shape[1]:].tolist()
        assert c.finish_reason == "length"


def test_beam_search_equals_transformers(tiny, hf):
    model, tok = tiny
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([tok.encode(prompt)])
        ref = hf_generate(hf, tok, ids, max_new_tokens=10, num_beams=4)
        (c,), = generate(model, tok, [prompt], SamplingParams(max_new_tokens=10, num_beams=4, stop_at_eod=False))
        assert c.token_ids == ref[0, ids.shape[1]:].tolist()


def test_batch_of_different_lengths_equals_one_at_a_time(tiny):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=15, stop_at_eod=False)
    together = generate(model, tok, PROMPTS, params)
    alone = [generate(model, tok, [p], params)[0] for p in PROMPTS]
    assert [c[0].token_ids for c in together] == [c[0].token_ids for c in alone]


def test_samples_are_seeded_and_stable_across_n(tiny):
    model, tok = tiny
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, num_samples=4, seed=11, stop_at_eod=False)
    a = generate(model, tok, ["int "], p)[0]
    b = generate(model, tok, ["int "], SamplingParams(**{**p.__dict__, "num_samples": 6}))[0]
    c = generate(model, tok, ["int "], SamplingParams(**{**p.__dict__, "seed": 12}))[0]
    assert [s.token_ids for s in a] == [s.token_ids for s in b[:4]]  # sample j does not depend on n
    assert len({tuple(s.token_ids) for s in a}) > 1  # samples differ from each other
    assert [s.token_ids for s in a] != [s.token_ids for s in c]  # and from another seed's
    # fewer cache rows than samples: several prefills, same samples
    d = generate(model, tok, ["int "], SamplingParams(**{**p.__dict__, "num_samples": 6}), max_rows=4)[0]
    assert [s.token_ids for s in d] == [s.token_ids for s in b]


def test_stop_strings_cut_before_the_first_occurrence(tiny):
    model, tok = tiny
    free = generate(model, tok, [PROMPTS[0]], SamplingParams(max_new_tokens=40, stop_at_eod=False))[0][0].text
    assert len(free) > 10
    stop_a, stop_b = free[12:15], free[5:7]
    (c,), = generate(model, tok, [PROMPTS[0]], SamplingParams(max_new_tokens=40, stop=(stop_a, stop_b), stop_at_eod=False))
    first = min(free.find(stop_a), free.find(stop_b))
    assert c.text == free[:first] and c.finish_reason == "stop"
    streamed = "".join(stream(model, tok, PROMPTS[0],
                              SamplingParams(max_new_tokens=40, stop=(stop_a, stop_b), stop_at_eod=False)))
    assert streamed == c.text


def test_streamed_text_equals_generated_text(tiny):
    model, tok = tiny
    for seed in range(3):
        p = SamplingParams(max_new_tokens=40, temperature=0.9, seed=seed)
        pieces = list(stream(model, tok, PROMPTS[1], p))
        assert "".join(pieces) == generate(model, tok, [PROMPTS[1]], p)[0][0].text


def test_end_of_document_stops_a_sample(tiny_folder):
    model, tok = load_model(tiny_folder)
    with torch.no_grad():  # make <|endoftext|> the certain next token
        model.gpt_neox.final_layer_norm.weight.zero_()
        model.gpt_neox.final_layer_norm.bias.zero_()
        model.gpt_neox.final_layer_norm.bias[0] = 1.0
        model.embed_out.weight.zero_()
        model.embed_out.weight[0, 0] = 50.0
    (c,), = generate(model, tok, ["a"], SamplingParams(max_new_tokens=5))
    assert (c.text, c.token_ids, c.finish_reason) == ("", [], "eod")
    (c,), = generate(model, tok, ["a"], SamplingParams(max_new_tokens=3, stop_at_eod=False))
    assert c.text == "<|endoftext|>" * 3 and c.finish_reason == "length"


def test_prompt_longer_than_context(tiny):
    model, tok = tiny
    long = "x = 1\n" * 200  # 400+ tokens; test-tiny's context is 256
    with pytest.raises(PolycoderError, match="--truncate"):
        generate(model, tok, [long], SamplingParams(max_new_tokens=8))
    (c,), = generate(model, tok, [long], SamplingParams(max_new_tokens=8, truncate=True, stop_at_eod=False))
    assert len(c.token_ids) == 8 and c.prompt_tokens == 256 - 8


def test_zero_new_tokens_and_bad_settings(tiny):
    model, tok = tiny
    assert generate(model, tok, ["x"], SamplingParams(max_new_tokens=0))[0][0].text == ""
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=-1), dict(num_samples=0)):
        with pytest.raises(PolycoderError):
            SamplingParams(**bad)


def test_requests_joining_a_running_batch_get_the_same_tokens(tiny):
    model, tok = tiny
    p = SamplingParams(max_new_tokens=20, stop_at_eod=False)
    alone = [generate(model, tok, [q], p)[0][0].token_ids for q in PROMPTS]
    engine = Engine(model, tok, max_rows=4, max_len=64)
    seqs = [Sequence(tok.encode(q), p, tok, sample_generator(0, i, 0)) for i, q in enumerate(PROMPTS)]
    engine.add([seqs[0]])
    for _ in range(5):
        engine.step()
    engine.add([seqs[1]])  # joins mid-way
    for _ in range(3):
        engine.step()
    engine.add([seqs[2]])
    while engine.rows:
        engine.step()
    assert [s.token_ids for s in seqs] == alone


def test_sample_tokens_top_k_top_p_and_greedy_rows():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    u = torch.linspace(0, 0.999, 200)
    # top_k 1 and greedy always give the argmax; top_p 0.7 keeps {0, 1}; top_p 1 keeps everything
    for temp, k, p, allowed in [(1.0, 1, 1.0, {0}), (0.0, 0, 1.0, {0}), (1.0, 0, 0.7, {0, 1}), (1.0, 0, 1.0, {0, 1, 2, 3})]:
        got = {int(sample_tokens(logits[:1], torch.tensor([temp]), torch.tensor([k]), torch.tensor([p]), x[None])[0])
               for x in u}
        assert got == allowed


def test_static_shapes_engine_gives_the_same_tokens(tiny):
    """The GPU's decode path (rows padded to a power of two, attention over a rounded cache
    length; CUDA graphs on a GPU) run eagerly: the same tokens as the dynamic engine while
    rows join and retire (5 rows of 6 pad to 6, 3 to 4)."""
    model, tok = tiny
    prompts = PROMPTS + ["class A:\n", "fn main() {"]
    params = [SamplingParams(max_new_tokens=n, stop_at_eod=False, temperature=t, top_p=0.9)
              for n, t in zip([12, 30, 7, 21, 16], [0, 0.8, 0, 1.0, 0.5])]

    def run(static):
        engine = Engine(model, tok, max_rows=6, max_len=64, static_shapes=static)
        seqs = [Sequence(tok.encode(q), p, tok, sample_generator(3, i, 0)) for i, (q, p) in enumerate(zip(prompts, params))]
        engine.add(seqs[:3])
        for _ in range(4):
            engine.step()
        for s in seqs[3:]:
            engine.add([s])
        widths = set()
        while engine.rows:
            widths.add(len(engine.rows))
            engine.step()
        return [s.token_ids for s in seqs], widths

    (dynamic, _), (static, widths) = run(False), run(True)
    assert static == dynamic
    assert {3, 5} <= widths  # padded buckets were taken


def test_static_decode_pads_rows_and_length_without_changing_logits(tiny_folder):
    """StaticDecode on the plain PyTorch model (the path a GPU takes): padding rows and the
    rounded attention length leave the real rows' logits as the exact step's."""
    model, tok = load_model(tiny_folder)
    prompts = [tok.encode(q) for q in PROMPTS]
    caches = [model.new_cache(4, 64) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            for r, ids in enumerate(prompts):
                prefill(model, torch.tensor([ids]), CacheRows(cache, r, r + 1))
        static = StaticDecode(model, caches[1], graphs=False, kv_block=16)
        assert static.bucket(3, 20) == (4, 32) and static.bucket(4, 60) == (4, 64)
        lengths = [len(ids) for ids in prompts]
        for step in range(6):
            x = torch.tensor([[5 + step + r] for r in range(3)])
            pos = torch.tensor([[n + step] for n in lengths])
            kv_len = max(lengths) + step + 1
            exact = decode_one_token(model, x, pos, caches[0], kv_len)
            padded = static(x, pos, kv_len)
            torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(b[:3], a[:3])  # the real rows' cache is untouched by the padding


def test_healing_constrains_the_first_tokens_to_the_whitespace_owed(tiny):
    """A prompt backed off before its trailing whitespace (`SamplingParams.heal`): whatever the
    model prefers, its first tokens restore that whitespace (or end the sample), and the
    output is what follows it."""
    model, tok = tiny
    heal = "\n\n    "
    agreeing = tok.tokens_agreeing(heal.encode())
    assert tok.encode("\n") and all(i in agreeing for i in tok.encode("\n"))
    assert all(heal.encode().startswith(b) or b.startswith(heal.encode()) for b in map(tok.token_bytes, agreeing))
    assert not any(tok.token_bytes(i).startswith(b"x") for i in agreeing)
    for temperature, seed in [(0.0, 0), (1.0, 1), (1.0, 2), (1.5, 3)]:
        params = SamplingParams(max_new_tokens=12, temperature=temperature, seed=seed, heal=heal)
        for prompt in PROMPTS:
            (c,), = generate(model, tok, [prompt], params)
            written = tok.decode_bytes(c.token_ids)
            assert written.startswith(heal.encode()) or (heal.encode().startswith(written) and c.finish_reason == "eod")
            assert c.text == written.decode(errors="replace")[len(heal):]
