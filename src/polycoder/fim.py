"""Fill-in-the-middle: the sentinel tokens and how a prefix, middle and suffix are laid out.

Bavarian et al. (2022), "Efficient Training of Language Models to Fill in the Middle"
(arXiv:2207.14255): a document cut into prefix P, middle M and suffix S is trained as
one of two orders, and a model so trained completes at a cursor by reading the prompt
without M and generating it:

    PSM  <fim_prefix> P <fim_suffix> S <fim_middle> M
    SPM  <fim_prefix> <fim_suffix> S <fim_middle> P M      (StarCoder's variant)

SPM puts the prefix last, so an editor's growing prefix stays at the end of the prompt and
everything before it (the suffix) stays in a prompt cache while the user types; in PSM
every keystroke changes the prompt right after the prefix. The sentinel names are
StarCoder's, so editors' StarCoder templates work unchanged. `<fim_pad>` fills a training
window that a rearranged document no longer fills exactly.

Every part is tokenized on its own (`Tokenizer.encode` of P, of S, of M), in training and
at serving time alike, so the token boundaries at the cuts are the same in both. One
boundary still differs: a cursor right after whitespace. Code tokenizes with whitespace
joined to what follows it (a newline and the next line's indentation are one token, a
space goes with the next word), so a prefix ending in whitespace ends in a token the model
rarely saw there. `back_off` leaves that whitespace out of the prompt for the model to
write again (its first tokens constrained to agree with it); generation drops it from the output (`SamplingParams.heal`, in
`polycoder.generation.text`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

FIM_PREFIX = "<fim_prefix>"
FIM_MIDDLE = "<fim_middle>"
FIM_SUFFIX = "<fim_suffix>"
FIM_PAD = "<fim_pad>"
FIM_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)

ORDERS = ("psm", "spm")

_TRAILING_WHITESPACE = re.compile(r"\s{1,64}\Z")


@dataclass(frozen=True)
class FimIds:
    """The ids of the four sentinels in one tokenizer."""

    prefix: int
    middle: int
    suffix: int
    pad: int

    @property
    def all(self) -> tuple[int, int, int, int]:
        """The four ids, in FIM_TOKENS' order (the ids that end a middle: `stop_ids`)."""
        return (self.prefix, self.middle, self.suffix, self.pad)

    @classmethod
    def of(cls, vocab: dict[str, int]) -> FimIds | None:
        """The sentinels' ids in `vocab` (added tokens included), or None where any is missing."""
        ids = [vocab.get(t) for t in FIM_TOKENS]
        return None if None in ids else cls(*ids)


def arrange(fim: FimIds, prefix: Sequence[int], middle: Sequence[int], suffix: Sequence[int],
            order: str) -> list[int]:
    """The token ids of a document cut into (prefix, middle, suffix), in PSM or SPM order.

    With an empty `middle` this is the prompt a model completes at the cursor: it generates
    the middle and then, as trained, the end-of-document token."""
    if order == "psm":
        return [fim.prefix, *prefix, fim.suffix, *suffix, fim.middle, *middle]
    if order == "spm":
        return [fim.prefix, fim.suffix, *suffix, fim.middle, *prefix, *middle]
    raise ValueError(f"FIM order must be one of {', '.join(ORDERS)}, got {order!r}")


TEMPLATE_MARKERS = (
    (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE),  # StarCoder's: ours
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder's, CodeGemma's
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),  # DeepSeek-Coder's
    ("<PRE> ", " <SUF>", " <MID>"),  # Code Llama's, spaces included
)
"""The (prefix, suffix, middle) markers of the FIM templates editors ship, which `read_template`
reads: a template written for another model (a Tabby or Continue configuration carried over)
still spells out a cursor."""


class Cursor(NamedTuple):
    """A cursor spelt out in a templated prompt (`read_template`)."""

    prefix: str
    suffix: str
    middle: str = ""
    """Text already written after the cursor (llama.cpp's `prompt`), usually empty."""
    context: str = ""
    """Text before the template (other files' code an editor put there), for extra context."""


def read_template(text: str) -> Cursor | None:
    """The cursor in a prompt that spells it out in FIM sentinels, as editors that template
    fill-in-the-middle themselves write it (Tabby's `prompt_template`, Continue's raw Ollama
    prompts, llama.vscode's OpenAI mode): `<fim_prefix>P<fim_suffix>S<fim_middle>M` (PSM) or
    `<fim_suffix>S<fim_prefix>P<fim_middle>M`, in StarCoder's sentinels or another family's
    (`TEMPLATE_MARKERS`). StarCoder's SPM spelling, `<fim_prefix><fim_suffix>S<fim_middle>P`,
    is the first with P empty and reads as prefix P. Text before the first marker is context
    (llama.vscode puts other files' code there) where the prompt ends at the middle marker;
    otherwise the prompt is not a template (a file that merely holds one template string).
    None for any other text: no marker, one twice, or `<fim_pad>`."""
    if FIM_PAD in text:
        return None
    for pre, suf, mid in TEMPLATE_MARKERS:
        if pre in text and suf in text and mid in text:
            return _read(text, pre, suf, mid)
    return None


def _read(text: str, pre: str, suf: str, mid: str) -> Cursor | None:
    """`read_template` for one family of markers."""
    if any(text.count(s) != 1 for s in (pre, suf, mid)):
        return None
    at = {s: text.index(s) for s in (pre, suf, mid)}
    if at[mid] < max(at[pre], at[suf]):
        return None

    def after(s: str, until: int) -> str:
        return text[at[s] + len(s):until]

    context, middle = text[: min(at[pre], at[suf])], after(mid, len(text))
    if context and middle:
        return None
    if at[pre] < at[suf]:  # PSM
        prefix, suffix = after(pre, at[suf]), after(suf, at[mid])
    else:
        suffix, prefix = after(suf, at[pre]), after(pre, at[mid])
    return Cursor(middle, suffix, "", context) if not prefix else Cursor(prefix, suffix, middle, context)


def back_off(text: str) -> tuple[str, str]:
    """(`text` less its trailing whitespace, that whitespace): the text before a cursor ends
    where a token the model knows how to follow ends; the whitespace is the model's to write."""
    m = _TRAILING_WHITESPACE.search(text)
    return (text, "") if m is None else (text[: m.start()], m.group())


SUFFIX_SHARE = 0.5
"""When the prefix and the suffix do not both fit, the suffix keeps at least this share of the
room; a short prefix leaves it more. Chosen by the removed lines' loss on held-out files of
the 12 languages (docs/bundled_model_heldout.md): a half beat an eighth, a quarter (llama.cpp's
/infill keeps prefix and suffix 3:1) and three quarters."""
CUT_BLOCK_CHARS = 4096
"""A long prefix is cut before tokenizing at a multiple of this many characters from its start."""


GUESS_CHARS_A_TOKEN = 8
"""Characters a token at most, as first guessed when cutting long code before tokenizing it
(code averages 3-4; a token may cover up to the tokenizer's longest, 64 characters in ours)."""


def around_cursor(prefix: str, suffix: str, room: int, chars_a_token: int) -> tuple[str, str]:
    """The text on either side of a cursor: the end of the prefix and the start of the suffix,
    each at least `room * chars_a_token` characters where it has them, so a 1 MB file is not
    tokenized whole for one completion.

    The prefix's cut lies at a multiple of CUT_BLOCK_CHARS: typing at the cursor leaves it in
    place, so the prefix's tokens stay the same but for the last ones, and a prompt cache
    keeps them (`fit` keeps the same property in tokens)."""
    most = max(0, room) * chars_a_token
    start = max(0, len(prefix) - most)
    return prefix[start - start % CUT_BLOCK_CHARS:], suffix[:most]


def encode_around_cursor(encode: Callable[[str], list[int]], prefix: str, suffix: str, room: int,
                         max_token_bytes: int) -> tuple[list[int], list[int], bool]:
    """The ids of the prefix and of the suffix (each tokenized on its own) near enough to the
    cursor to fill a prompt of `room` tokens, and whether either text was cut before
    tokenizing. A side is cut first at GUESS_CHARS_A_TOKEN characters a token; a side whose
    cut text gives `room` tokens or fewer (text denser in characters than guessed) is cut
    again where it surely reaches `room` tokens, `max_token_bytes` characters a token (no
    token covers more bytes, a character is at least one). The sure cut alone tokenized up
    to 64 characters a token of context a side: 0.2 s for a 2,048-token model at every
    keystroke in a long file."""
    guess = min(GUESS_CHARS_A_TOKEN, max_token_bytes)
    near_prefix, near_suffix = around_cursor(prefix, suffix, room, guess)
    prefix_ids, suffix_ids = encode(near_prefix), encode(near_suffix)
    # More than `room`: a cut text's first tokens may be split differently than in the whole
    # text, and `fit` then drops them.
    if len(prefix_ids) <= room and len(near_prefix) < len(prefix):
        near_prefix = around_cursor(prefix, "", room, max_token_bytes)[0]
        prefix_ids = encode(near_prefix)
    if len(suffix_ids) <= room and len(near_suffix) < len(suffix):
        near_suffix = around_cursor("", suffix, room, max_token_bytes)[1]
        suffix_ids = encode(near_suffix)
    return prefix_ids, suffix_ids, len(near_prefix) < len(prefix) or len(near_suffix) < len(suffix)


def cut_step(room: int) -> int:
    """The step, in tokens, in which cuts to fit `room` tokens move (room // 32, 8 at least):
    a cut that moves by one token a keystroke shifts every token after it, and a prompt cache
    then recomputes them all."""
    return max(8, room // 32)


def fit(prefix: Sequence[int], suffix: Sequence[int], room: int) -> tuple[list[int], list[int]]:
    """The prefix's and suffix's ids cut to `room` tokens in all, away from the cursor: the
    prefix loses its start, the suffix its end, as editors and llama.cpp's /infill cut them.

    The suffix keeps what the prefix leaves, and at least SUFFIX_SHARE of the room. Both
    cuts move in steps of `room // 32` tokens (8 at least): the prefix starts at an anchor of
    its content about that often (`_prefix_cut`; it may lose up to 4 steps more than it
    must), and the suffix keeps a multiple of the step (what the prefix leaves, rounded
    down). As the user types,
    the prefix grows at its end while its start, and the suffix's kept end, stay where they
    were for many keystrokes, so a prompt cache still holds all but the last tokens in
    either order (a cut moving by one token a keystroke would shift every token after it,
    and recompute them all: in SPM the whole prefix comes after the suffix's end)."""
    prefix, suffix, room = list(prefix), list(suffix), max(0, room)
    if len(prefix) + len(suffix) <= room:
        return prefix, suffix
    quantum = cut_step(room)
    left = max(0, room - len(prefix)) // quantum * quantum  # what the prefix leaves, in steps
    keep_suffix = min(len(suffix), max(int(room * SUFFIX_SHARE), left))
    least = len(prefix) - (room - keep_suffix)
    return prefix[_prefix_cut(prefix, least, quantum):], suffix[:keep_suffix]


ANCHOR_WIDTH = 3
"""Tokens whose hash marks a cut point of a long prefix (`_prefix_cut`)."""


def _marked(prefix: list[int], i: int, quantum: int) -> bool:
    """Whether the ANCHOR_WIDTH ids before position i hash to 0 modulo `quantum`."""
    if i < ANCHOR_WIDTH:
        return False
    h = 0x811C9DC5
    for t in prefix[i - ANCHOR_WIDTH : i]:  # FNV-1a, a token id a step: the same on every run and machine
        h = ((h ^ t) * 0x01000193) & 0xFFFFFFFF
    return (h ^ (h >> 16)) % quantum == 0


def _prefix_cut(prefix: list[int], least: int, quantum: int) -> int:
    """Where a prefix too long by `least` tokens starts: at the first anchor at or after
    `least` within 4 steps, else `least` rounded up to a step.

    An anchor is a marked position (`_marked`: one every `quantum` tokens on average) with
    no marked position in the half step before it, found by the code's content, not by its
    distance from where the editor's window starts. llama.vscode takes its window (256
    lines) again at each request, so a typed newline drops the window's first line: the cut
    then falls on the same code as before, and the prompt cache keeps the prompt. (A cut
    counted from the window's start moved with it, and the whole kept prefix was
    recomputed.) Typing moves `least` forward a token at a time, and the cut stays on its
    anchor until `least` passes it, about once a step. Repeated code (a run of one token,
    a table) marks every position of its period; the half step without marks before an
    anchor leaves one anchor at the start of such a stretch, so the cut does not follow
    `least` through it token by token. The fallback, past 4 steps without an anchor, is
    counted from the window's start, as before."""
    if least <= 0:
        return 0
    half = max(1, quantum // 2)
    last_mark = -half - 1  # the last marked position seen: none yet
    for i in range(max(0, least - half), min(len(prefix), least + 4 * quantum)):
        if _marked(prefix, i, quantum):
            if i >= least and i - last_mark > half:
                return i
            last_mark = i
    return -(-least // quantum) * quantum


def fit_around_cursor(encode: Callable[[str], list[int]], prefix: str, suffix: str, room: int,
                      max_token_bytes: int) -> tuple[list[int], list[int], bool]:
    """The ids of the prefix and of the suffix (each tokenized on its own) cut away from the
    cursor to `room` tokens in all (`encode_around_cursor`, then `fit`), and whether anything
    was left out. The one cut of the server's routes, `polycoder generate --suffix` and `eval
    infilling`, so the evaluation measures what editors and the command line get."""
    prefix_ids, suffix_ids, cut_text = encode_around_cursor(encode, prefix, suffix, room, max_token_bytes)
    kept_prefix, kept_suffix = fit(prefix_ids, suffix_ids, room)
    return kept_prefix, kept_suffix, cut_text or len(kept_prefix) < len(prefix_ids) or len(kept_suffix) < len(suffix_ids)


@dataclass(frozen=True)
class CursorIds:
    """The FIM prompt of a cursor between a prefix and a suffix (`cursor_ids`)."""

    ids: list[int]
    heal: str
    """The whitespace that ended the prefix, left out of the prompt for the model to write
    (`back_off`; `SamplingParams.heal`)."""
    cut: bool
    """The prefix's start or the suffix's end did not fit and was left out."""


def cursor_ids(encode: Callable[[str], list[int]], fim: FimIds, prefix: str, suffix: str, room: int, order: str,
               max_token_bytes: int) -> CursorIds:
    """The prompt, at most `room` tokens with the three sentinels, that asks a FIM model for
    the middle between `prefix` and `suffix`: the prefix without its trailing whitespace
    (`back_off`), both cut to fit away from the cursor (`fit_around_cursor`), laid out in
    `order` (`arrange`)."""
    kept, heal = back_off(prefix)
    prefix_ids, suffix_ids, cut = fit_around_cursor(encode, kept, suffix, max(0, room - 3), max_token_bytes)
    return CursorIds(arrange(fim, prefix_ids, [], suffix_ids, order), heal, cut)
