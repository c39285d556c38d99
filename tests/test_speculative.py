"""Speculative decoding with prompt-lookup drafts: greedy output identical to plain decoding,
sampled output too (a seed gives the same sample as without), drafts as prompt
lookup defines them, the one-pass check equal to single steps."""

from __future__ import annotations

import random

import pytest
import torch

from polycoder.checkpoint import load_model
from polycoder.generation import SamplingParams, generate, stream
from polycoder.generation.engine import Engine
from polycoder.generation.sampling import sample_generator
from polycoder.generation.speculative import Guessing, lookup_draft
from polycoder.generation.text import Sequence
from polycoder.locate import BUNDLED_DIR

# Code repeats itself; a random model's greedy output loops, so both prompts and outputs
# give prompt lookup something to find (the test checks that drafts were taken).
PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return",
    "int main() {\n    int x = 0;\n    x = x + 1;\n    x = x + 1;\n    x = x +",
    "import os\nimport sys\nimport",
]


@pytest.fixture(scope="module")
def model(tiny_folder):
    return load_model(tiny_folder)


def test_lookup_draft_proposes_what_followed_the_latest_match():
    assert lookup_draft([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3], k=2) == [5, 6]  # the latest "1 2 3"
    assert lookup_draft([7, 8, 9, 7], k=3) == [8, 9, 7]  # falls back to the one-token tail
    assert lookup_draft([1, 2, 3], k=3) == []  # the tail occurs nowhere before
    assert lookup_draft([5, 5], k=0) == []


def test_a_rows_index_drafts_what_lookup_draft_finds():
    """`Guessing.draft` keeps an index grown a few tokens a step: the same guesses as
    searching the whole text, for texts that repeat a little or a lot."""
    rng = random.Random(0)
    for vocab in (3, 8, 50):
        tokens = [rng.randrange(vocab) for _ in range(5)]
        row = Guessing()
        for _ in range(300):
            k = rng.randrange(0, 6)
            assert row.draft(tokens, k) == lookup_draft(tokens, k), (vocab, len(tokens))
            tokens += [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]


@pytest.mark.parametrize("k", [1, 4, 7])
def test_greedy_output_is_identical_and_drafts_are_taken(model, k):
    net, tok = model
    params = SamplingParams(max_new_tokens=40)
    plain = generate(net, tok, PROMPTS, params)
    fast = generate(net, tok, PROMPTS, params, speculate=k)
    for a, b in zip(plain, fast):
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
    engine = Engine(net, tok, max_rows=1, max_len=net.config.block_size, speculate=k)
    ids = tok.encode(PROMPTS[1])
    engine.add([Sequence(ids, params, tok, sample_generator(0, 0, 0))])
    tokens = []
    while engine.rows:
        for event in engine.step():
            tokens = event.sequence.token_ids
    assert tokens == plain[1][0].token_ids
    assert engine.stats["accepted"] > 0 and engine.stats["forwards"] < len(tokens)


@pytest.mark.parametrize("k", [0, 4])
def test_a_step_hands_its_tokens_out_once_they_are_final(model, k):
    """`step(emit=...)`: without drafts, each token goes out before the step's forward pass;
    with drafts, after their check, with the accepted tokens' text. Either way once, as the
    step returns them."""
    net, tok = model
    engine = Engine(net, tok, max_rows=2, max_len=net.config.block_size, speculate=k)
    passes = []  # the step's forward passes (decode; verify with drafts)

    def counting(name: str, call):
        def counted(*a, **kw):
            passes.append(name)
            return call(*a, **kw)
        return counted

    engine.decode, engine._verify = counting("decode", engine.decode), counting("verify", engine._verify)
    params, short = SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=7)
    engine.add([Sequence(tok.encode(PROMPTS[1]), params, tok, sample_generator(0, 0, 0))])
    engine.add([Sequence(tok.encode(PROMPTS[2]), short, tok, sample_generator(0, 0, 0))])  # ends first
    texts, early, handed = {}, [], []
    while engine.rows:
        before = len(passes)
        handed.clear()
        returned = engine.step(emit=lambda events, n=before: handed.append((list(events), len(passes) == n)))
        assert len(handed) == 1 and [(e.sequence, e.text) for e in handed[0][0]] == [(e.sequence, e.text)
                                                                                    for e in returned]
        early.append(handed[0][1])
        for e in returned:
            texts[id(e.sequence)] = texts.get(id(e.sequence), "") + e.text
    want = [generate(net, tok, [PROMPTS[1]], params)[0][0].text, generate(net, tok, [PROMPTS[2]], short)[0][0].text]
    assert sorted(texts.values()) == sorted(want)
    if k == 0:
        assert all(early)  # every step: out before the forward pass
    else:
        assert "verify" in passes and not all(early)  # drafts checked first


def test_streamed_text_is_identical(model):
    net, tok = model
    params = SamplingParams(max_new_tokens=30, stop=("\n\n",))
    for prompt in PROMPTS:
        assert "".join(stream(net, tok, prompt, params, speculate=5)) == "".join(stream(net, tok, prompt, params))


@pytest.mark.parametrize("k", [2, 6])
def test_sampling_rows_are_speculated_and_a_seed_gives_the_same_sample(model, k):
    """Each token is drawn as plain sampling draws it (the same draw, the same distribution),
    alone or in a batch (fewer guesses a row), with top-k and top-p."""
    net, tok = model
    for temperature in (0.01, 0.3, 1.5):  # a random model: guesses are kept only near greedy
        params = SamplingParams(max_new_tokens=30, temperature=temperature, top_p=0.9, top_k=50, num_samples=3, seed=1)
        plain = generate(net, tok, PROMPTS, params)
        for max_rows in (1, 4, 64):
            fast = generate(net, tok, PROMPTS, params, speculate=k, max_rows=max_rows)
            assert [[c.token_ids for c in cs] for cs in plain] == [[c.token_ids for c in cs] for cs in fast]
    # guesses were made for sampling rows, some kept and some refused
    engine = Engine(net, tok, max_rows=3, max_len=net.config.block_size, speculate=k)
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(max_new_tokens=60, temperature=0.01, seed=3)
        engine.add([Sequence(tok.encode(prompt), params, tok, sample_generator(3, i, 0))])
    while engine.rows:
        engine.step()
    assert 0 < engine.stats["accepted"] < engine.stats["drafted"], engine.stats


def test_the_bundled_model_samples_the_same_with_guesses_kept_at_usual_temperatures():
    """A trained model repeats code at temperatures people sample at (0.2-0.8)."""
    net, tok = load_model(BUNDLED_DIR)
    prompt = PROMPTS[0] * 2
    for temperature in (0.2, 0.8):
        params = SamplingParams(max_new_tokens=48, temperature=temperature, num_samples=4, seed=5)
        engine = Engine(net, tok, max_rows=4, max_len=net.config.block_size, speculate=4)
        rows = [Sequence(tok.encode(prompt), params, tok, sample_generator(5, 0, j)) for j in range(4)]
        engine.add(rows)
        while engine.rows:
            engine.step()
        plain = generate(net, tok, [prompt], params)[0]
        assert [s.token_ids for s in rows] == [c.token_ids for c in plain]
        assert engine.stats["accepted"] > 0, engine.stats


def test_a_negative_draft_count_is_refused(model):
    from polycoder.errors import PolycoderError

    net, tok = model
    with pytest.raises(PolycoderError, match="speculate must be >= 0"):
        Engine(net, tok, max_rows=1, max_len=32, speculate=-1)


@pytest.mark.parametrize("draft", [[], ["--draft-model", "TINY"]], ids=["prompt-lookup", "draft-model"])
def test_the_server_speculates_with_the_same_completions_and_counts_acceptance(tiny_folder, tmp_path, draft):
    """`serve --speculate 5`: every greedy completion is the plain one, for requests alone and
    side by side in a batch, and /metrics counts the drafted and kept tokens."""
    import concurrent.futures
    import re

    import httpx
    from serve_server import Server

    draft = [str(tiny_folder) if a == "TINY" else a for a in draft]
    net, tok = load_model(tiny_folder)
    expected = [c[0].text for c in generate(net, tok, PROMPTS, SamplingParams(max_new_tokens=30))]
    server = Server(tiny_folder, "--speculate", "5", "--max-batch-size", "4", *draft, log=tmp_path / "server.log")
    try:
        def complete(prompt: str) -> str:
            r = httpx.post(server.url + "/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": prompt, "max_tokens": 30, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        assert [complete(p) for p in PROMPTS] == expected  # one at a time: up to 5 drafts a step
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # together: fewer drafts a row
            assert list(pool.map(complete, PROMPTS)) == expected
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        drafted = float(re.search(r"^polycoder_speculative_drafted_tokens_total (\S+)$", metrics, re.M).group(1))
        kept = float(re.search(r"^polycoder_speculative_accepted_tokens_total (\S+)$", metrics, re.M).group(1))
        assert drafted > 0 and 0 < kept <= drafted
    finally:
        server.stop()


@pytest.mark.parametrize("native", [True, False])
def test_verifying_positions_equals_decoding_them_one_by_one(model, native):
    """The decode step's `verify` (T positions a row in one pass; natively, rows that share a
    cache row) gives the logits that T plain decode steps give. A position that saw a key it
    should not (or missed one) is off by the size of the logits themselves; fp32 sums in
    another order differ by about depth x 2^-24 relative, far below the 1e-3 allowed here."""
    from polycoder import kernels
    from polycoder.backend import PLAIN, Backend

    if native and not kernels.available():
        pytest.skip(f"native kernels: {kernels.status()}")
    net, tok = model
    backend = Backend(native_kernels=True) if native else PLAIN
    prompts = [tok.encode(p)[:20] for p in PROMPTS[:2]]
    follow = [[11, 12, 13], [21, 22, 23]]
    engines = [Engine(net, tok, max_rows=2, max_len=64, backend=backend) for _ in range(2)]
    for e in engines:
        for r, ids in enumerate(prompts):
            e.prefill(ids, r)
    # one pass over 3 positions of each row ...
    x = torch.tensor(follow)
    pos = torch.tensor([[len(p) + i for i in range(3)] for p in prompts])
    with torch.inference_mode():
        together = engines[0].decode_step.verify(x, pos)  # [2, 3, V]
        # ... against 3 decode steps
        apart = torch.stack([engines[1].decode(x[:, i].tolist(), pos[:, i].tolist()) for i in range(3)], dim=1)
    scale = apart.abs().max()
    assert (together - apart).abs().max() <= 1e-3 * scale


@pytest.mark.parametrize("draft_is_target", [True, False])
def test_a_draft_model_s_guesses_leave_greedy_output_unchanged(model, tiny_config, code_tokenizer, draft_is_target):
    """Guesses from a draft model with the same tokenizer: the model itself (every guess kept)
    or another random model (most refused); the output is plain greedy decoding's either way,
    alone, batched, and with rows joining and leaving (more prompts than rows)."""
    from polycoder.checkpoint import build_model

    net, tok = model
    draft = net if draft_is_target else build_model(tiny_config, seed=7)
    params = SamplingParams(max_new_tokens=30)
    plain = generate(net, tok, PROMPTS, params)
    for max_rows in (1, 2, 3):
        fast = generate(net, tok, PROMPTS, params, speculate=3, draft_model=draft, max_rows=max_rows)
        assert [c[0].token_ids for c in fast] == [c[0].token_ids for c in plain]
    for temperature in (0.01, 0.7):  # sampled: the same sample for the seed
        sampled = SamplingParams(max_new_tokens=30, temperature=temperature, seed=2)
        plain_sampled = generate(net, tok, PROMPTS, sampled)
        fast = generate(net, tok, PROMPTS, sampled, speculate=3, draft_model=draft, max_rows=2)
        assert [c[0].token_ids for c in fast] == [c[0].token_ids for c in plain_sampled]
    engine = Engine(net, tok, max_rows=1, max_len=net.config.block_size, speculate=3, draft_model=draft)
    engine.add([Sequence(tok.encode(PROMPTS[0]), params, tok, sample_generator(0, 0, 0))])
    while engine.rows:
        engine.step()
    if draft_is_target:
        assert engine.stats["accepted"] == engine.stats["drafted"] > 0


def test_generate_takes_a_draft_model_on_the_command_line(tiny_folder):
    import subprocess
    import sys

    common = [sys.executable, "-m", "polycoder", "generate", "--model", str(tiny_folder), "--prompt", PROMPTS[1],
              "--max-new-tokens", "20"]
    plain = subprocess.run(common, capture_output=True, text=True, timeout=300, check=True).stdout
    fast = subprocess.run([*common, "--speculate", "3", "--draft-model", str(tiny_folder)], capture_output=True,
                          text=True, timeout=300, check=True).stdout
    assert fast == plain
    bad = subprocess.run([*common, "--draft-model", str(tiny_folder)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--speculate" in bad.stderr
