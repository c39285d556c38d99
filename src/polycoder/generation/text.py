"""A sample's text: stop strings, the end of the document, and UTF-8 held back until whole.

At the cursor, the FIM sentinels end a sample as `<|endoftext|>` does (`stop_ids`), and the
suffix's stop rule (`polycoder.generation.suffix_stop`) cuts and holds back text as stop
strings do.

Token boundaries at the cursor ("healing"): code is tokenized with whitespace joined to
what follows it (a newline and the next line's indentation are one token, `"\n    "`, and
a space goes with the word after it, `" b"`), so a text that ends in whitespace ends in a
token the model rarely saw there: after `"...:\n"` cut before the indentation, or
`"f(a, "` cut before the argument, it does not know how to go on. `back_off` leaves the
trailing whitespace out of the prompt and the model writes it again as part of its own next
token: until it has, a row may only take tokens that agree with the whitespace still owed
(`allowed_tokens`, Guidance's "token healing"; the end of the document and the stop ids
stay allowed, for an empty completion), and `Sequence` drops the whitespace from the output
(`SamplingParams.heal`) before the stop strings and the suffix's rule see the text. Left
unconstrained, a small model often went on with the word before the cursor instead
(`msg` + `_name,` after a blank line).

Line breaks at the cursor (`SamplingParams.eol`, `polycoder.line_breaks`): the text, the
stop strings and the suffix's rule are the model's, with LF; what is emitted has the
document's line breaks, a trailing `\r` held back until the next piece shows whether a `\n`
follows it.

`Sequence` turns one row's tokens into text as they come, holding back text that might be
the start of a stop string and never emitting half a UTF-8 character; `encode_prompt`
fits a prompt to the model's context (or says clearly why it does not fit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from polycoder.errors import PolycoderError
from polycoder.generation.sampling import SamplingParams
from polycoder.line_breaks import to_lf, written
from polycoder.tokenizer import Tokenizer

FinishReason = Literal["stop", "eod", "length", "error"]


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int = 0



def encode_prompt(tokenizer: Tokenizer, prompt: str | bytes | list[int], block_size: int, params: SamplingParams) -> list[int]:
    """Prompt ids that fit the context with room for max_new_tokens (or a clear error)."""
    ids = list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eod_id]  # an empty prompt starts a new document
    room = block_size - params.max_new_tokens
    if room < 1:
        raise PolycoderError(
            f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the model's context of {block_size} tokens; "
            "lower it"
        )
    if len(ids) > room:
        if not params.truncate:
            raise PolycoderError(
                f"the prompt is {len(ids)} tokens; with max_new_tokens {params.max_new_tokens} it exceeds the model's "
                f"context of {block_size}: shorten the prompt, lower max_new_tokens, or allow left truncation "
                f"(--truncate keeps the last {room} prompt tokens)"
            )
        ids = ids[-room:]
    return ids



def under_indented(text: str, least: int) -> int | None:
    """Where the code of the first line after a line break that is indented by fewer than
    `least` spaces or tabs begins, or None (llama.cpp's `n_indent`: the sample ends there,
    that line's indentation kept). A line of whitespace alone is not judged."""
    start = text.find("\n") + 1
    while start:
        end = text.find("\n", start)
        line = text[start:] if end < 0 else text[start:end]
        indent = len(line) - len(line.lstrip(" \t"))
        if line.strip() and indent < least:
            return start + indent
        start = end + 1 if end >= 0 else 0
    return None


class Sequence:
    """A sample being generated: its tokens, its text, and what may be emitted yet."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 generator: torch.Generator, tag: object = None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = generator
        self.tag = tag  # the caller's handle (prompt index, request id, ...)
        self.guessing = None  # speculative decoding's state of the row (a speculative.Guessing), the engine's
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None  # why, when finish_reason is "error"
        self._decoder = tokenizer.stream_decoder()
        self._eod = tokenizer.eod_id
        self._stop_ids = frozenset(params.stop_ids)
        self._rule = params.suffix_stop
        self._eol = params.eol
        self._stops = tuple(to_lf(s) for s in params.stop) if self._eol else params.stop
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._tokenizer = tokenizer
        self._heal = params.heal  # what the output must still begin with, to be dropped
        self._healing = ""  # output so far while it may still be that whitespace
        self.healed = ""  # the output's start left out as the prompt's own whitespace
        self._started: float | None = None  # when the first token came (`max_predict_ms`)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)

    def push(self, token: int, room_left: bool = True) -> str:
        """Take the next token; returns the text that is now safe to emit (may be "")."""
        if (token == self._eod and self.params.stop_at_eod) or token in self._stop_ids:
            return self._finish("eod")
        self.token_ids.append(token)
        start, checked = max(0, len(self.text) - self._max_stop + 1), len(self.text)
        piece = self._healed(self._decoder.push([token]))
        self.text += piece
        if self._cut_at_stop(start, checked):
            return self._take(len(self.text))
        if len(self.token_ids) >= self.params.max_new_tokens or not room_left or self._out_of_time(piece):
            return self._finish("length")
        return self._take(len(self.text) - self._held_back())

    def fail(self, error: BaseException) -> str:
        """End this sample because generating it raised `error` (the others go on)."""
        self.error = f"{type(error).__name__}: {error}"[:500]
        self.finish_reason = "error"
        return ""

    def finish(self, reason: FinishReason) -> str:
        return self._finish(reason)

    @property
    def output(self) -> str:
        """The text as emitted: with the document's line breaks where `SamplingParams.eol` says."""
        return written(self.text, self._eol) if self._eol else self.text

    def completion(self) -> Completion:
        return Completion(self.output, list(self.token_ids), self.finish_reason or "length", len(self.prompt_ids))

    def _finish(self, reason: FinishReason) -> str:
        start, checked = max(0, len(self.text) - self._max_stop + 1), len(self.text)
        self.text += self._healed(self._decoder.flush())
        if self._heal:  # ended inside the whitespace: it was all the prompt's own
            self.healed = self._healing
        self._heal = self._healing = ""
        self.finish_reason = reason
        self._cut_at_stop(start, checked, final=True)
        if self.finish_reason == "eod" and self._rule is not None:
            self.text += self._rule.ended(self.text)
        return self._take(len(self.text))

    @property
    def healing(self) -> bool:
        """Whether the output has yet to restore the prompt's backed-off whitespace."""
        return bool(self._heal)

    def allowed_tokens(self) -> list[int] | None:
        """The ids this row may take next, or None for any: while `healing`, the tokens that
        agree with the rest of the whitespace, the end of the document and the stop ids."""
        if not self.healing:
            return None
        owed = self._heal[len(self._healing):].encode()
        ends = ([self._eod] if self.params.stop_at_eod else []) + list(self._stop_ids)
        return self._tokenizer.tokens_agreeing(owed) + ends

    def _healed(self, piece: str) -> str:
        """`piece` of output less what restores the prompt's backed-off whitespace."""
        if not self._heal:
            return piece
        self._healing += piece
        if len(self._healing) < len(self._heal) and self._heal.startswith(self._healing):
            return ""  # may still be the whitespace: hold it
        out, heal = self._healing, self._heal
        self._heal = self._healing = ""
        if not out.startswith(heal):
            return out
        self.healed = heal
        return out[len(heal):]

    def _out_of_time(self, piece: str) -> bool:
        """llama.cpp's `t_max_predict_ms`: past `SamplingParams.max_predict_ms` since the first
        token, a piece that writes a line break ends the sample (the break kept)."""
        if not self.params.max_predict_ms:
            return False
        now = time.monotonic()
        if self._started is None:
            self._started = now
        return "\n" in piece and (now - self._started) * 1e3 > self.params.max_predict_ms

    def _cut_at_stop(self, start: int, checked: int, final: bool = False) -> bool:
        """Cut the text at the first stop string (searched from `start`) or where the suffix's
        rule ends it (`checked`: the length of the text it last judged), and finish."""
        hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if self._rule is not None:
            at = self._rule.cut(self.text, final, checked)
            if at is not None:
                hits.append(at)
        indented = under_indented(self.text, self.params.min_indent) if self.params.min_indent else None
        if not hits and indented is None:
            return False
        end = min([*hits, *([] if indented is None else [indented])])
        self.text = self.text[:end]
        # llama.cpp reports its n_indent stop as a limit (stop_type "limit"), not a stop word.
        self.finish_reason = "stop" if end in hits else "length"
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could begin a stop string (or that the
        suffix's rule could still cut)."""
        rule = self._rule.held_back(self.text) if self._rule is not None else 0
        return max(rule, self._stop_held_back())

    def _stop_held_back(self) -> int:
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        if not self._eol:
            out = self.text[self.emitted : upto]
            self.emitted = upto
            return out
        if not self.done and upto > self.emitted and self.text[upto - 1] == "\r":
            upto -= 1  # a "\r\n" split between two pieces would be written as two line breaks
        out = written(self.text[self.emitted : upto], self._eol)
        self.emitted = upto
        return out

