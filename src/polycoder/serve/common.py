"""What both APIs share: the server's state, its settings, request errors and body checks.

Request bodies are checked by hand rather than by pydantic models so that every refusal
names the field, what was wrong and what is allowed, in one sentence, and comes back as
a 400 in the format of the API that was called (OpenAI's `{"error": {...}}` or Ollama's
`{"error": "..."}`) instead of FastAPI's 422 list of locations.

What no request may do to the others (each case has a test in tests/test_serve_hostile.py):
- a body over `max_request_bytes` is refused with a 413 before it is read in full;
- malformed JSON (invalid syntax, nesting too deep for the parser, integers over Python's
  digit limit, strings with lone UTF-16 surrogates) is a 400, never a 500;
- every number that reaches the engine is checked against its range here (`top_k`, `seed`,
  `n`, token ids, ...), so that nothing can overflow inside the engine's batch;
- a prompt that cannot fit the context is refused from its length in characters before
  it is tokenized (`Tokenizer.min_tokens`), and long prompts are tokenized off the event
  loop, so a huge prompt never stalls the other clients.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from polycoder.errors import PolycoderError
from polycoder.fim import ORDERS, encode_around_cursor, fit
from polycoder.generation.penalties import Penalties
from polycoder.generation.sampling import MAX_TOP_K
from polycoder.model import GPTNeoX
from polycoder.serve.engine_loop import EngineLoop
from polycoder.serve.metrics import Metrics
from polycoder.tokenizer import Tokenizer

SUFFIX_FALLBACKS = ("off", "prefix-only")


@dataclass
class ServerSettings:
    """How the server runs (the `polycoder serve` options, less those that pick the model)."""

    model_name: str = "polycoder"
    """The id clients name the model by (`model` field; Ollama's `name:latest` also matches)."""
    max_batch_size: int = 32
    """Rows of the running batch (samples decoded together at each step)."""
    max_queue: int = 128
    """Requests that may wait for rows; past this the server answers 429."""
    max_context: int | None = None
    """Tokens per row of the KV cache (prompt + completion); None: the model's context."""
    prefill_budget: int = 512
    """Prompt tokens prefilled between two decode steps (at least one prompt joins each step)."""
    speculate: int = 0
    """Prompt-lookup draft tokens a row verifies a step (`polycoder.generation.speculative`; 0: off)."""
    max_n: int = 128
    """Most samples (`n`) one request may ask for per prompt."""
    max_prompts: int = 64
    """Most prompts in one request (a list prompt)."""
    max_request_bytes: int = 2 << 20
    """Largest request body; a larger one is answered 413 before it is read in full."""
    api_key: str | None = None
    """If set, every model route needs `Authorization: Bearer <api_key>`."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed by CORS (empty: no CORS headers at all)."""
    fim_order: str = "spm"
    """How an at-cursor prompt lays out prefix and suffix (`polycoder.fim`): "spm" puts the
    prefix last, so a prompt cache keeps all but its end while the user types; "psm"."""
    suffix_fallback: str = "off"
    """A model without FIM tokens given a suffix: "off" refuses it (each API's error),
    "prefix-only" completes the prefix alone and says the suffix was ignored."""
    stop_at_suffix: bool = True
    """End at-cursor completions where the suffix says (`polycoder.generation.suffix_stop`);
    a request may say otherwise (`stop_at_suffix`)."""

    def __post_init__(self) -> None:
        self.cors_origins = tuple(self.cors_origins or ())
        if not self.model_name:
            raise PolycoderError("the model name must not be empty")
        for name in ("max_batch_size", "max_queue", "max_n", "max_prompts", "prefill_budget", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise PolycoderError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise PolycoderError(f"max_context must be at least 2 tokens, got {self.max_context}")
        if self.fim_order not in ORDERS:
            raise PolycoderError(f"fim_order must be one of {', '.join(ORDERS)}, got {self.fim_order!r}")
        if self.suffix_fallback not in SUFFIX_FALLBACKS:
            raise PolycoderError(f"suffix_fallback must be one of {', '.join(SUFFIX_FALLBACKS)}, "
                                 f"got {self.suffix_fallback!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise PolycoderError("the API key must not be empty or blank")


@dataclass
class ServerState:
    """The model, its engine thread and the settings: one per app."""

    model: GPTNeoX
    tokenizer: Tokenizer
    settings: ServerSettings
    engine: EngineLoop
    metrics: Metrics
    context: int
    """Tokens a row holds: prompt + max_tokens must fit in it."""
    model_path: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def matches(self, name: str) -> bool:
        """Whether a request's `model` names the served model."""
        return name in (self.settings.model_name, f"{self.settings.model_name}:latest")


@dataclass
class ServedModels:
    """The models one server serves, by name; a request's `model` field picks one.

    The first is the default (a request that names no model gets it). Each has its own
    engine thread, KV cache and weights (a LoRA adapter is served merged into a copy of its
    base), so memory grows by a whole model and a cache per model served.
    """

    states: list[ServerState]

    def __post_init__(self) -> None:
        if not self.states:
            raise ValueError("a server needs at least one model")

    @property
    def default(self) -> ServerState:
        return self.states[0]

    @property
    def names(self) -> list[str]:
        return [s.settings.model_name for s in self.states]

    def pick(self, name: Any, api: str) -> ServerState:
        """The model a request's `model` names (a missing one means the default), else a 404."""
        if name is None:
            return self.default
        if not isinstance(name, str):
            raise APIError(400, "model must be a string", param="model")
        for state in self.states:
            if state.matches(name):
                return state
        served = ", ".join(repr(n) for n in self.names)
        raise APIError(404, f"model {name!r} not found; this server serves {served}"
                       f" (see {'/v1/models' if api == 'openai' else '/api/tags'})",
                       param="model", code="model_not_found")


class APIError(Exception):
    """A request the server refuses, rendered in the format of the API that was called."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


# ---- body checks ---------------------------------------------------------------------------------

_MISSING = object()


MAX_STOP_CHARS = 1024
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_json(request: Request, state: ServerState) -> dict[str, Any]:
    """The body as a JSON object, at most the server's --max-request-bytes; any malformed body
    is a 400, a larger one a 413."""
    limit = state.settings.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it comes: a body without a length cannot grow past the limit
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8; send a JSON object in UTF-8") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply to parse; send a flat JSON object") from None
    except ValueError as e:  # json.JSONDecodeError, and integers over Python's digit limit
        raise APIError(400, f"the request body is not valid JSON ({str(e)[:200]}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    bad = _lone_surrogate(body)
    if bad is not None:
        raise APIError(400, f"{bad} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is "
                       "not a character; send valid Unicode", param=bad)
    return body


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-request-bytes); "
                    "send a shorter prompt", code="request_too_large")


def _lone_surrogate(body: dict) -> str | None:
    """The name of the first field (top-level name) whose strings hold a lone surrogate, or None."""
    for name, value in body.items():
        stack = [name, value]
        while stack:  # iterative: the parser already bounded the depth, this walk needs no recursion
            v = stack.pop()
            if isinstance(v, str):
                if _SURROGATE.search(v):
                    return str(name) if not _SURROGATE.search(str(name)) else "a field name"
            elif isinstance(v, dict):
                stack.extend(v.keys())
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
    return None


def get_int(body: dict, name: str, default: Any, lo: int | None = None, hi: int | None = None) -> Any:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{name} must be an integer, got {json.dumps(v)[:80]}", param=name)
    if lo is not None and v < lo:
        raise APIError(400, f"{name} must be at least {lo}, got {v}", param=name)
    if hi is not None and v > hi:
        raise APIError(400, f"{name} must be at most {hi}, got {v}", param=name)
    return v


def get_float(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"{name} must be a number, got {json.dumps(v)[:80]}", param=name)
    if v < lo or v > hi or (lo_open and v == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise APIError(400, f"{name} must be in {interval}, got {v}", param=name)
    return float(v)


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"{name} must be true or false, got {json.dumps(v)[:80]}", param=name)
    return v


def get_stop(body: dict, name: str = "stop", most: int = 16) -> tuple[str, ...]:
    v = body.get(name)
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise APIError(400, f"{name} must be a string or a list of strings", param=name)
    if len(v) > most:
        raise APIError(400, f"{name} may hold at most {most} strings, got {len(v)}", param=name)
    if any(len(s) > MAX_STOP_CHARS for s in v):
        raise APIError(400, f"each {name} string may be at most {MAX_STOP_CHARS} characters long", param=name)
    return tuple(s for s in v if s)


def get_top_k(body: dict, default: int) -> int:
    """top_k: 0 (or -1, vLLM's spelling) means no limit; any k above the vocabulary is the same as none."""
    return max(get_int(body, "top_k", default, -1, MAX_TOP_K), 0)


def get_penalties(body: dict, count_prompt: bool, repeat: bool = True) -> Penalties:
    """Repetition penalties (`polycoder.generation.penalties`), off unless asked: presence_penalty
    and frequency_penalty (OpenAI's range, [-2, 2]) and, where `repeat`, llama.cpp's and
    Ollama's repeat_penalty and repeat_last_n (default 64; -1: every token; 0: off). Without
    `repeat` (OpenAI) the window is the whole output."""
    return Penalties(
        repeat=get_float(body, "repeat_penalty", 1.0, 0.0, 10.0, lo_open=True) if repeat else 1.0,
        presence=get_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency=get_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        last_n=get_int(body, "repeat_last_n", 64, -1, 2**31) if repeat else -1,
        count_prompt=count_prompt,
    )


def get_seed(body: dict) -> int | None:
    """A seed of any 64-bit value, signed or not (clients differ); None draws a fresh one."""
    return get_int(body, "seed", None, -(2**63), 2**64 - 1)


PROMPT_CUT = "the prompt did not fit the context: its start was left out"
"""Why a prompt was cut (`cut_prompt_ids`): the X-Polycoder-Truncated header's words."""
OFF_LOOP_CHARS = 8192
"""Prompts longer than this are tokenized in a worker thread, not on the event loop."""


async def prompt_ids(state: ServerState, prompt: str | list[int], max_tokens: int, prefix: list[int] = ()) -> list[int]:
    """Token ids of `prefix` + a prompt that, with max_tokens, fits a row (else a 400 naming the sizes).

    A text prompt is first bounded from its length (`Tokenizer.min_tokens`): one that cannot
    fit is refused before tokenizing, and a long one is tokenized in a worker thread.
    """
    C = state.context
    if max_tokens >= C:
        raise APIError(400, f"max_tokens {max_tokens} leaves no room for a prompt: this server's context is {C} "
                       "tokens (prompt + max_tokens); lower max_tokens", param="max_tokens",
                       code="context_length_exceeded")
    if isinstance(prompt, list):
        check_ids(state, prompt, "prompt")
        ids = list(prefix) + list(prompt)
    else:
        least = len(prefix) + state.tokenizer.min_tokens(prompt)
        if least + max_tokens > C:
            raise APIError(400, f"this server's context is {C} tokens, but the prompt has at least {least} tokens "
                           f"({len(prompt)} characters) and max_tokens asks for {max_tokens} more; shorten the prompt "
                           "or lower max_tokens", param="prompt", code="context_length_exceeded")
        # An editor that templates fill-in-the-middle itself spells the sentinels out.
        encode = state.tokenizer.encode_with_sentinels
        if len(prompt) > OFF_LOOP_CHARS:
            ids = list(prefix) + await asyncio.to_thread(encode, prompt)
        else:
            ids = list(prefix) + encode(prompt)
    if not ids:
        ids = [state.tokenizer.eod_id]  # an empty prompt starts a new document
    check_fits(state, ids, max_tokens)
    return ids


async def cut_prompt_ids(state: ServerState, prompt: str, context: list[int], num_predict: int,
                         limit_name: str) -> tuple[list[int], bool]:
    """The ids of `context` + `prompt` (Ollama's `context`, or llama.cpp's prompt given as
    ids), their start left out where they do not fit with num_predict new tokens (which the
    API calls `limit_name`; a quarter of the context where num_predict < 0), as Ollama and
    llama.cpp cut a long prompt; and whether anything was left out. The prompt is tokenized
    only as far back as can reach the prompt (`encode_around_cursor`); the cut moves in
    steps (`fit`), so a client that resends its growing text still finds it in the prompt
    cache."""
    C = state.context
    if num_predict >= C:
        raise APIError(400, f"{limit_name} {num_predict} leaves no room for a prompt: this server's context is {C} "
                       f"tokens (prompt + {limit_name}); lower {limit_name}", param=limit_name,
                       code="context_length_exceeded")
    room = C - (num_predict if num_predict >= 0 else C // 4)
    tok = state.tokenizer
    args = (tok.encode_with_sentinels, prompt, "", room, tok.max_token_bytes)  # an editor's template spells them out
    encoded, _, cut_text = (await asyncio.to_thread(encode_around_cursor, *args) if len(prompt) > OFF_LOOP_CHARS
                            else encode_around_cursor(*args))
    ids = list(context) + encoded or [tok.eod_id]  # an empty prompt starts a new document
    if len(ids) + max(num_predict, 1) <= C and not cut_text:
        return ids, False
    if sentinel_stops(state, [encoded]):
        raise APIError(400, f"this server's context is {C} tokens, and this prompt spells out fill-in-the-middle "
                       f"sentinels, so it is not cut to fit: send the code before the cursor as `prompt` and the "
                       "code after it as `suffix`, which the server cuts to fit", param="prompt",
                       code="context_length_exceeded")
    return fit(ids, [], room)[0], True


def sentinel_stops(state: ServerState, prompts: list[list[int]]) -> tuple[int, ...]:
    """The FIM sentinels' ids where a prompt holds one (an editor's own FIM template): the
    middle ends at a sentinel as at the end of the document, as with `suffix`; else ()."""
    fim = state.tokenizer.fim
    if fim is None:
        return ()
    sentinels = frozenset(fim.all)
    return fim.all if any(not sentinels.isdisjoint(ids) for ids in prompts) else ()


def check_ids(state: ServerState, ids: list[int], param: str) -> None:
    """Token ids must lie in the tokenizer's vocabulary (a 400 naming the first that does not)."""
    bad = [t for t in ids if not 0 <= t < state.tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is out of the vocabulary [0, {state.tokenizer.vocab_size})", param=param)


def check_fits(state: ServerState, ids: list[int], max_tokens: int) -> None:
    """Prompt ids and max_tokens must fit a row of the context (a 400 naming the sizes)."""
    C = state.context
    if len(ids) + max_tokens > C:
        raise APIError(400, f"this server's context is {C} tokens, but the prompt has {len(ids)} tokens and "
                       f"max_tokens asks for {max_tokens} more; shorten the prompt or lower max_tokens",
                       param="prompt", code="context_length_exceeded")
