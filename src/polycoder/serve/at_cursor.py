"""What the three at-cursor routes share: the fill-in-the-middle prompt and its stop rules.

Editors complete at the cursor by sending the code before it (prefix) and after it
(suffix): OpenAI's `/v1/completions` `suffix`, Ollama's `/api/generate` `suffix`, and
llama.cpp's `/infill` (`input_prefix`, `input_suffix`, `input_extra`, `prompt`). All three
build their prompt here, so the same prefix and suffix give the same prompt and, greedy,
the same completion on every route:

    ids = [extra context] + polycoder.fim.arrange(tokenizer.fim, P, M, S, order)

with P, S and M (text after the prefix: llama.cpp's `prompt`) each tokenized on its own,
as in training (`polycoder.fim`), and the order the server's `--fim-order` (SPM by
default: the prefix last, so a prompt cache keeps all the rest while the user types).
/infill always builds the FIM prompt, whatever `input_suffix` holds, and so does
/v1/completions for a `suffix` that is there but empty (the cursor at the end of the
document, which editors send as ""); an empty `suffix` on /api/generate is no suffix (a
plain completion, as Ollama reads it: the `ollama` package sends "" with every request).

What does not fit: editors send as much code around the cursor as their settings say
(llama.vscode 256 lines before it and 64 after), whatever the model's context. As
llama.cpp's /infill and Ollama do, the server cuts it away from the cursor rather than
refusing it: the prefix loses its start, the suffix its end, the suffix keeping at least
half of the room (`polycoder.fim.fit_around_cursor`; `eval infilling` and `polycoder
generate --suffix` cut the same way, so the evaluation measures what editors get). The
prefix's cut falls on anchors of its content about once a step, so that typing leaves it
in place, and so does llama.vscode's window moving down a line after a typed newline: the
prompt cache keeps the prompt up to the cursor. A cut prompt is reported: `truncated` on /infill, the
X-Polycoder-Truncated header on every route, and the log.

Extra context (llama.cpp's `input_extra`, chunks of other files): llama.cpp lays it out
with `<|file_sep|>` and file names where the model has such tokens. PolyCoder has none and
never saw file names in training, where documents are packed one after another, each
ended by `<|endoftext|>`; so each chunk goes in as a document of its own, `text <EOD>`,
before the FIM prompt, which is what preceded a FIM sample in a packed training window.
The chunks nearest the end of the list are kept when they do not all fit the context
(llama.cpp keeps the end too); they are bounded from their length in characters before
anything is tokenized, so a huge `input_extra` costs no more than what fits. What they get
is what the code around the cursor leaves, in steps (`fim.cut_step` of the context): the
prefix grows as the user types, and a share that shrank with it token by token would move
the start of the whole prompt at each keystroke (llama.vscode's ring of chunks is far more
than a 2,048-token context holds).

Token boundaries: the text just before the cursor (the prefix, or `prompt` where given)
goes in without its trailing whitespace, which the model writes again and the output drops
(`polycoder.fim.back_off`, `SamplingParams.heal`): a newline and the next
line's indentation are one token in training, and so are a space and the word after it.

Line breaks: a document with CRLF line breaks is read by the model with LF, and the
completion is written with the document's line break at the cursor (`polycoder.line_breaks`):
the model writes worse code after CRLF, which it rarely saw.

Stops: the sentinels end a sample as `<|endoftext|>` does (a model emits EOD after the
middle, as trained; a sentinel means it went astray), and by default the suffix's rule
(`polycoder.generation.suffix_stop`) ends it where the code after the cursor begins.

Editors that template fill-in-the-middle themselves (Tabby's `prompt_template`, Continue's
raw Ollama prompts) spell the cursor out in StarCoder's sentinels in a plain prompt,
`<fim_prefix>P<fim_suffix>S<fim_middle>` (or another model family's sentinels, from a
configuration carried over; text before a template that ends the prompt is extra context,
where llama.vscode's OpenAI mode puts other files). On every route such a prompt is read back into
the code before and after the cursor (`templated_cursor`, `polycoder.fim.read_template`)
and built here like a `suffix`: the same cursor gets the same answer however it is sent,
and a templated prompt is cut to fit, read with LF, healed and stopped as editors need.

A model without FIM tokens cannot use a suffix: each route refuses it as its API does,
unless the server runs with `--suffix-fallback prefix-only`, which completes the prefix
alone and says so (a response header, the response's `warning` and the log).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from polycoder.fim import Cursor, arrange, back_off, cut_step, fit_around_cursor, read_template
from polycoder.generation.suffix_stop import SuffixStop
from polycoder.line_breaks import cursor_line_break, to_lf
from polycoder.serve.common import OFF_LOOP_CHARS, APIError, ServerState, check_fits

log = logging.getLogger("polycoder.serve")

MAX_EXTRA_CHUNKS = 256
"""Most `input_extra` chunks one request may send (llama.vscode sends 16 by default)."""

SUFFIX_IGNORED = ("the suffix was ignored: this model has no fill-in-the-middle tokens, so it completed the "
                  "prefix alone (--suffix-fallback prefix-only); fine-tune it with `polycoder finetune --fim`")
WARNING_HEADER = "X-Polycoder-Warning"
CUT_HEADER = "X-Polycoder-Truncated"
CUT = "the code around the cursor did not fit the context: the prefix's start or the suffix's end was left out"


@dataclass
class CursorPrompt:
    """The prompt of one completion at the cursor, and how it must stop."""

    ids: list[int]
    stop_ids: tuple[int, ...] = ()
    suffix_stop: SuffixStop | None = None
    suffix_ignored: bool = False
    """The model has no FIM tokens and the server falls back to the prefix alone."""
    cut: bool = False
    """The prefix or the suffix did not fit the context and was cut (`polycoder.fim.fit`)."""
    extra_dropped: bool = False
    """Some extra context did not fit the context and was left out."""
    heal: str = ""
    """The whitespace left out of the prompt's end, for `SamplingParams.heal`."""
    eol: str | None = "\n"
    """The document's line break at the cursor, for `SamplingParams.eol` (None: a plain prompt,
    its text written as the model writes it)."""
    headers: dict[str, str] = field(default_factory=dict)


def can_infill(state: ServerState) -> bool:
    return state.tokenizer.fim is not None


def templated_cursor(state: ServerState, prompt, refusal: APIError) -> Cursor | None:
    """The cursor a text prompt spells out in FIM sentinels (an editor's own template:
    `polycoder.fim.read_template`; text before it goes in as extra context), else None (the prompt is text,
    sentinels included: `encode_with_sentinels`). A model without FIM tokens raises the
    route's `refusal`, as for a suffix, unless the server falls back to the prefix alone: an
    editor configured with a template would otherwise get completions of the template's text."""
    parts = read_template(prompt) if isinstance(prompt, str) else None
    if parts is not None and not (can_infill(state) or falls_back(state)):
        raise refusal
    return parts


def falls_back(state: ServerState) -> bool:
    """A suffix sent to a model without FIM tokens is completed as the prefix alone."""
    return not can_infill(state) and state.settings.suffix_fallback == "prefix-only"


async def cursor_prompt(state: ServerState, cursor: Cursor, max_tokens: int, *, extra: list[str] = (),
                        before: list[int] = (), stop_at_suffix: bool = True, request_id: str = "",
                        limit_name: str = "max_tokens") -> CursorPrompt:
    """The prompt ids for `cursor` (its prefix, suffix and middle; its context, text an editor
    put before a template, goes in first among the `extra` chunks), `before` ids (Ollama's
    `context`) first. The code around the cursor is cut to fit the context with max_tokens
    (which the API calls `limit_name`), away from the cursor, as llama.cpp's /infill and
    Ollama cut it: an editor sends as much as its settings say, whatever the model's
    context. A 400 only when max_tokens, `before` and `middle` leave no room at all. The
    caller has checked that the model can infill or that the server falls back (`can_infill`,
    `falls_back`)."""
    prefix, suffix, middle = cursor.prefix, cursor.suffix, cursor.middle
    extra = [cursor.context, *extra] if cursor.context else extra
    eol = cursor_line_break(prefix + middle, suffix)
    prefix, middle, suffix, extra = to_lf(prefix), to_lf(middle), to_lf(suffix), [to_lf(text) for text in extra]
    rule = SuffixStop.of(prefix + middle, suffix) if stop_at_suffix else None
    if middle:
        middle, heal = back_off(middle)
    else:
        prefix, heal = back_off(prefix)
    C, tok, fim = state.context, state.tokenizer, state.tokenizer.fim
    most = C - max_tokens - len(before) - (3 if fim else 0)  # prefix, suffix and middle; 3: the sentinels

    def no_room(middle_tokens: str) -> APIError:
        held = [f"{len(before)} tokens of context"] if before else []
        held += [f"the text after the prefix ({len(middle)} characters, {middle_tokens} tokens)"] if middle else []
        held += [f"{limit_name} {max_tokens}"]
        return APIError(400, f"this server's context is {C} tokens, and {' and '.join(held)} leave no room for the "
                        f"code around the cursor; lower {limit_name}", param=limit_name,
                        code="context_length_exceeded")

    if most <= tok.min_tokens(middle):  # refused before anything is tokenized
        raise no_room(f"at least {tok.min_tokens(middle)}")
    if fim is None:
        ignored = bool(suffix)
        if ignored:
            log.warning("[%s] %s", request_id, SUFFIX_IGNORED)
        ids, _, cut = await _fit_around_cursor(state, prefix + middle, "", most)
        return CursorPrompt(list(before) + (ids or [tok.eod_id]), suffix_stop=rule, suffix_ignored=ignored, cut=cut,
                            heal=heal, eol=eol, headers=_headers(ignored, cut))
    m_ids = (await _encode(state, [middle]))[0]  # each part on its own, as in training
    if most <= len(m_ids):
        raise no_room(str(len(m_ids)))
    kept_p, kept_s, cut = await _fit_around_cursor(state, prefix, suffix, most - len(m_ids))
    if cut:
        log.info("[%s] the code around the cursor was cut to fit the context: %d prefix and %d suffix tokens kept",
                 request_id, len(kept_p), len(kept_s))
    ids = list(before) + arrange(fim, kept_p, m_ids, kept_s, state.settings.fim_order)
    check_fits(state, ids, max_tokens)
    extra_ids, dropped = await _extra_context(state, list(extra), C - max_tokens - len(ids))
    return CursorPrompt(extra_ids + ids, stop_ids=fim.all, suffix_stop=rule, cut=cut, extra_dropped=dropped,
                        heal=heal, eol=eol, headers=_headers(False, cut))


def _headers(ignored: bool, cut: bool) -> dict[str, str]:
    """What the response's headers say about how its prompt was built."""
    return {**({WARNING_HEADER: SUFFIX_IGNORED} if ignored else {}), **({CUT_HEADER: CUT} if cut else {})}


async def _encode(state: ServerState, texts: list[str]) -> list[list[int]]:
    """Each text's ids on its own; long ones off the event loop."""
    encode = state.tokenizer.encode
    if sum(len(t) for t in texts) > OFF_LOOP_CHARS:
        return await asyncio.to_thread(lambda: [encode(t) for t in texts])
    return [encode(t) for t in texts]


async def _fit_around_cursor(state: ServerState, prefix: str, suffix: str,
                             room: int) -> tuple[list[int], list[int], bool]:
    """`fit_around_cursor` with this server's tokenizer; long texts off the event loop."""
    tok = state.tokenizer
    if len(prefix) + len(suffix) > OFF_LOOP_CHARS:
        return await asyncio.to_thread(fit_around_cursor, tok.encode, prefix, suffix, room, tok.max_token_bytes)
    return fit_around_cursor(tok.encode, prefix, suffix, room, tok.max_token_bytes)


async def _extra_context(state: ServerState, chunks: list[str], budget: int) -> tuple[list[int], bool]:
    """Ids of the extra chunks as documents (`text <EOD>`), the last ones that fit `budget`
    tokens rounded down to a cut step; and whether any were left out or cut."""
    if not chunks:
        return [], False
    step = cut_step(state.context)
    budget = budget // step * step
    if budget <= 0:
        return [], True
    kept, least = [], 0
    for text in reversed(chunks):  # bounded by length before tokenizing: what cannot fit is never tokenized
        kept.append(text)
        least += state.tokenizer.min_tokens(text) + 1
        if least >= budget:
            break
    kept.reverse()
    ids = [t for doc in await _encode(state, kept) for t in (*doc, state.tokenizer.eod_id)]
    dropped = len(kept) < len(chunks) or len(ids) > budget
    return ids[-budget:] if len(ids) > budget else ids, dropped


def check_text(value, name: str, default: str = "") -> str:
    """A text field: a string (None or absent: `default`), else a 400."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise APIError(400, f"{name} must be a string", param=name)
    return value
