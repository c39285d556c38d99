"""Ollama's API, the part code editors use: `/api/generate`, `/api/tags`, `/api/show`, `/api/version`.

Follows https://github.com/ollama/ollama/blob/main/docs/api.md. `/api/generate` streams
NDJSON by default (one `{"response": piece, "done": false}` object a line, then a final
`done: true` object with `done_reason`, `context` and the counts and durations in
nanoseconds), or answers one object with `"stream": false`. `options` map to sampling:
temperature (Ollama's default 0.8), top_p (0.9), top_k (40), num_predict (default -1: until
the end of the document or a full context), stop, seed, and repeat_penalty, repeat_last_n
(64), presence_penalty and frequency_penalty over the last repeat_last_n tokens of the
prompt and the answer (`polycoder.generation.penalties`). A deviation: repeat_penalty
defaults to 1 (off), where Ollama's API says 1.1, because code repeats itself by nature
(llama.cpp and transformers default it off too) and so that a greedy answer here equals
the OpenAI and /infill routes' for the same prompt. Other options (num_ctx, ...) are
accepted and ignored, as Ollama does with options a model does not use. `context` (the ids
a previous answer returned) is put before the prompt. An empty prompt answers at once with
`done_reason: "load"`, as Ollama's "load the model" call.

A prompt longer than the context is cut, as Ollama cuts it: its start is left out (with
`context`, theirs first), so that `num_predict` tokens fit after it, or a quarter of the
context where num_predict is -1 or -2; the cut moves in steps (`polycoder.fim.fit`), so a
client that resends its growing text still finds it in the prompt cache. The log and the
X-Polycoder-Truncated header say so. A prompt that spells a cursor out in the FIM sentinels
(an editor's own template, as Tabby's Ollama backend and Continue with a raw template send
it) is that cursor, built as with `suffix` and cut the same way (`polycoder.serve.at_cursor`);
any other prompt with sentinels is not cut, since its start may hold one: it gets a 400
that says to send the code after the cursor as `suffix`, which is cut to fit.

`suffix` asks for the code between `prompt` and it (fill-in-the-middle, built as
`polycoder.serve.at_cursor` says); `options.stop_at_suffix` switches the suffix's stop
rule per request. A model without FIM tokens answers Ollama's own 400, "<model> does not
support insert", to a suffix or a templated cursor, unless the server falls back to the prefix alone (`--suffix-fallback
prefix-only`; the final object's `warning` says so). `/api/show` gives a FIM model a
template that names `.Suffix` and the "insert" capability: Continue's Ollama provider
looks for `.Suffix` in the template to decide that a model can fill in the middle.

Limits: PolyCoder has no chat template, so `system` and `template` are ignored and the
prompt is always raw. So `raw` changes nothing, a deviation: Ollama with `raw: true`
leaves the suffix out of the prompt (its template is what places it), while here the
suffix is the one way to ask for the middle and is always used. `images` and `format`
are refused with a 400. Errors are Ollama's `{"error": "message"}` with the HTTP status.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from polycoder import __version__ as polycoder_version
from polycoder.fim import Cursor
from polycoder.generation import SamplingParams, resolve_seed
from polycoder.serve.at_cursor import (
    CUT_HEADER,
    SUFFIX_IGNORED,
    can_infill,
    check_text,
    cursor_prompt,
    falls_back,
    templated_cursor,
)
from polycoder.serve.common import (
    PROMPT_CUT,
    APIError,
    ServedModels,
    ServerState,
    check_fits,
    check_ids,
    cut_prompt_ids,
    get_bool,
    get_float,
    get_int,
    get_penalties,
    get_seed,
    get_stop,
    get_top_k,
    read_json,
    sentinel_stops,
)
from polycoder.serve.engine_loop import Job, Outcome
from polycoder.serve.openai_api import FINISH, collect, job_events, submit

OLLAMA_VERSION = "0.6.0"
"""The Ollama API version this server speaks (clients check it for features)."""
log = logging.getLogger("polycoder.serve")


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def router(served: ServedModels, auth) -> APIRouter:
    api = APIRouter(prefix="/api")

    @api.get("/version")
    async def version() -> dict:
        return {"version": OLLAMA_VERSION}

    @api.get("/tags", dependencies=[Depends(auth)])
    async def tags() -> dict:
        return {"models": [model_entry(s) for s in served.states]}

    @api.get("/ps", dependencies=[Depends(auth)])
    async def ps() -> dict:
        return {"models": [{**model_entry(s), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}
                           for s in served.states]}

    @api.post("/show", dependencies=[Depends(auth)])
    async def show(request: Request) -> dict:
        body = await read_json(request, served.default)
        name = body.get("model", body.get("name"))
        if name is None:
            raise APIError(400, "model is required", param="model")
        state = served.pick(name, "ollama")
        c = state.model.config
        return {
            "license": "MIT",
            "modelfile": f"# served by polycoder {polycoder_version}\nFROM {state.model_path}\n",
            "parameters": "",
            "template": template(state),
            "details": model_entry(state)["details"],
            "model_info": {
                "general.architecture": "gptneox", "general.parameter_count": state.model.num_parameters(),
                "gptneox.context_length": c.block_size, "gptneox.embedding_length": c.n_embd,
                "gptneox.block_count": c.n_layer, "gptneox.attention.head_count": c.n_head,
                "gptneox.feed_forward_length": c.intermediate_size, "gptneox.vocab_size": c.vocab_size,
                "gptneox.rope.freq_base": c.rope_base,
            },
            "capabilities": ["completion", "insert"] if can_infill(state) else ["completion"],
            "modified_at": datetime.fromtimestamp(state.created, timezone.utc).isoformat().replace("+00:00", "Z"),
        }

    @api.post("/generate", dependencies=[Depends(auth)])
    async def generate(request: Request):
        t0 = time.perf_counter_ns()
        body = await read_json(request, served.default)
        state = served.pick(body.get("model"), "ollama")
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string", param="prompt")
        suffix = check_text(body.get("suffix"), "suffix")
        model = body.get("model") or state.settings.model_name
        # Ollama's words, for clients that look for them
        no_insert = APIError(400, f"{model if ':' in model else model + ':latest'} does not support insert",
                             param="suffix")
        if suffix and not (can_infill(state) or falls_back(state)):
            raise no_insert
        for name in ("images", "format"):
            if body.get(name):
                raise APIError(400, f"{name} is not supported by PolyCoder (a left-to-right code model); leave it out",
                               param=name)
        context = body.get("context") or []
        if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
            raise APIError(400, "context must be a list of token ids", param="context")
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "options must be an object", param="options")
        stream = get_bool(body, "stream", True)
        name = body.get("model") or state.settings.model_name
        if not prompt and not context and not suffix:
            return JSONResponse({"model": name, "created_at": now(), "response": "", "done": True,
                                 "done_reason": "load"})
        num_predict = get_int(options, "num_predict", -1, -2)
        check_ids(state, context, "context")
        rid = request.scope.get("request_id") or uuid.uuid4().hex[:16]
        at, cut = None, False
        template = None if suffix else templated_cursor(state, prompt, no_insert)  # an editor's own FIM template
        if suffix or template:
            at = await cursor_prompt(state, template or Cursor(prompt, suffix), max(num_predict, 0), before=context,
                                     request_id=rid, limit_name="num_predict",
                                     stop_at_suffix=get_bool(options, "stop_at_suffix", state.settings.stop_at_suffix))
            ids = at.ids
        else:
            ids, cut = await cut_prompt_ids(state, prompt, context, num_predict, "num_predict")
            if cut:
                log.info("[%s] the prompt was cut to fit the context: its last %d tokens kept", rid, len(ids))
        if num_predict < 0:  # -1 / -2: until the end of the document or a full context
            num_predict = max(1, state.context - len(ids))
            check_fits(state, ids, num_predict)
        params = SamplingParams(
            max_new_tokens=num_predict,
            temperature=get_float(options, "temperature", 0.8, 0.0, 100.0),
            top_p=get_float(options, "top_p", 0.9, 0.0, 1.0, lo_open=True),
            top_k=get_top_k(options, 40),
            stop=get_stop(options),
            seed=get_seed(options),
            penalties=get_penalties(options, count_prompt=True),
            stop_ids=at.stop_ids if at else sentinel_stops(state, [ids]),
            suffix_stop=at.suffix_stop if at else None,
            heal=at.heal if at else "",
            eol=at.eol if at else None,
        )
        warning = {"warning": SUFFIX_IGNORED} if at and at.suffix_ignored else {}
        headers = at.headers if at else ({CUT_HEADER: PROMPT_CUT} if cut else {})
        job = submit(state, Job(rid, [ids], params, resolve_seed(params.seed)))
        t_queued = time.perf_counter_ns()

        def final(o: Outcome) -> dict:
            t_end = time.perf_counter_ns()
            first = int(job.first_token_at * 1e9) if job.first_token_at else t_end
            return {"model": name, "created_at": now(), "response": "", "done": True,
                    "done_reason": FINISH[o.finish_reason], "context": ids + o.token_ids,
                    "total_duration": t_end - t0, "load_duration": 0,
                    "prompt_eval_count": len(ids), "prompt_eval_duration": max(0, first - t_queued),
                    "eval_count": o.generated_tokens, "eval_duration": max(0, t_end - first), **warning}

        if stream:
            return StreamingResponse(ndjson(job, name, final), media_type="application/x-ndjson", headers=headers)
        text, outcome = await collect(request, job)
        return JSONResponse({**final(outcome), "response": text}, headers=headers)

    return api


async def ndjson(job: Job, name: str, final) -> AsyncIterator[str]:
    try:
        try:
            async for item in job_events(job):
                if item[0] == "text":
                    yield json.dumps({"model": name, "created_at": now(), "response": item[2], "done": False}) + "\n"
                else:
                    yield json.dumps(final(item[1])) + "\n"
        except APIError as e:
            yield json.dumps({"error": e.message}) + "\n"
    finally:
        job.cancel()


def template(state: ServerState) -> str:
    """The Go template Ollama would apply: what our prompt building does, in its words (a FIM
    model's names `.Suffix`, which is how Continue tells that a model fills in the middle)."""
    if not can_infill(state):
        return "{{ .Prompt }}"
    body = ("<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}<fim_middle>" if state.settings.fim_order == "psm"
            else "<fim_prefix><fim_suffix>{{ .Suffix }}<fim_middle>{{ .Prompt }}")
    return "{{- if .Suffix }}" + body + "{{- else }}{{ .Prompt }}{{- end }}"


def model_entry(state: ServerState) -> dict:
    n = state.model.num_parameters()
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    p = next(state.model.parameters())
    quant = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(str(p.dtype).removeprefix("torch."), "F32")
    name = state.settings.model_name
    return {
        "name": f"{name}:latest", "model": f"{name}:latest",
        "modified_at": datetime.fromtimestamp(state.created, timezone.utc).isoformat().replace("+00:00", "Z"),
        "size": n * p.element_size(), "digest": "",
        "details": {"parent_model": "", "format": "safetensors", "family": "gptneox", "families": ["gptneox"],
                    "parameter_size": size, "quantization_level": quant},
    }
