"""What one client sends must never hurt another (issue: hardening), against a real server.

- values that would overflow inside the engine (top_k ~ 1e20, on the OpenAI route and in
  Ollama's options) are refused at the edge with a 400 naming the field, while other
  clients' streams in flight finish; and if a bad row ever reached the engine, only its own
  request fails (checked on the Engine directly);
- bodies over the size limit get a 413 naming the limit, whether or not they declare a
  length; a prompt that cannot fit the context is refused from its length in characters;
- malformed JSON (lone UTF-16 surrogates, deep nesting, integers thousands of digits long)
  is a 400 in the format of the API called, never a 500;
- a small request is not starved behind a large one (fair shares of the batch).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from polycoder.checkpoint import load_model
from polycoder.generation import Engine, SamplingParams, Sequence, sample_generator

pytest.importorskip("fastapi")

from serve_server import Server, post, still_serves  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    s = Server(tiny_folder, "--max-batch-size", "4", "--max-request-bytes", "100000",
               log=tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()


def error_message(r, status):
    assert r.status_code == status, r.text
    if r.request.url.path.startswith("/api/"):
        return r.json()["error"]
    err = r.json()["error"]
    assert err["type"] in ("invalid_request_error", "server_error")
    return err["message"]


def test_huge_integers_are_refused_at_the_edge_while_others_stream(server):
    streams = []

    def stream_one(i):
        body = {"prompt": f"def f{i}(x):", "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        streams.append((r.status_code, lines[-1], [json.loads(x[6:]) for x in lines[:-1]]))

    threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    m = error_message(post(server, {"prompt": "x", "top_k": 10**20}), 400)
    assert "top_k" in m
    m = error_message(post(server, {"model": "tiny", "prompt": "x", "options": {"top_k": 10**20}}, "/api/generate"), 400)
    assert "top_k" in m
    for body in ({"prompt": "x", "seed": 2**70}, {"prompt": "x", "n": 10**20}, {"prompt": [10**20]}):
        assert post(server, body).status_code == 400, body
    assert post(server, {"model": "tiny", "prompt": "", "context": [10**20]}, "/api/generate").status_code == 400
    for t in threads:
        t.join(120)
    assert len(streams) == 3
    for code, last, chunks in streams:
        assert code == 200 and last == "data: [DONE]"
        assert not any("error" in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"
    # Large but valid: a k above the vocabulary is no limit at all.
    r = post(server, {"prompt": "x", "top_k": 2**31 - 1, "max_tokens": 3, "temperature": 0.8, "seed": -5})
    assert r.status_code == 200
    still_serves(server)


def test_a_row_that_fails_in_the_engine_fails_alone(tiny_folder):
    """If a bad value ever slipped past the edge, sampling falls back to one row at a time and
    only that row ends (finish_reason "error"); the rest of the batch goes on."""
    model, tok = load_model(tiny_folder)
    engine = Engine(model, tok, max_rows=3, max_len=64)
    good = SamplingParams(max_new_tokens=6, temperature=0.9, seed=1)
    bad = SamplingParams(max_new_tokens=6, temperature=0.9, seed=1)
    bad.top_p = "0.9"  # a value of the wrong type, past SamplingParams' own check, as a bug could let it
    seqs = [Sequence(tok.encode(p), prm, tok, sample_generator(1, i, 0))
            for i, (p, prm) in enumerate([("a = ", good), ("b = ", bad), ("c = ", good)])]
    for s in seqs:
        engine.add([s])
    while engine.rows:
        engine.step()
    assert [s.finish_reason for s in seqs] == ["length", "error", "length"]
    assert seqs[1].error.startswith(("TypeError", "ValueError"))
    assert len(seqs[0].token_ids) == len(seqs[2].token_ids) == 6


def test_bodies_over_the_limit_get_413(server):
    big = {"prompt": "x" * 200_000}
    m = error_message(post(server, big), 413)
    assert "100000" in m and "--max-request-bytes" in m
    assert "100000" in error_message(post(server, big, "/api/generate"), 413)

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(40):
            yield b" " * 10_000
        yield b'{"prompt": "x"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert "100000" in error_message(r, 413)
    still_serves(server)


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(server):
    m = error_message(post(server, {"prompt": "ab" * 45_000, "max_tokens": 4}), 400)
    assert "at least" in m and "characters" in m  # the bound from its length, not a count of tokens
    # Ollama's route cuts a long prompt as Ollama does, tokenizing only its end
    r = post(server, {"model": "tiny", "prompt": "y" * 90_000, "stream": False, "options": {"num_predict": 2}},
             "/api/generate")
    assert r.status_code == 200 and r.json()["prompt_eval_count"] <= 254
    # and so does llama.cpp's /completion, as llama.cpp does
    r = post(server, {"prompt": "y" * 90_000, "n_predict": 2}, "/completion")
    assert r.status_code == 200 and r.json()["truncated"] is True and r.json()["tokens_evaluated"] <= 254
    still_serves(server)


@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "\\ud800 lone", "max_tokens": 2}', ["prompt", "surrogate"]),
    (b'{"prompt": "x", "stop": ["\\udfff"]}', ["stop", "surrogate"]),
    (b'{"\\ud83d": 1, "prompt": "x"}', ["surrogate"]),
    (b'{"prompt": "x", "a": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", ["nests too deeply"]),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", ["not valid JSON"]),
    (b'{"prompt": "x", "seed": ' + b"1" * 4500 + b"}", ["not valid JSON"]),
    (b'\xff\xfe{"prompt": "x"}', ["not valid"]),
])
def test_malformed_json_is_a_400_on_every_api(server, raw, words):
    for path in ("/v1/completions", "/api/generate", "/completion", "/infill"):
        r = httpx.post(server.url + path, content=raw, timeout=60, headers={"Content-Type": "application/json"})
        m = error_message(r, 400)
        for w in words:
            assert w in m, (path, m)
    still_serves(server)


def test_stop_strings_are_bounded(server):
    m = error_message(post(server, {"prompt": "x", "stop": ["y" * 5000]}), 400)
    assert "stop" in m and "1024" in m


def test_a_small_request_is_not_starved_behind_a_large_one(server):
    """Two prompts with n=8 each (16 rows' worth on a 4-row batch) arrive first; a 4-token
    request after them gets its share of the batch at once and finishes long before."""
    done: dict[str, float] = {}

    def big():
        r = post(server, {"prompt": ["def a(x):", "def b(y):"], "n": 8, "max_tokens": 40, "temperature": 0.8, "seed": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 16
        done["big"] = time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        f = pool.submit(big)
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health", timeout=30).json()["active_rows"] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)  # the large request fills the batch first
        r = post(server, {"prompt": "small", "max_tokens": 4, "temperature": 0})
        done["small"] = time.monotonic()
        assert r.status_code == 200
        f.result(300)
    assert done["small"] < done["big"]
