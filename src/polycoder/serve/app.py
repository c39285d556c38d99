"""`polycoder serve`: an OpenAI- and Ollama-compatible code completion server.

One process, one engine thread a served model doing continuous batching
(`polycoder.serve.engine_loop`), FastAPI + uvicorn in front of it. Besides `--model`, the
server may serve LoRA adapters over it (`--adapter NAME=FOLDER`, repeatable); a request's
`model` field picks one (no `model`: the base). Each adapter is merged into its own copy
of the base and gets its own engine and KV cache: memory grows by a whole model and a
cache per adapter (simple; the engines share the CPU's cores, each with PyTorch's thread
count, so requests to several models at once compete for them; a shared base that applies
each row's adapter at run time, as vLLM does, would save the memory and the contention):

    GET  /                  playground: a small code editor completing at the caret (see playground)
    GET  /health            {"status": "ok", ...} while the engine runs (503 otherwise)
    GET  /metrics           Prometheus text format
    GET  /v1/models         POST /v1/completions          (OpenAI, see openai_api)
    POST /api/generate      GET /api/tags  POST /api/show  GET /api/version  (Ollama, see ollama_api)
    POST /infill            POST /completion  (llama.cpp's: llama.vscode, llama.vim, Tabby; see llamacpp_api)

At the cursor: `suffix` on /v1/completions and /api/generate, and /infill, fill in the
middle on a model with FIM tokens (`polycoder finetune --fim`); the prompt is laid out by
`--fim-order` (SPM by default, the prefix last), ends on EOD or any FIM sentinel and, by
default, where the code after the cursor starts (`--stop-at-suffix`; the rule is in
polycoder.generation.suffix_stop). A model without FIM tokens refuses a suffix as each API
does, unless `--suffix-fallback prefix-only` (see at_cursor).

Bound to 127.0.0.1 unless told otherwise. With an API key (`--api-key`, or the
POLYCODER_API_KEY environment variable so it stays out of `ps`), every model route needs
`Authorization: Bearer KEY`; /health, /metrics, /api/version and the page itself stay
open (the page asks for the key). CORS headers are sent only for `--cors-origin`s.
Every response carries an `X-Request-ID` (the client's, if it sent a sane one) and the
log line of each request names it.

Scaling out: run more replicas behind any HTTP balancer; each holds its own model.

The verb's module: the engine, the APIs and the loader (torch and our modules that import
it) are imported inside `create_app` and `serve`, so that `polycoder serve --help` reads
the options without importing torch (about 2 s); tests/test_structure.py allows this for
the verb modules only.
"""

import hmac
import logging
import os
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from polycoder.config import PRESETS
from polycoder.errors import PolycoderError
from polycoder.locate import display_name, is_adapter, resolve
from polycoder.options import ModelOptions
from polycoder.serve.metrics import Metrics

if TYPE_CHECKING:
    from polycoder.serve.common import ServerSettings, ServerState

log = logging.getLogger("polycoder.serve")
PROMPT_CACHE_MB = 1024
"""Default prompt cache a served model: 1 GiB holds about 14,000 tokens of PolyCoder-160M in fp32
(72 KiB a token), 3,200 of PolyCoder-2.7B in fp16 (320 KiB a token): an editor's file and a few more."""
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContext:
    """ASGI middleware: a request id per request, one log line and metrics per response.

    Written as plain ASGI (not BaseHTTPMiddleware) so that streaming responses and their
    disconnect detection pass through untouched.
    """

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = sent if _RID.match(sent) else uuid.uuid4().hex[:16]
        scope["request_id"] = rid
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = _route(scope["path"])
            dt = time.perf_counter() - t0
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.request_seconds.labels(route).observe(dt)
            log.info("[%s] %s %s %d %.3fs", rid, scope["method"], scope["path"], status["code"], dt)


def _route(path: str) -> str:
    """Metric label of a path (known routes only, so labels stay few)."""
    known = ("/v1/completions", "/v1/models", "/infill", "/completion", "/completions", "/api/generate", "/api/tags",
             "/api/show", "/api/version", "/api/ps", "/health", "/metrics", "/", "/playground/editor.js",
             "/playground/highlight")
    return path if path in known else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")


def _served(model, tokenizer, settings: "ServerSettings", model_path: str, metrics: Metrics,
            draft_model=None, prompt_cache_mb: float = 0) -> "ServerState":
    """One served model: its engine thread (not started) and state."""
    from polycoder.serve.common import ServerState
    from polycoder.serve.engine_loop import EngineLoop

    context = min(settings.max_context or model.config.block_size, model.config.block_size)
    engine = EngineLoop(model, tokenizer, max_rows=settings.max_batch_size, max_len=context,
                        max_queue=settings.max_queue, metrics=metrics, prefill_budget=settings.prefill_budget,
                        speculate=settings.speculate, draft_model=draft_model, prompt_cache_mb=prompt_cache_mb)
    return ServerState(model, tokenizer, settings, engine, metrics, context, model_path)


def create_app(model, tokenizer, settings=None, model_path: str = "", more: list[tuple] = (), draft_model=None,
               prompt_cache_mb: float = PROMPT_CACHE_MB):
    """The FastAPI app serving `model` (and `more`: (name, model, tokenizer, path) tuples, each
    served under its name); the engine threads run while the app's lifespan does.
    `prompt_cache_mb`: each served model's prompt cache (`serve --prompt-cache-mb`).

    Limit: the models share one metrics registry, so the queue-depth and active-row gauges
    show whichever engine stepped last; the counters and histograms add up all of them."""
    from polycoder.serve import llamacpp_api, ollama_api, openai_api, playground
    from polycoder.serve.common import APIError, ServedModels, ServerSettings

    settings = settings or ServerSettings()
    metrics = Metrics()
    served = ServedModels([_served(model, tokenizer, settings, model_path, metrics, draft_model, prompt_cache_mb)]
                          + [_served(m, t, replace(settings, model_name=n), p, metrics, draft_model, prompt_cache_mb)
                             for n, m, t, p in more])
    state = served.default
    engine, context = state.engine, state.context

    @asynccontextmanager
    async def lifespan(app):
        for s in served.states:
            s.engine.start()
            log.info("serving %s (context %d, batch %d, queue %d, KV cache %.2f GiB)", s.settings.model_name,
                     s.context, settings.max_batch_size, settings.max_queue, s.engine.engine.cache.nbytes() / 2**30)
        yield
        for s in served.states:
            s.engine.stop()

    app = FastAPI(title="polycoder", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.polycoder = state

    async def auth(request: Request) -> None:
        key = settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def render(request: Request, e: APIError) -> JSONResponse:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        if request.url.path in ("/infill", "/completion", "/completions"):  # llama.cpp's error object
            return JSONResponse({"error": {"code": e.status, "message": e.message, "type": e.kind}},
                                status_code=e.status, headers=e.headers)
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                            status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        if e.status >= 500:
            log.error("[%s] %s", request.scope.get("request_id"), e.message)
        return render(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return render(request, APIError(e.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return render(request, APIError(400, f"invalid request: {e.errors()}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("[%s] internal error", request.scope.get("request_id"))
        return render(request, APIError(500, f"internal error: {type(e).__name__}", kind="server_error"))

    @app.get("/health")
    async def health():
        ok = all(s.engine.running for s in served.states)
        body = {"status": "ok" if ok else "unavailable", "model": settings.model_name, "models": served.names,
                "queue_depth": engine.queue_depth, "active_rows": engine.active_rows,
                "max_batch_size": settings.max_batch_size, "context": context}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    app.include_router(playground.router(state, auth))
    app.include_router(openai_api.router(served, auth))
    app.include_router(ollama_api.router(served, auth))
    app.include_router(llamacpp_api.router(served, auth))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID"])
    app.add_middleware(RequestContext, metrics=metrics)
    return app


def serve(
    model_options: ModelOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 32,
    max_queue: int = 128,
    max_context: int | None = None,
    prefill_budget: int = 512,
    speculate: int = 0,
    draft_model: str | None = None,
    prompt_cache_mb: float = PROMPT_CACHE_MB,
    model_name: str | None = None,
    adapter: list[str] | None = None,
    cors_origin: list[str] | None = None,
    max_request_bytes: int = 2 << 20,
    fim_order: Literal["spm", "psm"] = "spm",
    stop_at_suffix: bool = True,
    suffix_fallback: Literal["off", "prefix-only"] = "off",
    log_level: str = "info",
) -> None:
    """Serve a model over HTTP: OpenAI- and Ollama-compatible completions with continuous batching.

    Args:
        model_options: the model and how to load it (--model, --dtype, --device, ...).
        host: address to bind; the default serves this machine only (use 0.0.0.0 to open it to the network).
        port: TCP port.
        api_key: require 'Authorization: Bearer KEY' on model routes (default: $POLYCODER_API_KEY, else none).
        max_batch_size: rows decoded together (samples in the running batch).
        max_queue: requests that may wait for a row; more are answered 429.
        max_context: tokens a row holds (prompt + completion); default the model's context. Lower it to save memory.
        prefill_budget: prompt tokens prefilled between two decode steps (lower: smoother streams; higher: faster admission).
        speculate: guess up to N tokens a row from its prompt and text (prompt lookup) and verify them in
            the decode step's forward pass: the same completions (greedy, or sampled with a seed) in fewer steps
            where text repeats its context (0: off); fewer drafts a row in a larger batch
            (polycoder_speculative_* metrics count them).
        draft_model: with --speculate, guess with this small model of the same tokenizer instead of prompt lookup
            (one copy, shared by the served models' engines).
        prompt_cache_mb: megabytes of recent prompts' keys and values kept so that a prompt sharing a
            prefix with one of them (an editor's next keystroke) prefills only the rest (0: off; least
            recently used evicted; on the model's device, for each served model; a draft model's share
            included; polycoder_prompt_cache_* metrics).
        model_name: the model id clients use (default: the last part of --model: a folder's or hub id's name).
        adapter: also serve a LoRA adapter over --model as NAME=FOLDER (or FOLDER, named after it; repeatable);
            a request's model field picks it. Each is merged into its own copy of the model: memory grows by
            one model and one KV cache per adapter.
        cors_origin: allow browser pages from this origin (repeatable; default: no CORS).
        max_request_bytes: largest request body in bytes; larger ones get a 413 before they are read.
        fim_order: how at-cursor prompts (suffix, /infill) lay out prefix and suffix: spm puts the prefix last,
            so the rest of the prompt stays the same while the user types; psm.
        stop_at_suffix: end at-cursor completions where the code around the cursor says: mid-line, at the line's end
            less what repeats the rest of the line; at the start of a line of code, before that code; on a line
            of its own, before the code below; and a line written three times in a row after its first copy (a request's
            stop_at_suffix overrides).
        suffix_fallback: a model without FIM tokens given a suffix: off refuses it (as Ollama and llama.cpp do);
            prefix-only completes the prefix alone and says the suffix was ignored.
        log_level: debug, info, warning or error.
    """
    from polycoder.checkpoint import load, load_model
    from polycoder.serve.common import ServerSettings

    options = model_options or ModelOptions()
    if log_level not in ("debug", "info", "warning", "error"):
        raise PolycoderError(f"unknown log level {log_level!r}; choose debug, info, warning or error")
    if not 0 <= port < 65536:
        raise PolycoderError(f"port must be in 0..65535, got {port}")
    if prompt_cache_mb < 0:
        raise PolycoderError(f"--prompt-cache-mb must be >= 0 (0: off), got {prompt_cache_mb}")
    api_key = api_key if api_key is not None else (os.environ.get("POLYCODER_API_KEY") or None)
    if options.random_init and options.model is not None and str(options.model) in PRESETS:
        path, name = str(options.model), str(options.model)
    else:
        path, name = str(resolve(options.model)), display_name(options.model)
        options = replace(options, model=path)  # a hub id is fetched once, here
    settings = ServerSettings(model_name=model_name or name, max_batch_size=max_batch_size, max_queue=max_queue,
                              max_context=max_context, prefill_budget=prefill_budget, speculate=speculate, api_key=api_key,
                              cors_origins=tuple(cors_origin or ()), max_request_bytes=max_request_bytes,
                              fim_order=fim_order, stop_at_suffix=stop_at_suffix, suffix_fallback=suffix_fallback)
    adapters = _adapters(adapter or [], settings.model_name, options)  # checked before any model is loaded
    if draft_model is not None:
        resolve(draft_model)  # checked before any model is loaded, too
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    net, tok = load(options)
    more = []
    for name, folder in adapters:
        m, t = load_model(**asdict(replace(options, model=str(folder))), base=path)
        more.append((name, m, t, str(folder)))
    draft = None
    if draft_model is not None:
        draft, _ = load(replace(options, model=draft_model, quantize=None, random_init=False))
    app = create_app(net, tok, settings, model_path=path, more=more, draft_model=draft, prompt_cache_mb=prompt_cache_mb)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model", host)
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    log.info("editors: OpenAI %s/v1, Ollama %s, llama.cpp %s/infill and /completion, model %r "
             "(configurations: docs/editors.md)", base, base, base, settings.model_name)
    if tok.fim is None:
        log.warning("%s has no fill-in-the-middle tokens: completions at the cursor (suffix, /infill) are %s",
                    settings.model_name, "completed from the prefix alone" if suffix_fallback == "prefix-only" else
                    "refused; fine-tune one with `polycoder finetune --fim`, or pass --suffix-fallback prefix-only")
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def _adapters(specs: list[str], base_name: str, options: ModelOptions) -> list[tuple[str, Path]]:
    """(name, folder) of each --adapter NAME=FOLDER (or FOLDER), every one checked: an adapter
    folder, a name of its own."""
    if specs and options.random_init:
        raise PolycoderError("--adapter needs a base model with weights; leave out --random-init")
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, where = spec.partition("=")
        if not sep:
            name, where = display_name(spec), spec
        if not name or not where:
            raise PolycoderError(f"--adapter {spec!r}: give NAME=FOLDER (or FOLDER) of a LoRA adapter")
        folder = resolve(where)
        if not is_adapter(folder):
            raise PolycoderError(f"--adapter {spec!r}: {folder} is not a LoRA adapter folder (no adapter_config.json); "
                                 "run a whole model as its own server with --model")
        taken = [base_name] + [n for n, _ in out]
        if name in taken or f"{name}:latest" in taken:
            raise PolycoderError(f"--adapter {spec!r}: the name {name!r} is taken; name it with --adapter NAME=FOLDER")
        out.append((name, folder))
    return out
