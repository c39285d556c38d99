"""A client for OpenAI-compatible `/v1/completions` endpoints (ours, llama.cpp's server, vLLM),
Ollama's `/api/generate`, and llama.cpp's own `/infill` and `/completion`.

What it implements: the two calls the evaluations need, over httpx:
- `complete`: ordinary sampling (n samples, temperature, top_p, max_tokens, stop), for
  HumanEval; with a `suffix`, fill-in-the-middle at the cursor between the prompt and the
  suffix, for `eval infilling`: OpenAI's `{prompt, suffix}`, Ollama's `{prompt, suffix}`
  (the model's template lays them out; without a suffix the prompt goes `raw`, continued
  as it is, not wrapped in a chat template). Ollama answers one sample a request, so n
  samples are n requests (seeds seed, seed + 1, ...). llama.cpp's API (`api="llamacpp"`) sends
  a suffix as its `/infill` does (`input_prefix`, `input_suffix`: what llama.vscode and
  llama.vim send; the server lays out the cursor with the model's FIM token ids) and a plain
  prompt to `/completion`, one sample a request as well; its sampling is set to the plain
  temperature and top_p asked (llama.cpp's default top_k 40 and min_p 0.05 off);
- `score`: the log-probability of every token of a prompt given as token ids, by the
  OpenAI `echo=True, logprobs=1, max_tokens=0` idiom, for perplexity. Prompts go as token
  ids so the windows are exactly those a local model would see (the server must use the
  same tokenizer; say which with `--tokenizer`).

References: OpenAI's legacy Completions API (`prompt` may be a list of token ids, `suffix`
the text after the insertion; `logprobs.token_logprobs[0]` is null because the first token
has no context); vLLM and llama.cpp implement the same fields; Ollama's API (`/api/generate`
with `suffix`, `raw`, `options`: temperature, top_p, num_predict, stop, seed; `/api/tags`);
llama.cpp's server README (`/infill`, `/completion`: `n_predict`, `stop`, `seed`, `samplers`,
`cache_prompt`; the answer's `content` and `stop_type`; `/props` for the context `n_ctx`).

A request the server refuses (a 4xx: a prompt too long for its context, say; llama.cpp's 501
on /infill for a model without FIM tokens) raises `Refused`, so a caller can record that one
sample as failed and go on; an unreachable server or a 5xx raises PolycoderError, which ends
the run. `complete` fits `max_tokens` to the server's context: it lowers it (halving, down to
1) while the server answers that the request does not fit, and `context_length` reads the
context a server reports on `/v1/models` (ours and vLLM: `max_model_len`). The client may be
used from several threads.

Limits: `score` is OpenAI-only (Ollama and llama.cpp's own routes have no prompt log-probabilities); a server
without fill-in-the-middle refuses a suffix (Ollama: "does not support insert"), which is
a `Refused` like any 4xx; servers that reject `max_tokens=0` are retried with `max_tokens=1` and the extra
generated token is dropped; OpenAI's own API caps `stop` at 4 strings, so stop strings are
also applied client-side (`cut_at_stop`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Literal, get_args

from polycoder.errors import PolycoderError


class Refused(PolycoderError):
    """The server answered a request with a 4xx: this request cannot be served as asked."""

    def __init__(self, message: str, status: int, body: str):
        super().__init__(message)
        self.status, self.body = status, body

    @property
    def context_too_small(self) -> bool:
        """Whether the server said that prompt + max_tokens exceed its context."""
        text = self.body.lower()
        return "context" in text or "max_tokens" in text or "maximum" in text


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


Api = Literal["openai", "ollama", "llamacpp"]
APIS = get_args(Api)

# llama.cpp's stop_type, as an OpenAI finish_reason
_LLAMACPP_FINISH = {"limit": "length", "eos": "stop", "word": "stop", "none": "stop"}


@dataclass
class Endpoint:
    """An OpenAI-compatible completions endpoint, an Ollama server, or llama.cpp's own server."""

    url: str
    """Base URL, e.g. http://127.0.0.1:8000 or http://127.0.0.1:8000/v1 (Ollama: http://127.0.0.1:11434)."""
    model: str | None = None
    """The `model` field of requests (some servers need it, Ollama always; ours and llama.cpp ignore it)."""
    api_key: str | None = None
    """Bearer token; default: the OPENAI_API_KEY environment variable, if set."""
    timeout: float = 600.0
    """Seconds to wait for one response."""
    api: Api = "openai"
    """Which API the server speaks: OpenAI's /v1/completions, Ollama's /api/generate, or llama.cpp's
    /infill and /completion."""

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise PolycoderError(f"endpoint must be an http(s) URL, got {self.url!r}")
        if self.api not in APIS:
            raise PolycoderError(f"endpoint API must be one of {', '.join(APIS)}, got {self.api!r}")
        base = self.url.rstrip("/")
        self._infill = None
        if self.api == "llamacpp":
            for tail in ("/infill", "/completion", "/v1"):
                base = base[: -len(tail)] if base.endswith(tail) else base
            self._completions, self._infill, self._models = base + "/completion", base + "/infill", base + "/v1/models"
            self._props = base + "/props"
        elif self.api == "ollama":
            for tail in ("/api/generate", "/api"):
                base = base[: -len(tail)] if base.endswith(tail) else base
            if self.model is None:
                raise PolycoderError("an Ollama server needs the model's name: give --endpoint-model NAME")
            self._completions, self._models = base + "/api/generate", base + "/api/tags"
        else:
            if base.endswith("/completions"):
                base = base[: -len("/completions")]
            if not base.endswith("/v1"):
                base += "/v1"
            self._completions, self._models = base + "/completions", base + "/models"
        if self.api_key is None:
            self.api_key = os.environ.get("OPENAI_API_KEY")
        self._client = None
        self._context: int | None = None
        self._context_asked = False
        self._lock = threading.Lock()
        self._context_lock = threading.Lock()

    def _http(self):
        # Deferred: the eval extra's HTTP client, for endpoints only
        import httpx

        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                self._client = httpx.Client(timeout=self.timeout, headers=headers,
                                            limits=httpx.Limits(max_connections=64))
        return self._client, httpx.HTTPError

    def _post(self, body: dict, url: str | None = None) -> dict:
        client, http_error = self._http()
        url = url or self._completions
        if self.model is not None:
            body = {"model": self.model, **body}
        try:
            response = client.post(url, json=body)
        except http_error as e:
            raise PolycoderError(f"cannot reach {url}: {e}; is the server running?") from None
        # llama.cpp's 501 on /infill: this model has no FIM tokens (Ollama says so with a 400)
        refused = (400 <= response.status_code < 500 and response.status_code not in (401, 403, 404, 429)
                   or response.status_code == 501 and url == self._infill)
        if refused:
            raise Refused(f"{url} answered {response.status_code}: {response.text[:300]}",
                          response.status_code, response.text)
        if response.status_code != 200:
            raise PolycoderError(f"{url} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def context_length(self) -> int | None:
        """The context (prompt + completion tokens) the server reports for its model, if any
        (asked once; threads that call meanwhile wait for that answer)."""
        with self._context_lock:
            if not self._context_asked:
                self._context, self._context_asked = self._ask_context(), True
            return self._context

    def _ask_context(self) -> int | None:
        if self.api == "ollama":
            return None  # /api/tags does not say; Ollama fits the prompt itself
        client, http_error = self._http()
        if self.api == "llamacpp":  # the context of a slot (/v1/models gives the training context)
            try:
                props = client.get(self._props).json()
                n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx", props.get("n_ctx"))
                if isinstance(n_ctx, int):
                    return n_ctx
            except (http_error, ValueError, AttributeError):
                pass
        try:
            models = client.get(self._models).json().get("data") or []
        except (http_error, ValueError, AttributeError):
            return None
        for m in models:
            if self.model is None or m.get("id") == self.model:
                for key in ("max_model_len", "context_length"):
                    if isinstance(m.get(key), int):
                        return m[key]
        return None

    def served_models(self) -> list[str]:
        """The model ids the server's /v1/models lists (none if it has no such route): part of
        what identifies the model behind a URL for the caches of the evaluations."""
        client, http_error = self._http()
        field, name = ("models", "name") if self.api == "ollama" else ("data", "id")
        try:
            models = client.get(self._models).json().get(field) or []
            return [str(m[name]) for m in models if isinstance(m, dict) and name in m]
        except (http_error, ValueError, AttributeError):
            return []

    def complete(self, prompt: str, n: int, temperature: float, top_p: float, max_tokens: int,
                 stop: tuple[str, ...] = (), seed: int | None = None, suffix: str | None = None) -> list[tuple[str, str]]:
        """`n` completions of `prompt`: (text cut at the stop strings, finish_reason); with a
        `suffix`, `n` middles between the two. While an OpenAI-compatible server answers that
        prompt + max_tokens exceed its context, max_tokens is halved."""
        if self.api in ("ollama", "llamacpp"):  # one sample a request, seeds seed, seed + 1, ...
            one = self._ollama if self.api == "ollama" else self._llamacpp
            return [one(prompt, suffix, temperature, top_p, max_tokens, stop, None if seed is None else seed + j)
                    for j in range(n)]
        body = {"prompt": prompt, "n": n, "temperature": temperature, "top_p": top_p,
                "max_tokens": self._within_context(max_tokens), "stop": list(stop)[:4] if stop else None}
        if suffix is not None:
            body["suffix"] = suffix
        if seed is not None:
            body["seed"] = seed
        data = self._post_fitting(body, "max_tokens")
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise PolycoderError(f"{self._completions} returned {len(choices)} choices, asked for {n}")
        return [(cut_at_stop(c["text"], stop), c.get("finish_reason") or "") for c in choices]

    def _within_context(self, max_tokens: int) -> int:
        """`max_tokens` lowered to what the server's context leaves a prompt of one token."""
        context = self.context_length()
        return max(1, min(max_tokens, context - 1)) if context else max_tokens

    def _post_fitting(self, body: dict, field: str, url: str | None = None) -> dict:
        """`_post(body)`, halving `body[field]` (the tokens to generate) while the server answers
        that the prompt and that many tokens exceed its context."""
        while True:
            try:
                return self._post(body, url)
            except Refused as e:
                if not e.context_too_small or body[field] <= 1:
                    raise
                body[field] //= 2

    def _ollama(self, prompt: str, suffix: str | None, temperature: float, top_p: float, max_tokens: int,
                stop: tuple[str, ...], seed: int | None) -> tuple[str, str]:
        """One sample from Ollama's /api/generate (not streamed)."""
        options = {"temperature": temperature, "top_p": top_p, "num_predict": max_tokens}
        if stop:
            options["stop"] = list(stop)
        if seed is not None:
            options["seed"] = seed
        # raw: the prompt continued as it is; with a suffix the model's template must lay out
        # the prefix and suffix (its FIM format), so raw is off.
        body = {"prompt": prompt, "stream": False, "raw": suffix is None, "options": options}
        if suffix is not None:
            body["suffix"] = suffix
        data = self._post(body)
        return cut_at_stop(str(data.get("response", "")), stop), str(data.get("done_reason") or "")

    def _llamacpp(self, prompt: str, suffix: str | None, temperature: float, top_p: float, max_tokens: int,
                  stop: tuple[str, ...], seed: int | None) -> tuple[str, str]:
        """One sample from llama.cpp's /infill (with a suffix) or /completion (not streamed)."""
        body = {"n_predict": self._within_context(max_tokens), "temperature": temperature, "top_p": top_p,
                "top_k": 0, "min_p": 0.0, "stop": list(stop), "cache_prompt": True}
        if seed is not None:
            body["seed"] = seed
        if suffix is None:
            body["prompt"], url = prompt, self._completions
        else:  # as llama.vscode sends the cursor: the text before it and after it
            body["input_prefix"], body["input_suffix"], url = prompt, suffix, self._infill
        data = self._post_fitting(body, "n_predict", url)
        reason = _LLAMACPP_FINISH.get(str(data.get("stop_type")), str(data.get("stop_type") or ""))
        return cut_at_stop(str(data.get("content", "")), stop), reason

    def score(self, token_ids: list[int]) -> list[float]:
        """Natural-log probabilities of token_ids[1:], each given the tokens before it."""
        if self.api in ("ollama", "llamacpp"):
            server = "Ollama" if self.api == "ollama" else "llama.cpp's /completion"
            raise PolycoderError(f"{server} gives no log-probabilities of a prompt: score through an "
                                 "OpenAI-compatible endpoint (llama.cpp's /v1, vLLM, `polycoder serve`)")
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
