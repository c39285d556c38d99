"""Several LoRA adapters over one base in one real `polycoder serve`: the request's `model`
picks one (OpenAI and Ollama), both APIs list them all, an unknown name is a 404, and an
--adapter that is not one is refused before any model is loaded."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("peft")

from serve_server import Server, post  # noqa: E402

from polycoder.checkpoint import load_model  # noqa: E402
from polycoder.generation import SamplingParams, generate  # noqa: E402
from polycoder.lora import add_lora, save_adapter  # noqa: E402

PROMPT = "def main():\n"


def make_adapter(base, folder, seed: int):
    """A LoRA adapter over `base` with random B (peft starts B at zero: a no-op adapter)."""
    net, tok = load_model(base)
    pm = add_lora(net, 4, 8.0, 0.0, ["query_key_value", "dense_4h_to_h"], str(base.resolve()))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_adapter(pm, tok, folder)


@pytest.fixture(scope="module")
def adapters(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_folder, root / "alpha", 1), make_adapter(tiny_folder, root / "beta", 2)


@pytest.fixture(scope="module")
def server(tiny_folder, adapters):
    alpha, beta = adapters
    s = Server(tiny_folder, "--max-batch-size", "4", "--adapter", f"a={alpha}", "--adapter", str(beta))
    yield s
    s.stop()


def greedy(folder) -> str:
    model, tok = load_model(folder)
    return generate(model, tok, [PROMPT], SamplingParams(max_new_tokens=8))[0][0].text


def test_models_listed_by_both_apis(server):
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]]
    assert ids == ["tiny", "a", "beta"]
    tags = [m["name"] for m in httpx.get(server.url + "/api/tags", timeout=30).json()["models"]]
    assert tags == ["tiny:latest", "a:latest", "beta:latest"]
    assert httpx.get(server.url + "/v1/models/beta", timeout=30).json()["id"] == "beta"
    assert httpx.get(server.url + "/health", timeout=30).json()["models"] == ["tiny", "a", "beta"]


def test_model_field_picks_the_adapter(server, tiny_folder, adapters):
    alpha, beta = adapters
    want = {"tiny": greedy(tiny_folder), "a": greedy(alpha), "beta": greedy(beta)}
    assert len(set(want.values())) == 3  # the adapters change the model, and differ
    for name, text in want.items():
        r = post(server, {"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == name
        assert r.json()["choices"][0]["text"] == text
    plain = post(server, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert plain.json()["choices"][0]["text"] == want["tiny"]  # no model: the base
    ollama = post(server, {"model": "a:latest", "prompt": PROMPT, "stream": False,
                           "options": {"temperature": 0, "num_predict": 8}}, path="/api/generate")
    assert ollama.status_code == 200 and ollama.json()["response"] == want["a"]


def test_unknown_model_is_a_404_naming_the_served_ones(server):
    r = post(server, {"model": "gamma", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'tiny', 'a', 'beta'" in r.json()["error"]["message"]
    r = post(server, {"model": "gamma", "prompt": PROMPT}, path="/api/generate")
    assert r.status_code == 404 and "gamma" in r.json()["error"]


def test_an_adapter_that_is_not_one_is_refused_at_start(tiny_folder, adapters):
    cmd = [sys.executable, "-m", "polycoder", "serve", "--model", str(tiny_folder), "--port", "1"]
    r = subprocess.run(cmd + ["--adapter", f"x={tiny_folder}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a LoRA adapter folder" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["--adapter", f"model={adapters[0]}", "--model-name", "model"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "is taken" in r.stderr
