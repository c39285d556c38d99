"""The official `openai` package against a real `polycoder serve` on 127.0.0.1: completions,
streaming, n, stop, seeds, echo + logprobs (checked against transformers on the same folder)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_server import Server  # noqa: E402

from polycoder.checkpoint import load_model  # noqa: E402
from polycoder.generation import Penalties, SamplingParams, generate  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    s = Server(tiny_folder, "--max-batch-size", "8", log=tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def local(tiny_folder):
    return load_model(tiny_folder)


@pytest.fixture(scope="module")
def hf_model(tiny_folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_greedy_completion_equals_generate(client, local):
    model, tok = local
    r = client.completions.create(model="tiny", prompt="def add(a, b):\n", max_tokens=12, temperature=0)
    expected = generate(model, tok, ["def add(a, b):\n"], SamplingParams(max_new_tokens=12))[0][0]
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("def add(a, b):\n"))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")


def test_presence_and_frequency_penalties_count_the_completion_only(client, local):
    model, tok = local
    prompt = "x = x + 1\nx = x + 1\nx"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, presence_penalty=1.5,
                                  frequency_penalty=0.5)
    penalties = Penalties(presence=1.5, frequency=0.5, last_n=-1, count_prompt=False)  # OpenAI's definition
    want = generate(model, tok, [prompt], SamplingParams(max_new_tokens=16, penalties=penalties))[0][0]
    plain = generate(model, tok, [prompt], SamplingParams(max_new_tokens=16))[0][0]
    assert r.choices[0].text == want.text and want.token_ids != plain.token_ids


def test_prompt_forms_string_list_and_token_ids(client, local):
    model, tok = local
    prompts = ["int main() {", "fn main() {"]
    ids = [tok.encode(p) for p in prompts]
    by_text = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    one_ids = client.completions.create(model="tiny", prompt=ids[1], max_tokens=6, temperature=0)
    expected = [c[0].text for c in generate(model, tok, prompts, SamplingParams(max_new_tokens=6))]
    assert [c.text for c in sorted(by_text.choices, key=lambda c: c.index)] == expected
    assert [c.text for c in sorted(by_ids.choices, key=lambda c: c.index)] == expected
    assert one_ids.choices[0].text == expected[1]


def test_n_samples_with_seed_are_reproducible_and_match_generate(client, local):
    model, tok = local
    kw = dict(model="tiny", prompt="import os\n", max_tokens=8, temperature=1.0, top_p=0.9, n=4, seed=123,
              extra_body={"top_k": 50})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(a.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # four different samples of a random model
    local_out = generate(model, tok, ["import os\n"], SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9,
                                                                    top_k=50, num_samples=4, seed=123))[0]
    assert texts == [c.text for c in local_out]
    assert a.usage.completion_tokens == 32


def test_stop_strings_cut_the_text(client, local):
    model, tok = local
    free = client.completions.create(model="tiny", prompt="x = ", max_tokens=30, temperature=0).choices[0].text
    stop = free[5:8]  # a string the greedy continuation is known to contain
    r = client.completions.create(model="tiny", prompt="x = ", max_tokens=30, temperature=0, stop=[stop, "@@@@"])
    assert r.choices[0].text == free[: free.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    expected = generate(model, tok, ["x = "], SamplingParams(max_new_tokens=30, stop=(stop,)))[0][0]
    assert r.choices[0].text == expected.text


def test_streaming_matches_non_streaming_and_ends_with_finish_reason(client, server):
    kw = dict(model="tiny", prompt="class Foo:\n", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # The raw wire format: every choice's finish_reason comes before [DONE], which is last.
    with httpx.stream("POST", server.url + "/v1/completions", json={**kw, "stream": True, "n": 2,
                      "stream_options": {"include_usage": True}}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    data = [json.loads(e) for e in events[:-1]]
    finished = [c["index"] for d in data for c in d["choices"] if c["finish_reason"]]
    assert sorted(finished) == [0, 1]
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == 20


def test_stream_with_echo_starts_with_the_prompt(client):
    chunks = list(client.completions.create(model="tiny", prompt="let x", max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == "let x"


def test_echo_logprobs_score_the_prompt_like_transformers(client, local, hf_model):
    _, tok = local
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    ids = tok.encode(text)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=3, temperature=0)
    c = r.choices[0]
    assert c.text == text
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) and lp.tokens == [tok.decode([i]) for i in ids]
    assert lp.text_offset == [len(tok.decode(ids[:k])) for k in range(len(ids))]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits.float(), -1)[0]
    expected = [ref[k - 1, ids[k]].item() for k in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for k in range(1, len(ids)):
        top = ref[k - 1].topk(3)
        assert sorted(lp.top_logprobs[k].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)


def test_logprobs_of_generated_tokens_match_a_direct_computation(client, local, hf_model):
    model, tok = local
    prompt = "for i in range(10):"
    ids = tok.encode(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0.8, seed=5, logprobs=2,
                                  extra_body={"top_k": 50})
    c = r.choices[0]
    # The same seed gives the same sample locally (sample j of prompt p has its own generator).
    mine = generate(model, tok, [prompt], SamplingParams(max_new_tokens=8, temperature=0.8, top_k=50, seed=5))[0][0]
    assert c.text == mine.text
    lp = c.logprobs
    assert lp.tokens == [tok.decode([t]) for t in mine.token_ids]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids + mine.token_ids])).logits.float(), -1)[0]
    expected = [ref[len(ids) - 1 + k, t].item() for k, t in enumerate(mine.token_ids)]
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    for k, alts in enumerate(lp.top_logprobs):
        assert sorted(alts.values(), reverse=True) == pytest.approx(ref[len(ids) - 1 + k].topk(2).values.tolist(),
                                                                    abs=1e-4)
    assert lp.text_offset == [len(tok.decode(mine.token_ids[:k])) for k in range(8)]


def test_suffix_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="def f(", suffix="    return x", max_tokens=4)
    assert "suffix" in str(e.value) and "fill-in-the-middle" in str(e.value)


def test_unknown_model_is_a_404_in_openai_format(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    assert "tiny" in e.value.body["message"]
