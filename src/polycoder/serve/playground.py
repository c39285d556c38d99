"""The playground's routes: a small code editor at `/` that completes at the caret.

    GET  /                      playground.html, with the model's name, whether an API key is
                                needed and the highlighting colours filled in
    GET  /playground/editor.js  the editor (overlay highlighting, ghost text, Tab / Shift-Tab / Enter)
    POST /playground/highlight  {"code", "language"} -> {"language", "tokens": [[css class, text], ...]}

Everything the page loads comes from here, out of the package: no CDN, no web fonts, so the
page works on a machine that is offline. The page asks `/v1/completions` itself, with the
text before the caret as `prompt` and the text after it as `suffix` (see editor.js).

Highlighting is Pygments' lexers run on the server: the page draws the coloured tokens in a
`<pre>` under a transparent `<textarea>` (the usual overlay technique: the textarea keeps
the caret, selection, undo and input methods; the `<pre>` only paints). A token is sent as
the short CSS class Pygments' HtmlFormatter would give it, and the page sets its text with
textContent, never as HTML. The language is the one picked on the page: no guessing from
the code (Pygments' guess_lexer takes most of a second and takes short C snippets for Tera
Term macros). The highlight route needs the API key
like the model routes: lexing is CPU work, and it runs in a worker thread so the event loop
keeps serving the streams meanwhile.
"""

from __future__ import annotations

import asyncio
import html
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.token import STANDARD_TYPES
from pygments.util import ClassNotFound

from polycoder.serve.common import APIError, ServerState, read_json

MAX_HIGHLIGHT_CHARS = 200_000
"""Longest code the highlight route lexes (Pygments' regular expressions take time on big
inputs); the page shows longer text uncoloured."""
STYLE = "default"
"""Pygments' colour scheme for the page."""
# Keep the text as it is: Pygments' defaults strip leading/trailing newlines and add one at the end,
# which would shift every token against the textarea drawn over them. PHP without `<?php` is code.
_LEXER_OPTIONS = {"stripnl": False, "ensurenl": False, "stripall": False, "startinline": True}


def _asset(name: str) -> str:
    return resources.files("polycoder.serve").joinpath(name).read_text(encoding="utf-8")


def css_class(ttype) -> str:
    """Pygments' short CSS class of a token type ("k", "s2", ...; "" for plain text), as its
    HtmlFormatter names it: the nearest ancestor type that has one."""
    while ttype not in STANDARD_TYPES:
        ttype = ttype.parent
    return STANDARD_TYPES[ttype]


def highlight(code: str, language: str) -> dict:
    """The tokens of `code` as [css class, text] pairs (adjacent ones of a class merged), and the
    lexer's name. Their texts join to `code` exactly, or the whole code comes back as one
    plain token (a lexer that rewrites its input, e.g. drops a byte-order mark)."""
    try:
        lexer = get_lexer_by_name(language, **_LEXER_OPTIONS)
    except ClassNotFound:
        raise APIError(400, f"unknown language {language!r}: give a Pygments lexer name (python, c, cpp, rust, "
                       "...) or 'text'", param="language") from None
    tokens: list[list[str]] = []
    for ttype, text in lexer.get_tokens(code):
        cls = css_class(ttype)
        if tokens and tokens[-1][0] == cls:
            tokens[-1][1] += text
        else:
            tokens.append([cls, text])
    if "".join(text for _, text in tokens) != code:
        tokens = [["", code]] if code else []
    return {"language": lexer.name, "tokens": tokens}


def router(state: ServerState, auth) -> APIRouter:
    """The page, its script and the highlight route of the server whose default model is `state`'s."""
    settings = state.settings
    # A border would widen an error token and shift the text after it against the textarea's.
    colours = "\n".join(HtmlFormatter(style=STYLE).get_token_style_defs(".code") + [".code .err { border: none }"])
    page = (_asset("playground.html").replace("{{MODEL}}", html.escape(settings.model_name))
            .replace("{{AUTH}}", "true" if settings.api_key else "false").replace("{{HIGHLIGHT_CSS}}", colours))
    script = _asset("editor.js")
    api = APIRouter()

    @api.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page)

    @api.get("/playground/editor.js")
    async def editor_script():
        return Response(script, media_type="text/javascript; charset=utf-8")

    @api.post("/playground/highlight", dependencies=[Depends(auth)])
    async def highlight_route(request: Request):
        body = await read_json(request, state)
        code, language = body.get("code"), body.get("language", "text")
        if not isinstance(code, str):
            raise APIError(400, "code must be a string: the editor's text", param="code")
        if not isinstance(language, str) or not language:
            raise APIError(400, "language must be a Pygments lexer name (python, c, ...) or 'text'", param="language")
        if len(code) > MAX_HIGHLIGHT_CHARS:
            raise APIError(400, f"code is over {MAX_HIGHLIGHT_CHARS} characters, the most this server highlights; "
                           "the page shows it uncoloured", param="code")
        return JSONResponse(await asyncio.to_thread(highlight, code, language))

    return api
