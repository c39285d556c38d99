"""Bad input gets a 4xx with a clear message, and the server keeps serving others: invalid
JSON, wrong types, bad max_tokens, unknown model, prompts over the context, API keys, a
client that disconnects mid-stream, a full queue; plus /health, /metrics, request ids, CORS."""

from __future__ import annotations

import concurrent.futures
import socket
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from serve_server import Server, post, still_serves  # noqa: E402

CONTEXT = 256  # test-tiny's context


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    s = Server(tiny_folder, "--max-batch-size", "4", log=tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()


def error_of(r, status, *words):
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"] if r.request.url.path.startswith("/v1") else r.json()["error"]
    for w in words:
        assert w in message, message
    return message


def test_invalid_json(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{'prompt': 'x',", timeout=30,
                   headers={"Content-Type": "application/json"})
    error_of(r, 400, "not valid JSON")
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/api/generate", content=b"[1, 2", timeout=30)
    error_of(r, 400, "not valid JSON")
    error_of(post(server, [1, 2, 3]), 400, "JSON object")
    still_serves(server)


@pytest.mark.parametrize("body, words", [
    ({"prompt": "x", "max_tokens": "12"}, ["max_tokens", "integer"]),
    ({"prompt": "x", "max_tokens": 1.5}, ["max_tokens", "integer"]),
    ({"prompt": "x", "temperature": "hot"}, ["temperature", "number"]),
    ({"prompt": "x", "temperature": 7}, ["temperature", "[0.0, 2.0]"]),
    ({"prompt": "x", "top_p": 0}, ["top_p"]),
    ({"prompt": "x", "n": 0}, ["n must be at least 1"]),
    ({"prompt": "x", "n": True}, ["n must be an integer"]),
    ({"prompt": "x", "stream": "yes"}, ["stream", "true or false"]),
    ({"prompt": "x", "stop": [1, 2]}, ["stop", "strings"]),
    ({"prompt": 42}, ["prompt must be"]),
    ({"prompt": []}, ["prompt must be"]),
    ({"prompt": [1, "a"]}, ["prompt must be"]),
    ({"prompt": [999999]}, ["out of the vocabulary"]),
    ({"prompt": "x", "logprobs": 99}, ["logprobs", "at most 20"]),
    ({"prompt": "x", "logprobs": 1, "stream": True}, ["logprobs with stream"]),
    ({"prompt": "x", "presence_penalty": 2.5}, ["presence_penalty", "[-2.0, 2.0]"]),
    ({"prompt": "x", "frequency_penalty": "a lot"}, ["frequency_penalty", "number"]),
    ({"prompt": "x", "model": 3}, ["model must be a string"]),
])
def test_wrong_types_and_values(server, body, words):
    error_of(post(server, body), 400, *words)


def test_negative_and_huge_max_tokens(server):
    error_of(post(server, {"prompt": "x", "max_tokens": -1}), 400, "max_tokens must be at least 0")
    m = error_of(post(server, {"prompt": "x", "max_tokens": 10**12}), 400, "max_tokens", str(CONTEXT))
    assert "lower max_tokens" in m
    r = post(server, {"model": "tiny", "prompt": "x", "options": {"num_predict": "many"}}, "/api/generate")
    error_of(r, 400, "num_predict", "integer")
    still_serves(server)


def test_prompt_over_the_context(server):
    r = post(server, {"prompt": [5] * 250, "max_tokens": 10})
    m = error_of(r, 400, "250", str(CONTEXT))
    assert r.json()["error"]["code"] == "context_length_exceeded" and "shorten the prompt" in m
    r = post(server, {"prompt": "a " * 400, "stream": False, "options": {"num_predict": 300}}, "/api/generate")
    error_of(r, 400, "num_predict")  # Ollama's route cuts a long prompt, but not to nothing
    # A prompt that exactly fills the context can still be scored (max_tokens 0).
    r = post(server, {"prompt": [5] * CONTEXT, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == CONTEXT
    still_serves(server)


def test_unknown_model_and_unknown_route(server):
    r = post(server, {"model": "llama3", "prompt": "x"})
    error_of(r, 404, "llama3", "tiny")
    r = post(server, {"model": "llama3", "prompt": "x"}, "/api/generate")
    error_of(r, 404, "llama3")
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    error_of(r, 404, "no route")
    r = httpx.get(server.url + "/v1/completions", timeout=30)
    error_of(r, 405, "not allowed")


def test_client_disconnecting_mid_stream_frees_its_rows(server):
    def metric(name):
        text = httpx.get(server.url + "/metrics", timeout=30).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    before = metric("polycoder_cancelled_rows_total")
    body = {"prompt": "while True:", "max_tokens": 240, "temperature": 0, "stream": True, "n": 2}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    # The connection is closed with ~230 tokens to go: the rows must leave the batch soon.
    deadline = time.time() + 20
    while time.time() < deadline:
        h = httpx.get(server.url + "/health", timeout=30).json()
        if h["active_rows"] == 0 and metric("polycoder_cancelled_rows_total") >= before + 2:
            break
        time.sleep(0.1)
    assert h["active_rows"] == 0
    assert metric("polycoder_cancelled_rows_total") >= before + 2
    still_serves(server)


def test_client_dropping_a_non_streaming_request_frees_its_rows(server):
    body = b'{"prompt": "do {", "max_tokens": 240, "temperature": 0}'
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 20
        while httpx.get(server.url + "/health", timeout=30).json()["active_rows"] == 0 and time.time() < deadline:
            time.sleep(0.02)
    deadline = time.time() + 20
    while httpx.get(server.url + "/health", timeout=30).json()["active_rows"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/health", timeout=30).json()["active_rows"] == 0
    # ... and its handler ended (it did not wait forever for a job that will never finish).
    deadline = time.time() + 20
    while time.time() < deadline and 'status="499"' not in httpx.get(server.url + "/metrics", timeout=30).text:
        time.sleep(0.1)
    assert 'polycoder_requests_total{route="/v1/completions",status="499"}' in httpx.get(server.url + "/metrics").text
    still_serves(server)


def test_health_metrics_and_request_ids(server):
    h = httpx.get(server.url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["context"] == CONTEXT
    r = post(server, {"prompt": "x", "max_tokens": 3, "temperature": 0}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "cmpl-abc-123"
    assert len(post(server, {"prompt": "x", "max_tokens": 1}).headers["x-request-id"]) >= 8
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for name in ("polycoder_requests_total", "polycoder_generated_tokens_total", "polycoder_prompt_tokens_total",
                 "polycoder_queue_depth", "polycoder_active_rows", "polycoder_request_seconds_bucket",
                 "polycoder_time_to_first_token_seconds_bucket", "polycoder_decode_step_seconds_bucket"):
        assert name in text, name
    assert 'polycoder_requests_total{route="/v1/completions",status="200"}' in text
    assert "[abc-123] POST /v1/completions 200" in server.logs()


def test_cors_is_off_by_default(server):
    r = httpx.options(server.url + "/v1/completions", timeout=30,
                      headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = post(server, {"prompt": "x", "max_tokens": 1}, headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


@pytest.fixture(scope="module")
def guarded(tiny_folder, tmp_path_factory):
    s = Server(tiny_folder, "--max-batch-size", "1", "--max-queue", "2", "--cors-origin", "http://editor.example",
               env={"POLYCODER_API_KEY": "s3cret"}, log=tmp_path_factory.mktemp("log") / "guarded.log")
    yield s
    s.stop()


def test_api_key_guards_every_model_route(guarded):
    ok = {"Authorization": "Bearer s3cret"}
    for method, path, body in [("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}),
                               ("GET", "/v1/models", None), ("POST", "/api/generate", {"prompt": "x"}),
                               ("GET", "/api/tags", None), ("POST", "/api/show", {"model": "tiny"})]:
        missing = httpx.request(method, guarded.url + path, json=body, timeout=30)
        assert missing.status_code == 401, path
        wrong = httpx.request(method, guarded.url + path, json=body, timeout=30,
                              headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
        right = httpx.request(method, guarded.url + path, json=body, timeout=30, headers=ok)
        assert right.status_code == 200, (path, right.text)
    m = httpx.post(guarded.url + "/v1/completions", json={"prompt": "x"}, timeout=30).json()["error"]
    assert "missing API key" in m["message"] and m["code"] == "invalid_api_key"
    assert httpx.get(guarded.url + "/health", timeout=30).status_code == 200
    assert httpx.get(guarded.url + "/", timeout=30).status_code == 200


def test_cors_when_configured(guarded):
    r = httpx.options(guarded.url + "/v1/completions", timeout=30,
                      headers={"Origin": "http://editor.example", "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "authorization"})
    assert r.headers.get("access-control-allow-origin") == "http://editor.example"
    r = httpx.options(guarded.url + "/v1/completions", timeout=30,
                      headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.headers.get("access-control-allow-origin") != "http://evil.example"


def test_full_queue_answers_429_and_the_rest_are_served(guarded):
    # One row and room for two waiting requests: of 8 sent at once, some must be turned away.
    body = {"prompt": "x", "max_tokens": 200, "temperature": 0}
    headers = {"Authorization": "Bearer s3cret"}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: httpx.post(guarded.url + "/v1/completions", json=body, timeout=120,
                                                     headers=headers), range(8)))
    codes = sorted(r.status_code for r in results)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    refused = next(r for r in results if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "queue is full" in refused.json()["error"]["message"]
    texts = {r.json()["choices"][0]["text"] for r in results if r.status_code == 200}
    assert len(texts) == 1  # every served request got the same greedy answer
    r = httpx.post(guarded.url + "/v1/completions", json=body, timeout=120, headers=headers)
    assert r.status_code == 200


@pytest.mark.parametrize("args, words", [
    (["--model", "no/such/folder/x"], ["not found"]),
    (["--max-batch-size", "0"], ["max_batch_size must be at least 1"]),
    (["--log-level", "loud"], ["unknown log level"]),
])
def test_cli_refuses_bad_options_in_one_line(tiny_folder, args, words):
    import subprocess
    import sys

    if args[0] != "--model":
        args = ["--model", str(tiny_folder), *args]
    done = subprocess.run([sys.executable, "-m", "polycoder", "serve", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and all(w in done.stderr for w in words), done.stderr
