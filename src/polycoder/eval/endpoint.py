"""A client for OpenAI-compatible `/v1/completions` endpoints (ours, llama.cpp's server, vLLM).

What it implements: the two calls the evaluations need, over httpx:
- `complete`: ordinary sampling (n samples, temperature, top_p, max_tokens, stop), for
  HumanEval;
- `score`: the log-probability of every token of a prompt given as token ids, by the
  OpenAI `echo=True, logprobs=1, max_tokens=0` idiom, for perplexity. Prompts go as token
  ids so the windows are exactly those a local model would see (the server must use the
  same tokenizer; say which with `--tokenizer`).

References: OpenAI's legacy Completions API (`prompt` may be a list of token ids;
`logprobs.token_logprobs[0]` is null because the first token has no context); vLLM and
llama.cpp implement the same fields.

Limits: servers that reject `max_tokens=0` are retried with `max_tokens=1` and the extra
generated token is dropped; OpenAI's own API caps `stop` at 4 strings, so stop strings are
also applied client-side (`cut_at_stop`). No retries on server errors: a failed request
raises PolycoderError naming the URL and status.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from polycoder.errors import PolycoderError


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


@dataclass
class Endpoint:
    """An OpenAI-compatible completions endpoint."""

    url: str
    """Base URL, e.g. http://127.0.0.1:8000 or http://127.0.0.1:8000/v1."""
    model: str | None = None
    """The `model` field of requests (some servers need it; ours and llama.cpp ignore it)."""
    api_key: str | None = None
    """Bearer token; default: the OPENAI_API_KEY environment variable, if set."""
    timeout: float = 600.0
    """Seconds to wait for one response."""

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise PolycoderError(f"endpoint must be an http(s) URL, got {self.url!r}")
        base = self.url.rstrip("/")
        if base.endswith("/completions"):
            base = base[: -len("/completions")]
        if not base.endswith("/v1"):
            base += "/v1"
        self._completions = base + "/completions"
        if self.api_key is None:
            self.api_key = os.environ.get("OPENAI_API_KEY")
        self._client = None

    def _post(self, body: dict) -> dict:
        # Deferred: the eval extra's HTTP client, for endpoints only
        import httpx

        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.Client(timeout=self.timeout, headers=headers)
        if self.model is not None:
            body = {"model": self.model, **body}
        try:
            response = self._client.post(self._completions, json=body)
        except httpx.HTTPError as e:
            raise PolycoderError(f"cannot reach {self._completions}: {e}; is the server running?") from None
        if response.status_code != 200:
            raise PolycoderError(f"{self._completions} answered {response.status_code}: "
                                 f"{response.text[:300]}")
        return response.json()

    def complete(self, prompt: str, n: int, temperature: float, top_p: float, max_tokens: int,
                 stop: tuple[str, ...] = (), seed: int | None = None) -> list[tuple[str, str]]:
        """`n` completions of `prompt`: (text cut at the stop strings, finish_reason)."""
        body = {"prompt": prompt, "n": n, "temperature": temperature, "top_p": top_p,
                "max_tokens": max_tokens, "stop": list(stop)[:4] if stop else None}
        if seed is not None:
            body["seed"] = seed
        choices = sorted(self._post(body)["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise PolycoderError(f"{self._completions} returned {len(choices)} choices, asked for {n}")
        return [(cut_at_stop(c["text"], stop), c.get("finish_reason") or "") for c in choices]

    def score(self, token_ids: list[int]) -> list[float]:
        """Natural-log probabilities of token_ids[1:], each given the tokens before it."""
        body = {"prompt": token_ids, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
        try:
            data = self._post(body)
        except PolycoderError as e:
            if "max_tokens" not in str(e) and "400" not in str(e) and "422" not in str(e):
                raise
            data = self._post({**body, "max_tokens": 1})
        logprobs = data["choices"][0].get("logprobs") or {}
        values = logprobs.get("token_logprobs")
        if not values or len(values) < len(token_ids):
            raise PolycoderError(f"{self._completions} did not echo log-probabilities of the prompt "
                                 "(it needs `echo` + `logprobs` support)")
        return [float(v) for v in values[1: len(token_ids)]]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
