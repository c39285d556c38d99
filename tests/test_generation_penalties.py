"""Repetition penalties (`polycoder.generation.penalties`): llama.cpp's rule against a hand
computation, greedy decoding against transformers' `repetition_penalty` on the same folder,
the engine's window at each step against a plain decoding loop, speculation and batches
leaving penalized rows exact, and the settings' refusals."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from polycoder.checkpoint import load_model
from polycoder.errors import PolycoderError
from polycoder.generation import Penalties, SamplingParams, generate
from polycoder.generation.penalties import penalize

PROMPTS = ["def hello(name):\n    return", "#include <stdio.h>\nint main() {\n\t", "x"]


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load_model(tiny_folder)


def test_penalize_follows_llama_cpps_rule():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    logits[7] = 0.0
    window = [3, 3, 3, 7, 9, 12, 12, 49, 49, 60]  # 60: past the vocabulary, never counted
    p = Penalties(repeat=1.3, presence=0.4, frequency=0.25, last_n=-1)
    out = logits.clone()
    penalize(out, window, p)
    for t in range(50):
        v, c = float(logits[t]), window.count(t)
        want = v if c == 0 else (v / 1.3 if v > 0 else v * 1.3) - c * 0.25 - 0.4
        # |values| < 15 and three fp32 roundings of at most half an ulp (6e-8 relative) each: < 3e-6.
        assert float(out[t]) == pytest.approx(want, abs=1e-5), t


def test_window_and_activity():
    assert Penalties(last_n=3).window([1, 2, 3], [4, 5]) == [3, 4, 5]
    assert Penalties(last_n=-1).window([1, 2, 3], [4, 5]) == [1, 2, 3, 4, 5]
    assert Penalties(last_n=10, count_prompt=False).window([1, 2, 3], [4, 5]) == [4, 5]
    assert Penalties(last_n=1, count_prompt=False).window([1, 2, 3], []) == []
    assert not Penalties().active and not Penalties(repeat=1.2, last_n=0).active
    assert Penalties(repeat=1.2).active and Penalties(presence=-0.5).active and Penalties(frequency=0.1).active


@pytest.mark.parametrize("kwargs, words", [
    (dict(repeat=0.0), "repeat penalty must be > 0"),
    (dict(repeat=float("nan")), "finite"),
    (dict(presence=float("inf")), "finite"),
    (dict(last_n=-2), "-1 (all tokens)"),
])
def test_bad_settings_are_refused(kwargs, words):
    with pytest.raises(PolycoderError, match=re.escape(words)):
        Penalties(**kwargs)


def test_beam_search_refuses_penalties():
    with pytest.raises(PolycoderError, match="not to beam search"):
        SamplingParams(num_beams=2, penalties=Penalties(repeat=1.2))


def test_greedy_with_repeat_penalty_equals_transformers(tiny, tiny_folder):
    """transformers' RepetitionPenaltyLogitsProcessor is the same rule over every token so far."""
    model, tok = tiny
    hf = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    padding = list(range(tok.vocab_size, hf.config.vocab_size))
    params = SamplingParams(max_new_tokens=24, stop_at_eod=False, penalties=Penalties(repeat=1.3, last_n=-1))
    ours = generate(model, tok, PROMPTS, params)
    plain = generate(model, tok, PROMPTS, SamplingParams(max_new_tokens=24, stop_at_eod=False))
    for prompt, (c,) in zip(PROMPTS, ours):
        ids = torch.tensor([tok.encode(prompt)])
        ref = hf.generate(ids, do_sample=False, eos_token_id=None, pad_token_id=1, suppress_tokens=padding,
                          max_new_tokens=24, repetition_penalty=1.3)
        assert c.token_ids == ref[0, ids.shape[1]:].tolist()
    assert any(c.token_ids != p.token_ids for (c,), (p,) in zip(ours, plain)), "the penalty changed nothing"


def reference(model, tok, prompt: str, p: Penalties, n: int) -> list[int]:
    """Plain greedy decoding: a full forward pass a token, the window taken anew each step."""
    ids, out = tok.encode(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0, -1].float()
            logits[tok.vocab_size:] = float("-inf")
            penalize(logits, p.window(ids, out), p)
            out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("penalties", [
    Penalties(repeat=1.5, presence=0.5, frequency=0.3, last_n=8),  # llama.cpp's window: prompt and output
    Penalties(presence=1.0, frequency=0.5, last_n=-1, count_prompt=False),  # OpenAI's: the output only
])
def test_engine_window_equals_a_plain_loop_with_and_without_speculation(tiny, penalties):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=20, stop_at_eod=False, penalties=penalties)
    want = [reference(model, tok, prompt, penalties, 20) for prompt in PROMPTS]
    assert [c.token_ids for (c,) in generate(model, tok, PROMPTS, params)] == want
    # Penalized rows are not speculated (their logits change with each kept token): the same tokens.
    assert [c.token_ids for (c,) in generate(model, tok, PROMPTS, params, speculate=4)] == want


def test_a_huge_presence_penalty_never_repeats_a_token(tiny):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=40, stop_at_eod=False,
                            penalties=Penalties(presence=1e4, last_n=-1, count_prompt=False))
    for (c,) in generate(model, tok, PROMPTS, params):
        assert len(set(c.token_ids)) == len(c.token_ids) == 40


def test_cli_flags_and_their_errors(tiny_folder):
    from polycoder.generation.cli import cli_generate

    with pytest.raises(PolycoderError, match="repeat penalty must be > 0"):
        cli_generate(prompt="x", repeat_penalty=0.0)  # refused before any model loads
    ok = subprocess.run([sys.executable, "-m", "polycoder", "generate", "--model", str(tiny_folder), "--prompt", "x",
                         "--max-new-tokens", "6", "--json-output", "--repeat-penalty", "1.3", "--repeat-last-n", "-1",
                         "--presence-penalty", "0.2"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    model, tok = load_model(tiny_folder)
    penalties = Penalties(repeat=1.3, presence=0.2, last_n=-1)
    (want,), = generate(model, tok, ["x"], SamplingParams(max_new_tokens=6, penalties=penalties))
    assert json.loads(ok.stdout)[0]["text"] == want.text
