"""OpenAI's (legacy) completions API: `GET /v1/models`, `POST /v1/completions`.

Follows https://platform.openai.com/docs/api-reference/completions as the official `openai`
Python package speaks it: `prompt` as a string, a list of strings, a list of token ids or
a list of such lists; `max_tokens` (default 16), `temperature` (default 1), `top_p`, `n`,
`stop` (string or list), `seed`, `stream` (Server-Sent Events: one `data:` chunk per piece
of text, each choice's `finish_reason` in a last chunk of its own, then `data: [DONE]`;
`stream_options.include_usage` adds a usage chunk), `echo`, `logprobs` (0..20 most likely
alternatives per token; with `echo` and `max_tokens` 0 it scores a prompt, as evaluation
harnesses do) and `usage` (its `prompt_tokens_details.cached_tokens`: the prompt tokens the
server's prompt cache supplied, as OpenAI reports its own caching). `top_k` is accepted as an extension (as vLLM does).
`presence_penalty` and `frequency_penalty` ([-2, 2], default 0) lower the tokens the
completion has written so far, as OpenAI defines them (`polycoder.generation.penalties`).

`suffix` asks for the code between `prompt` and it (fill-in-the-middle, built as
`polycoder.serve.at_cursor` says: one text prompt, no `echo`; an empty suffix is the end of
the document, where a FIM model gets the same prompt as /infill with an empty `input_suffix`; `stop_at_suffix` (default
the server's `--stop-at-suffix`) switches the suffix's stop rule per request). A single text
prompt that spells a cursor out in the FIM sentinels (Tabby's `prompt_template`) is that
cursor, as if sent with `suffix`. A model
without FIM tokens refuses a suffix with a 400 naming the fix, unless the server falls
back to the prefix alone (`--suffix-fallback prefix-only`: the `warning` field says so).
With `logprobs` at a cursor, the tokens are written with the document's line breaks, as the
text is, and the first may restore whitespace the prompt ended with, which the text leaves
out (token healing: `polycoder.generation.text`).

Refused with a 400 that says why: `best_of` other than n, `logit_bias`, and `logprobs`
together with `stream`. `finish_reason` is "stop"
for a stop string, the end of a document or the suffix's stop rule, and "length" for
max_tokens or a full context. Log-probabilities are those of the raw model over its whole
vocabulary (before temperature and top-p), and a token that is part of a UTF-8 character
shows as U+FFFD in `tokens`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from polycoder.fim import Cursor
from polycoder.generation import SamplingParams, resolve_seed
from polycoder.line_breaks import written
from polycoder.serve.at_cursor import (
    SUFFIX_IGNORED,
    can_infill,
    check_text,
    cursor_prompt,
    falls_back,
    templated_cursor,
)
from polycoder.serve.common import (
    APIError,
    ServedModels,
    ServerState,
    get_bool,
    get_float,
    get_int,
    get_penalties,
    get_seed,
    get_stop,
    get_top_k,
    prompt_ids,
    read_json,
    sentinel_stops,
)
from polycoder.serve.engine_loop import Job, NotRunning, Outcome, QueueFull, TokenScores

FINISH = {"eod": "stop", "stop": "stop", "length": "length"}
MAX_LOGPROBS = 20


def parse_prompts(value: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of prompts (each a string or token ids)."""
    def ids(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if value is None:
        return [""]  # OpenAI's default prompt is <|endoftext|>: start a new document
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if ids(value):
            return [list(value)]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(ids(v) and v for v in value):
            return [list(v) for v in value]
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                   "token ids (none of them empty lists)", param="prompt")


def sampling_from_body(body: dict, max_tokens_default: int, n_limit: int) -> SamplingParams:
    temperature = get_float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = get_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    return SamplingParams(
        max_new_tokens=get_int(body, "max_tokens", max_tokens_default, 0),
        temperature=temperature, top_p=top_p, top_k=get_top_k(body, 0),
        num_samples=get_int(body, "n", 1, 1, n_limit), stop=get_stop(body), seed=get_seed(body),
        penalties=get_penalties(body, count_prompt=False, repeat=False),  # OpenAI's: the tokens sampled so far
    )


def no_fim(what: str, param: str) -> APIError:
    """The refusal of fill-in-the-middle on a model without FIM tokens (`what` asked for it)."""
    return APIError(400, f"{what} (fill-in-the-middle) needs a model trained for it, and this one has no FIM "
                    "tokens: fine-tune one with `polycoder finetune --fim`, or start the server with "
                    "--suffix-fallback prefix-only to complete the prompt alone", param=param, code="fim_not_supported")


def logprobs_object(state: ServerState, scores: TokenScores, eol: str | None = None) -> dict:
    """OpenAI's `logprobs`: tokens, token_logprobs, top_logprobs, text_offset. At a cursor in a
    document with CRLF (`eol`), the tokens' line breaks are written as the text's are."""
    tok = state.tokenizer

    def text(i: int) -> str:
        return written(tok.decode([i]), eol) if eol else tok.decode([i])

    texts = [text(t) for t in scores.token_ids]
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    top = [None if alts is None else {text(i): lp for i, lp in alts} for alts in scores.top]
    return {"tokens": texts, "token_logprobs": scores.token_logprobs, "top_logprobs": top, "text_offset": offsets}


async def watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client closes the connection (the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            job.events.put_nowait(("gone",))  # wake the handler: it answers 499 to nobody and ends
            return


async def job_events(job: Job) -> AsyncIterator[tuple]:
    """The job's ("text", index, text) and ("done", Outcome) events until every choice is done."""
    left = len(job.prompts) * job.params.num_samples
    while left:
        item = await job.events.get()
        if item[0] == "error":
            raise APIError(500, item[1], kind="server_error")
        if item[0] == "gone":
            raise APIError(499, "the client closed the connection", kind="client_closed")
        if item[0] == "done":
            left -= 1
        yield item


async def collect(request: Request, job: Job) -> tuple[str, Outcome | None]:
    """The whole text and the outcome of a one-choice job, not streamed; cancelled if the client goes."""
    watcher = asyncio.create_task(watch_disconnect(request, job))
    pieces, outcome = [], None
    try:
        async for item in job_events(job):
            if item[0] == "text":
                pieces.append(item[2])
            else:
                outcome = item[1]
    finally:
        watcher.cancel()
        job.cancel()  # no-op for a finished job; frees rows if this handler was interrupted
    return "".join(pieces), outcome


def submit(state: ServerState, job: Job) -> Job:
    try:
        state.engine.submit(job)
    except QueueFull as e:
        state.metrics.rejected.inc()
        raise APIError(429, str(e), code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    except NotRunning as e:
        raise APIError(503, str(e), code="unavailable", kind="server_error") from None
    state.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))
    return job


def router(served: ServedModels, auth) -> APIRouter:
    api = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @api.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(s) for s in served.states]}

    @api.get("/models/{name:path}")
    async def model(name: str) -> dict:
        return model_card(served.pick(name, "openai"))

    @api.post("/completions")
    async def completions(request: Request):
        body = await read_json(request, served.default)
        state = served.pick(body.get("model"), "openai")
        suffix = check_text(body.get("suffix"), "suffix")
        if suffix and not (can_infill(state) or falls_back(state)):
            raise no_fim("suffix", "suffix")
        if body.get("logit_bias"):
            raise APIError(400, "logit_bias is not supported; leave it out", param="logit_bias")
        params = sampling_from_body(body, 16, state.settings.max_n)
        best_of = get_int(body, "best_of", None, 1)
        if best_of is not None and best_of != params.num_samples:
            raise APIError(400, "best_of is not supported (only best_of == n); leave it out", param="best_of")
        stream = get_bool(body, "stream", False)
        echo = get_bool(body, "echo", False)
        logprobs = get_int(body, "logprobs", None, 0, MAX_LOGPROBS)
        if stream and logprobs is not None:
            raise APIError(400, "logprobs with stream is not supported; ask without stream", param="logprobs")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        include_usage = get_bool(options or {}, "include_usage", False)
        prompts = parse_prompts(body.get("prompt"))
        if len(prompts) > state.settings.max_prompts:
            raise APIError(400, f"at most {state.settings.max_prompts} prompts per request, got {len(prompts)}",
                           param="prompt")
        rid = request.scope.get("request_id") or uuid.uuid4().hex[:16]
        headers, warning = {}, None
        if suffix and (len(prompts) != 1 or not isinstance(prompts[0], str) or echo):
            raise APIError(400, "suffix needs one text prompt (the code before the cursor) and no echo",
                           param="suffix")
        one_text = len(prompts) == 1 and isinstance(prompts[0], str) and not echo
        # An empty suffix is a cursor at the end of the document, as an editor sends it there
        # (/infill builds the same prompt for an empty input_suffix); an editor's own FIM
        # template in the prompt is the cursor it spells out.
        at_end = body.get("suffix") == "" and one_text and can_infill(state)
        template = (templated_cursor(state, prompts[0], no_fim("a prompt that spells out a cursor in FIM sentinels",
                                                              "prompt"))
                    if one_text and not suffix else None)
        if suffix or at_end or template:
            at = await cursor_prompt(state, template or Cursor(prompts[0], suffix), params.max_new_tokens, request_id=rid,
                                     stop_at_suffix=get_bool(body, "stop_at_suffix", state.settings.stop_at_suffix))
            params = replace(params, stop_ids=at.stop_ids, suffix_stop=at.suffix_stop, heal=at.heal,
                             eol=at.eol)
            ids, headers = [at.ids], at.headers
            warning = SUFFIX_IGNORED if at.suffix_ignored else None
        else:
            ids = [await prompt_ids(state, p, params.max_new_tokens) for p in prompts]
            params = replace(params, stop_ids=sentinel_stops(state, ids))
        job = submit(state, Job(rid, ids, params, resolve_seed(params.seed), logprobs=logprobs, echo=echo))
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
                "model": state.settings.model_name}
        echoes = [state.tokenizer.decode(p) if echo else "" for p in ids]
        if stream:
            return StreamingResponse(stream_events(state, job, head, echoes, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            outcomes: dict[int, Outcome] = {}
            async for item in job_events(job):
                if item[0] == "done":
                    outcomes[item[1].index] = item[1]
        finally:
            watcher.cancel()
            job.cancel()  # no-op for a finished job; frees rows if this handler was interrupted
        choices = []
        for i in sorted(outcomes):
            o = outcomes[i]
            prefix = echoes[i // params.num_samples]
            lp = None
            if o.scores is not None:
                lp = logprobs_object(state, o.scores, params.eol)
            choices.append({"index": i, "text": prefix + o.text, "logprobs": lp,
                            "finish_reason": FINISH[o.finish_reason]})
        extra = {"warning": warning} if warning else {}
        return JSONResponse({**head, "choices": choices, "usage": usage(job, outcomes.values()), **extra},
                            headers=headers)

    return api


def usage(job: Job, outcomes) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: the prompt tokens the prompt
    cache supplied (as OpenAI reports its own prompt caching)."""
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(o.generated_tokens for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}


async def stream_events(state: ServerState, job: Job, head: dict, echoes: list[str],
                        include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    n = job.params.num_samples
    outcomes = []
    try:
        for i in range(len(job.prompts) * n):
            if echoes[i // n]:
                yield chunk([{"index": i, "text": echoes[i // n], "logprobs": None, "finish_reason": None}])
        try:
            async for item in job_events(job):
                if item[0] == "text":
                    yield chunk([{"index": item[1], "text": item[2], "logprobs": None, "finish_reason": None}])
                else:
                    o: Outcome = item[1]
                    outcomes.append(o)
                    yield chunk([{"index": o.index, "text": "", "logprobs": None,
                                  "finish_reason": FINISH[o.finish_reason]}])
        except APIError as e:  # the status line is sent already: report in the stream
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'param': None, 'code': e.code}})}\n\n"
        if include_usage:
            yield chunk([], usage=usage(job, outcomes))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away (or all is done): free the rows now


def model_card(state: ServerState) -> dict:
    return {"id": state.settings.model_name, "object": "model", "created": state.created, "owned_by": "polycoder",
            "context_length": state.context, "max_model_len": state.context}
