"""llama.cpp's server routes that editors use: `POST /infill` (llama.vscode, llama.vim) and
`POST /completion` (and its alias `/completions`, as llama.cpp's: Tabby's `llama.cpp/completion`
backend, Continue's `llama.cpp` provider, any llama.cpp client).

Follows llama.cpp's server (tools/server/README.md, "POST /infill" and "POST /completion").
/infill: `input_prefix` and `input_suffix` (both required, either may be empty), `input_extra` (a
list of `{"filename": string, "text": string}` chunks of other files; filename optional),
`prompt` (text after the prefix: the start of the middle). /completion: `prompt`, a string,
a list of token ids, or a list mixing ids and strings (one prompt a request: a list of
prompts is refused with a 400); a text prompt that spells a cursor out in the FIM
sentinels, as Tabby's `prompt_template` writes it (`<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>`),
is that cursor and is built as /infill builds it (`polycoder.serve.at_cursor`); any other
prompt too long for the context loses its start, as llama.cpp cuts it (`truncated`).
Both: `n_predict` (default -1: until
the end of the document or a full context; 0 answers at once, as llama.vscode's
cache-warming call expects), `temperature` (0.8), `top_k` (40), `top_p` (0.95), `seed`
(-1: random), `repeat_penalty` (1: off), `repeat_last_n` (64), `presence_penalty` and
`frequency_penalty` (0) over the latest tokens of the prompt and the answer, as llama.cpp's
(`polycoder.generation.penalties`), `stop`, `stream` (Server-Sent Events: one `data: {...}` object a piece of
text with `"stop": false`, then a last one with `"stop": true` and the counts, as llama.cpp
sends them, no `[DONE]`); `n_indent` (0: off; llama.vscode sends the cursor line's indentation):
after the first line break, a line whose code is indented by fewer spaces or tabs ends the
answer before that code, `stop_type` "limit", as llama.cpp ends it; `t_max_predict_ms` (0 or less: off;
llama.vscode sends 1000): once that long has passed since the first generated token, the
answer ends after the next token that writes a line break, `stop_type` "limit", as llama.cpp
ends it; and `stop_at_suffix` (ours: the suffix's stop rule on or off, at a cursor).
The answer is llama.cpp's: `content`, `stop`, `stop_type` ("eos", "limit" or "word"),
`tokens_predicted`, `tokens_evaluated` (the prompt's tokens), `tokens_cached` (those the
server's prompt cache supplied, `serve --prompt-cache-mb`), `truncated` (the prefix's start,
the suffix's end, the prompt's start or some `input_extra` did not fit the context and was left out), `timings`
(milliseconds and rates; `prompt_n` counts the prompt tokens that ran through the model, as
llama.cpp's does) and the rest of its fields. `cache_prompt`
(default true, as llama.cpp's) false computes the whole prompt for that request, reusing
nothing (the prompt is still kept for the requests after it). /infill's prompt is built as
`polycoder.serve.at_cursor` says (extra chunks as documents before the FIM prompt).

`response_fields` (llama.vim's): the answer holds only those fields, each path's value under
the path itself ("timings/prompt_n"), as llama.cpp sends them.
Accepted and ignored, as llama.cpp ignores what it does not know: `samplers`, `min_p`,
`t_max_prompt_ms`, `id_slot`, `n_cmpl`, `lora`, `n_probs` and other fields.
A model without FIM tokens answers /infill with llama.cpp's 501 ("Infill is not supported by this
model: ..."), and so does /completion for a prompt that spells out a cursor, unless the
server falls back to the prefix alone (`--suffix-fallback prefix-only`; `warning` says so). Errors are llama.cpp's
`{"error": {"code": status, "message": ..., "type": ...}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from polycoder.fim import Cursor
from polycoder.generation import SamplingParams, resolve_seed
from polycoder.serve.at_cursor import (
    CUT_HEADER,
    MAX_EXTRA_CHUNKS,
    SUFFIX_IGNORED,
    CursorPrompt,
    can_infill,
    check_text,
    cursor_prompt,
    falls_back,
    templated_cursor,
)
from polycoder.serve.common import (
    OFF_LOOP_CHARS,
    PROMPT_CUT,
    APIError,
    ServedModels,
    ServerState,
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
from polycoder.serve.openai_api import collect, job_events, submit

log = logging.getLogger("polycoder.serve")

STOP_TYPE = {"eod": "eos", "length": "limit", "stop": "word"}
NOT_SUPPORTED = ("Infill is not supported by this model: prefix token is missing. suffix token is missing. "
                 "middle token is missing. ")
"""llama.cpp's words for a model without FIM tokens (a 501), for clients that look for them."""


def parse_extra(value) -> list[str]:
    """`input_extra`'s texts, in order (llama.cpp's checks and messages)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise APIError(400, '"input_extra" must be an array of {"filename": string, "text": string}',
                       param="input_extra")
    if len(value) > MAX_EXTRA_CHUNKS:
        raise APIError(400, f'"input_extra" may hold at most {MAX_EXTRA_CHUNKS} chunks, got {len(value)}; '
                       "send the nearest ones", param="input_extra")
    texts = []
    for chunk in value:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
            raise APIError(400, 'extra_context chunk must contain a "text" field with a string value',
                           param="input_extra")
        if "filename" in chunk and not isinstance(chunk["filename"], str):
            raise APIError(400, "extra_context chunk's \"filename\" field must be a string", param="input_extra")
        texts.append(chunk["text"])
    return texts


def parse_prompt(value) -> str | list[str | int]:
    """/completion's `prompt`: a string, or one list of token ids and strings (llama.cpp's
    mixed form); several prompts (a list of strings or of lists) are refused."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if any(isinstance(x, list) for x in value) or (value and all(isinstance(x, str) for x in value)):
            raise APIError(400, "one prompt a request: send each prompt as a request of its own", param="prompt")
        if all(isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)) for x in value):
            return value
    raise APIError(400, '"prompt" must be a string, or a list of token ids and strings', param="prompt")


def router(served: ServedModels, auth) -> APIRouter:
    api = APIRouter(dependencies=[Depends(auth)])

    @api.post("/infill")
    async def infill(request: Request):
        t0 = time.perf_counter()
        body = await read_json(request, served.default)
        state = served.pick(body.get("model"), "openai")
        if not (can_infill(state) or falls_back(state)):
            raise APIError(501, NOT_SUPPORTED, kind="not_supported_error")
        for name in ("input_prefix", "input_suffix"):
            if name not in body:
                raise APIError(400, f'"{name}" is required', param=name)
        prefix = check_text(body["input_prefix"], "input_prefix")
        suffix = check_text(body["input_suffix"], "input_suffix")
        middle = check_text(body.get("prompt"), "prompt")
        extra = parse_extra(body.get("input_extra"))
        n_predict = get_int(body, "n_predict", -1, -1)
        rid = request.scope.get("request_id") or uuid.uuid4().hex[:16]
        at = await cursor_prompt(state, Cursor(prefix, suffix, middle), max(n_predict, 0), extra=extra, request_id=rid,
                                 limit_name="n_predict",
                                 stop_at_suffix=get_bool(body, "stop_at_suffix", state.settings.stop_at_suffix))
        return await answer(request, state, body, at, n_predict, rid, t0)

    @api.post("/completion")
    @api.post("/completions")  # llama.cpp's alias of the same route
    async def completion(request: Request):
        t0 = time.perf_counter()
        body = await read_json(request, served.default)
        state = served.pick(body.get("model"), "openai")
        prompt = parse_prompt(body.get("prompt"))
        n_predict = get_int(body, "n_predict", -1, -1)
        rid = request.scope.get("request_id") or uuid.uuid4().hex[:16]
        # Tabby's prompt_template: the cursor it spells out (llama.cpp's 501 on a model without FIM tokens)
        template = templated_cursor(state, prompt, APIError(501, NOT_SUPPORTED, kind="not_supported_error"))
        if template:
            at = await cursor_prompt(state, template, max(n_predict, 0), request_id=rid, limit_name="n_predict",
                                     stop_at_suffix=get_bool(body, "stop_at_suffix", state.settings.stop_at_suffix))
        else:
            at = await plain_prompt(state, prompt, n_predict, rid)
        return await answer(request, state, body, at, n_predict, rid, t0)

    return api


async def plain_prompt(state: ServerState, prompt: str | list[str | int], n_predict: int, rid: str) -> CursorPrompt:
    """/completion's prompt that spells no cursor: its ids (sentinels spelt out in text are
    the sentinels), the start left out where it does not fit, ending at a sentinel where
    it holds one (an editor's own template)."""
    text, ids = prompt, []
    if isinstance(prompt, list):  # ids and strings, in order
        text = ""

        def encode() -> list[int]:
            return [t for part in prompt
                    for t in (state.tokenizer.encode_with_sentinels(part) if isinstance(part, str) else [part])]

        long = sum(len(part) for part in prompt if isinstance(part, str)) > OFF_LOOP_CHARS
        ids = await asyncio.to_thread(encode) if long else encode()
        check_ids(state, ids, "prompt")
    ids, cut = await cut_prompt_ids(state, text, ids, n_predict, "n_predict")
    if cut:
        log.info("[%s] the prompt was cut to fit the context: its last %d tokens kept", rid, len(ids))
    return CursorPrompt(ids, stop_ids=sentinel_stops(state, [ids]), cut=cut, eol=None,
                        headers={CUT_HEADER: PROMPT_CUT} if cut else {})


async def answer(request: Request, state: ServerState, body: dict, at: CursorPrompt, n_predict: int, rid: str,
                 t0: float):
    """Generate for `at` with the body's sampling fields, answered as llama.cpp answers
    (streamed or whole)."""
    if n_predict < 0:  # until the end of the document or a full context
        n_predict = max(1, state.context - len(at.ids))
    seed = get_seed(body)
    params = SamplingParams(
        max_new_tokens=n_predict,
        temperature=get_float(body, "temperature", 0.8, 0.0, 100.0),
        top_k=get_top_k(body, 40),
        top_p=get_float(body, "top_p", 0.95, 0.0, 1.0, lo_open=True),
        stop=get_stop(body),
        seed=None if seed == -1 else seed,
        penalties=get_penalties(body, count_prompt=True),
        stop_ids=at.stop_ids,
        suffix_stop=at.suffix_stop,
        heal=at.heal,
        eol=at.eol,
        min_indent=get_int(body, "n_indent", 0, 0),
        max_predict_ms=max(0, get_int(body, "t_max_predict_ms", 0)),  # llama.cpp: <= 0 is off
    )
    fields = parse_fields(body.get("response_fields"))
    job = submit(state, Job(rid, [at.ids], params, resolve_seed(params.seed),
                            reuse_prompt=get_bool(body, "cache_prompt", True)))
    if get_bool(body, "stream", False):
        return StreamingResponse(events(state, job, at, t0, fields), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **at.headers})
    text, outcome = await collect(request, job)
    return JSONResponse(only(fields, final(state, job, at, outcome, text, t0)), headers=at.headers)


def parse_fields(value) -> list[str]:
    """`response_fields`: the paths of the answer's fields to send ("timings/prompt_n"), or all."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise APIError(400, '"response_fields" must be a list of field paths such as "timings/prompt_n"',
                       param="response_fields")
    return value


def only(fields: list[str], answer: dict) -> dict:
    """llama.cpp's `response_fields`: each path's value under the path itself ("timings/prompt_n":
    3, as llama.vim reads it), paths that lead nowhere left out; no fields: the whole answer."""
    if not fields:
        return answer
    picked = {}
    for path in fields:
        value = answer
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            picked[path] = value
    return picked


async def events(state: ServerState, job: Job, at: CursorPrompt, t0: float, fields: list[str]) -> AsyncIterator[str]:
    """llama.cpp's stream: `data: {...}` a piece, the last with `"stop": true`."""
    try:
        try:
            async for item in job_events(job):
                if item[0] == "text":
                    piece = {"index": 0, "content": item[2], "tokens": [], "stop": False, "id_slot": -1,
                             "tokens_evaluated": len(at.ids)}
                    yield f"data: {json.dumps(piece)}\n\n"
                else:
                    yield f"data: {json.dumps(only(fields, final(state, job, at, item[1], '', t0)))}\n\n"
        except APIError as e:  # the status line is sent already: report in the stream, as llama.cpp does
            yield f"error: {json.dumps({'code': e.status, 'message': e.message, 'type': e.kind})}\n\n"
    finally:
        job.cancel()  # the client went away (or all is done): free the row now


def final(state: ServerState, job: Job, at: CursorPrompt, o: Outcome, content: str, t0: float) -> dict:
    """llama.cpp's final answer object (`content` is empty at the end of a stream)."""
    t_end = time.perf_counter()
    first = job.first_token_at or t_end
    prompt_ms, predicted_ms = max(0.0, first - t0) * 1e3, max(0.0, t_end - first) * 1e3
    n_prompt, n_pred, cached = len(at.ids), o.generated_tokens, job.cached_tokens
    n_run = n_prompt - cached  # the prompt tokens that ran through the model
    p = job.params
    out = {
        "index": 0, "content": content, "tokens": [], "id_slot": 0, "stop": True,
        "model": state.settings.model_name, "tokens_predicted": n_pred, "tokens_evaluated": n_prompt,
        "generation_settings": {"n_predict": p.max_new_tokens, "temperature": p.temperature, "top_k": p.top_k,
                                "top_p": p.top_p, "seed": job.seed, "stop": list(p.stop), "n_indent": p.min_indent,
                                "t_max_predict_ms": p.max_predict_ms},
        "prompt": state.tokenizer.decode(at.ids), "has_new_line": "\n" in (content or o.text),
        "truncated": at.cut or at.extra_dropped, "stop_type": STOP_TYPE[o.finish_reason], "stopping_word": "",
        "tokens_cached": cached,
        "timings": {"prompt_n": n_run, "prompt_ms": prompt_ms,
                    "prompt_per_token_ms": prompt_ms / max(n_run, 1),
                    "prompt_per_second": n_run / (prompt_ms / 1e3) if prompt_ms else 0.0,
                    "predicted_n": n_pred, "predicted_ms": predicted_ms,
                    "predicted_per_token_ms": predicted_ms / max(n_pred, 1),
                    "predicted_per_second": n_pred / (predicted_ms / 1e3) if predicted_ms else 0.0},
    }
    if at.suffix_ignored:
        out["warning"] = SUFFIX_IGNORED
    return out
