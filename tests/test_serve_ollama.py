"""Ollama-format requests over httpx against a real `polycoder serve`: /api/generate
(NDJSON streamed and not, options mapped, context carried over), /api/tags, /api/show,
/api/version."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("fastapi")

from serve_server import Server  # noqa: E402

from polycoder.checkpoint import load_model  # noqa: E402
from polycoder.fim import encode_around_cursor, fit  # noqa: E402
from polycoder.generation import Penalties, SamplingParams, generate  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_folder):
    s = Server(tiny_folder, "--max-batch-size", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(tiny_folder):
    return load_model(tiny_folder)


def test_version_tags_show(server):
    assert httpx.get(server.url + "/api/version", timeout=30).json()["version"].count(".") == 2
    tags = httpx.get(server.url + "/api/tags", timeout=30).json()["models"]
    assert [m["name"] for m in tags] == ["tiny:latest"]
    assert tags[0]["details"]["family"] == "gptneox" and tags[0]["details"]["quantization_level"] == "F32"
    show = httpx.post(server.url + "/api/show", json={"model": "tiny:latest"}, timeout=30).json()
    assert show["model_info"]["gptneox.context_length"] == 256
    assert show["model_info"]["gptneox.block_count"] == 2
    assert show["template"] == "{{ .Prompt }}"
    old_style = httpx.post(server.url + "/api/show", json={"name": "tiny"}, timeout=30)
    assert old_style.status_code == 200
    missing = httpx.post(server.url + "/api/show", json={"model": "codellama"}, timeout=30)
    assert missing.status_code == 404 and "codellama" in missing.json()["error"]


def test_generate_not_streamed_matches_local_greedy(server, local):
    model, tok = local
    body = {"model": "tiny", "prompt": "def main():\n", "stream": False,
            "options": {"temperature": 0, "num_predict": 9}}
    r = httpx.post(server.url + "/api/generate", json=body, timeout=60).json()
    expected = generate(model, tok, ["def main():\n"], SamplingParams(max_new_tokens=9))[0][0]
    assert r["response"] == expected.text and r["done"] is True and r["done_reason"] == "length"
    assert r["prompt_eval_count"] == len(tok.encode("def main():\n")) and r["eval_count"] == 9
    assert r["context"] == tok.encode("def main():\n") + expected.token_ids
    assert r["total_duration"] > 0 and r["model"] == "tiny"


def test_generate_streamed_ndjson(server, local):
    model, tok = local
    body = {"model": "tiny:latest", "prompt": "#include <stdio.h>\n",
            "options": {"temperature": 0, "num_predict": 7, "top_k": 1}}
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 7
    text = "".join(x["response"] for x in lines)
    assert text == generate(model, tok, ["#include <stdio.h>\n"], SamplingParams(max_new_tokens=7))[0][0].text


def test_options_map_to_sampling(server, local):
    model, tok = local
    opts = {"temperature": 0.9, "top_p": 0.8, "top_k": 20, "seed": 7, "num_predict": 10, "stop": ["\n\n"],
            "num_ctx": 2048, "repeat_penalty": 1.1}
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "fn f() {", "stream": False,
                                                       "options": opts}, timeout=60).json()
    again = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "fn f() {", "stream": False,
                                                           "options": opts}, timeout=60).json()
    expected = generate(model, tok, ["fn f() {"], SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.8,
                                                                top_k=20, seed=7, stop=("\n\n",),
                                                                penalties=Penalties(repeat=1.1)))[0][0]
    assert r["response"] == again["response"] == expected.text


def test_penalty_options_over_the_prompt_and_the_answer(server, local):
    """repeat_penalty, repeat_last_n, presence_penalty and frequency_penalty as llama.cpp counts
    them (the last n tokens of the prompt and the answer); Ollama's client sends them so."""
    ollama = pytest.importorskip("ollama")
    model, tok = local
    prompt = "x = x + 1\nx = x + 1\nx"
    opts = {"temperature": 0, "num_predict": 16, "repeat_penalty": 1.5, "repeat_last_n": 12, "presence_penalty": 0.5,
            "frequency_penalty": 0.25}
    r = ollama.Client(host=server.url).generate(model="tiny", prompt=prompt, options=opts)
    penalties = Penalties(repeat=1.5, presence=0.5, frequency=0.25, last_n=12)
    want = generate(model, tok, [prompt], SamplingParams(max_new_tokens=16, penalties=penalties))[0][0]
    plain = generate(model, tok, [prompt], SamplingParams(max_new_tokens=16))[0][0]
    assert r.response == want.text and want.token_ids != plain.token_ids
    for bad, field in (({"repeat_penalty": 0}, "repeat_penalty"), ({"repeat_last_n": -2}, "repeat_last_n"),
                       ({"presence_penalty": 9}, "presence_penalty")):
        answer = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": prompt, "options": bad},
                            timeout=30)
        assert answer.status_code == 400 and field in answer.json()["error"]


def test_context_continues_a_previous_answer(server, local):
    model, tok = local
    first = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x = 1\n", "stream": False,
                                                           "options": {"temperature": 0, "num_predict": 4}},
                       timeout=60).json()
    second = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "y", "stream": False,
                                                            "context": first["context"],
                                                            "options": {"temperature": 0, "num_predict": 4}},
                        timeout=60).json()
    ids = first["context"] + tok.encode("y")
    assert second["response"] == generate(model, tok, [ids], SamplingParams(max_new_tokens=4))[0][0].text


def test_empty_prompt_loads_and_errors_are_ollama_shaped(server):
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny"}, timeout=30).json()
    assert r["done"] is True and r["done_reason"] == "load" and r["response"] == ""
    bad = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x", "suffix": "y"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"] == "tiny:latest does not support insert"  # Ollama's words
    bad = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": ["x"]}, timeout=30)
    assert bad.status_code == 400 and bad.json() == {"error": "prompt must be a string"}
    bad = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x",
                                                         "options": {"temperature": -1}}, timeout=30)
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]


def test_a_prompt_longer_than_the_context_is_cut_at_its_start(server, local):
    """As Ollama does (it truncates rather than refusing): the prompt's start is left out so
    that num_predict tokens fit, or a quarter of the context with num_predict -1; the answer
    is the local model's greedy continuation of the kept ids, and the header says so. The
    cut stays put: a resent, longer prompt keeps the same start while that start still fits
    (`fim.fit`: the cut moves to the next anchor of the content only when it must)."""
    model, tok = local
    prompt = "".join(f"x{i} = compute({i}, y{i})\n" for i in range(400))
    url = server.url + "/api/generate"
    r = httpx.post(url, json={"model": "tiny", "prompt": prompt, "stream": False,
                              "options": {"temperature": 0, "num_predict": 8}}, timeout=60)
    assert r.status_code == 200 and "X-Polycoder-Truncated" in r.headers
    ids = fit(encode_around_cursor(tok.encode, prompt, "", 256 - 8, tok.max_token_bytes)[0], [], 256 - 8)[0]
    want = generate(model, tok, [ids], SamplingParams(max_new_tokens=8))[0][0]
    got = r.json()
    assert got["response"] == want.text and got["prompt_eval_count"] == len(ids) > 200
    assert got["context"][: len(ids)] == ids
    whole = encode_around_cursor(tok.encode, prompt, "", 256 - 8, tok.max_token_bytes)[0]
    kept_start = []
    for tail in ["z", "z = 1"]:
        more = httpx.post(url, json={"model": "tiny", "prompt": prompt + tail, "stream": False,
                                     "options": {"temperature": 0, "num_predict": 8}}, timeout=60).json()
        longer = encode_around_cursor(tok.encode, prompt + tail, "", 256 - 8, tok.max_token_bytes)[0]
        kept = fit(longer, [], 256 - 8)[0]
        assert more["context"][: len(kept)] == kept
        if len(ids) + len(longer) - len(whole) <= 256 - 8:  # the old start still fits: it stays
            assert kept[:100] == ids[:100]
            kept_start.append(tail)
    assert kept_start  # this prompt's cut leaves a token spare, so "z" (one token) keeps the start
    endless = httpx.post(url, json={"model": "tiny", "prompt": prompt, "stream": False,
                                    "options": {"temperature": 0, "num_predict": -1}}, timeout=60)
    assert endless.status_code == 200 and "X-Polycoder-Truncated" in endless.headers
    assert endless.json()["prompt_eval_count"] <= 256 - 256 // 4
    short = httpx.post(url, json={"model": "tiny", "prompt": "x = 1\n", "stream": False,
                                  "options": {"num_predict": 4}}, timeout=60)
    assert short.status_code == 200 and "X-Polycoder-Truncated" not in short.headers
