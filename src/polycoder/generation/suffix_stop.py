"""Where a completion at the cursor ends, from the code after the cursor (the suffix).

A model asked to fill the middle ends it with `<|endoftext|>` when it was trained to; an
untrained or weak one runs on and rewrites the code below the cursor, which the editor
then shows twice. Editors cut such runs themselves (Continue's "stop at similar line",
llama.cpp's `n_indent`); the server cuts them too, so that every client gets the same
answer and the row is freed as soon as the completion is known to be over.

The rule (`SuffixStop.of(prefix, suffix)`; no rule when the suffix is blank):

- cursor mid-line (code before it on its line, and after it: the suffix's first line):
  the completion is that one line: it ends before the first newline it generates. Where
  the line's end repeats the start of the rest of the line (an editor closed the bracket
  or wrote the `;` that the model writes too: `f(a, b)` before `)`), that repeat goes
  (as Cody's and Twinny's clients trim it), unless it would split a name or leave the
  line's brackets less balanced (`print(f(x)` before `)` keeps its `)`);
- cursor at the start of a line of code (nothing but indentation before it on its line):
  whole lines may go in above that code, so the completion is not one line. Its anchor is
  the code after the cursor on its line, stripped of surrounding whitespace; the completion
  ends before the first generated line whose stripped text equals the anchor (the model
  has started to write the code after the cursor), its line breaks kept and the cursor's
  indentation after the last (the code after the cursor moves down a line, indented as it
  was), or where a generated line ends with the anchor (`re` before `turn x;`, written as
  `return x;`: the text before it goes in on the cursor's line);
- otherwise (nothing but whitespace after the cursor on its line) the anchor is the
  suffix's first non-blank line, and the blank lines and newline before the generated copy
  of it go too (the suffix brings its own newline and blank lines);
- at the start of a line of code, a completion that the model ends after a line break gets
  the cursor's indentation after it (`ended`), as a cut before the code does;
- in both, a line counts once it is complete (a newline follows, or the sample ended);
  the first generated line counts only when the prefix's last line is blank (indentation
  only), since it otherwise continues code before the cursor;
- and, in the same lines, a model caught in a loop: a non-blank line written REPEATS times in
  a row ends the completion after its first copy (Continue's "stop at repeating lines", which
  editors apply themselves: a small model at the cursor loops where it should end the middle,
  and writes the same line to the token limit);
- in any mode, a loop within a line: a stretch of 2 to MAX_PERIOD characters written COPIES
  times in a row (`void *arg, void *arg, ...`, `req_req_req_...`) ends the completion after
  its first copy, as soon as the last copy is written. The stretch must hold something other
  than whitespace and more than one character (indentation and `=====` bars are not loops).
  A small model writes such a line until the token limit; a true middle rarely has one, and
  cutting it brings mid-line middles closer (docs/at_cursor_stop_rules.md, with the counts).

Text that a later token could still cut (trailing whitespace, a last line that could grow
into the anchor, the copies of a repeated line after the first) is held back from a stream
until it is safe, like a partial stop string.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

REPEATS = 3
"""A line written this many times in a row is a loop (Continue's MAX_REPEATS)."""
COPIES = 4
"""A stretch of a line written this many times in a row is a loop."""
MAX_PERIOD = 40
"""The longest stretch of a line that `COPIES` are counted of, in characters."""


@dataclass(frozen=True)
class SuffixStop:
    """The suffix-driven stop rule of one at-cursor completion."""

    single_line: bool
    """The cursor is mid-line: end at the first generated newline."""
    rest: str = ""
    """The rest of the cursor's line, without its surrounding whitespace (mid-line)."""
    before: str = ""
    """The character before the cursor (mid-line), where a name may go on."""
    balance: tuple[int, ...] = (0, 0, 0)
    """Openers minus closers of (), [] and {} on the cursor's line, before and after the
    cursor (mid-line): what the completion's line adds is judged against it."""
    anchor: str = ""
    """The suffix's first non-blank line, stripped (multi-line completions)."""
    first_line_counts: bool = False
    """The prefix's last line is blank, so the first generated line is a whole line."""
    indent: str = ""
    """The prefix's last line when `first_line_counts` (its indentation, which the first
    generated line continues): that line is compared with the next ones as indent + line."""
    line_start: bool = False
    """The cursor is at the start of a line of code (the anchor is that code): a cut keeps
    the line breaks before the cut line, since the suffix has none before its code."""
    repeats: int = REPEATS
    """Copies in a row that make a loop (0: no loop rule, the rule as it was before it)."""
    copies: int = COPIES
    """Copies in a row of a stretch of a line that make a loop within it (0: off)."""

    @classmethod
    def of(cls, prefix: str, suffix: str) -> SuffixStop | None:
        """The rule for a cursor between `prefix` and `suffix` (None when the suffix is blank)."""
        if not suffix.strip():
            return None
        rest_of_line, last = suffix.split("\n", 1)[0], prefix.rsplit("\n", 1)[-1]
        if rest_of_line.strip() and last.strip():
            return cls(single_line=True, rest=rest_of_line.strip(), before=prefix[-1:],
                       balance=_balance(last + rest_of_line))
        anchor = next(line.strip() for line in suffix.split("\n") if line.strip())
        return cls(single_line=False, anchor=anchor, first_line_counts=not last.strip(),
                   indent="" if last.strip() else last, line_start=bool(rest_of_line.strip()))

    def cut(self, text: str, final: bool, checked: int = 0) -> int | None:
        """Where `text` (the completion so far) ends under this rule, or None if it goes on.
        `final`: the sample has ended, so its last line is complete. `checked`: the length of
        the text this rule last judged, when it streams (it went on then, so no loop within a
        line was complete; only later ends are searched)."""
        loop = _loop_in_line(text, self.copies, checked) if self.copies else None
        if loop is None:
            return self._cut_by_lines(text, final)
        # The loop ends the completion where its last copy was written, unless the rule of the
        # lines had already ended it by then: the same answer streamed and whole.
        end, after_first_copy = loop
        earlier = self._cut_by_lines(text[:end], False)
        return after_first_copy if earlier is None else earlier

    def kept(self, text: str) -> str:
        """What this rule keeps of a finished completion `text` (read after the fact, as the
        evaluation and scripts read saved samples; streaming cuts at the same place)."""
        at = self.cut(text, True)
        return text if at is None else text[:at]

    def ended(self, text: str) -> str:
        """What a completion that the model ended itself (the end of the document) gets at its
        end: at the start of a line of code, after a last line break, the cursor's indentation,
        which the code after the cursor had and would otherwise lose (`x = 1\\n` above
        `    y = 2` leaves `y = 2` at the line's start)."""
        return self.indent if self.line_start and text.endswith("\n") else ""

    def _cut_by_lines(self, text: str, final: bool) -> int | None:
        """`cut` without the loop within a line."""
        if self.single_line:
            i = text.find("\n")
            if i < 0 and not final:
                return None
            line = text if i < 0 else text[:i]
            kept = len(line) - self._repeat_of_rest(line)
            return kept if i >= 0 or kept < len(line) else None
        for start, line, complete, run, second in self._whole_lines(text, final):
            if not complete:
                return None
            if line.strip() == self.anchor:
                return self._before(text, start)
            written = text[start:].split("\n", 1)[0].rstrip()
            if self.line_start and written.endswith(self.anchor):
                return start + len(written) - len(self.anchor)  # text, then the code after the cursor
            if self.repeats and run >= self.repeats:
                return self._before(text, second)  # a loop: only the first copy is kept
        return None

    def _before(self, text: str, start: int) -> int:
        """Where the completion ends when the line at `start` is cut: at a line start, with
        the line breaks before it and the cursor's indentation where the model wrote it, else
        without them and the whitespace before them."""
        if not self.line_start:
            return len(text[:start].rstrip())
        return start + len(self.indent) if start and text.startswith(self.indent, start) else start

    def _whole_lines(self, text: str, final: bool) -> Iterator[tuple[int, str, bool, int, int | None]]:
        """(start, line, complete, run, second) for each line the rule reads, in order: where
        it starts, its text, whether it is complete (a newline follows, or the sample ended),
        how many copies of this non-blank complete line end here in a row (1: a new line), and
        where the run's second copy starts (None when run is 1)."""
        if not self.first_line_counts and "\n" not in text:
            return  # no whole line yet
        start = 0 if self.first_line_counts else text.find("\n") + 1
        previous, run, second = None, 0, None
        while True:
            end = text.find("\n", start)
            line = text[start:] if end < 0 else text[start:end]
            complete = end >= 0 or final
            whole = self.indent + line if start == 0 else line
            if complete and line.strip() and whole == previous:
                run += 1
                second = start if run == 2 else second
            else:
                previous, run, second = whole, 1, None
            yield start, whole, complete, run, second
            if end < 0:
                return
            start = end + 1

    def _repeat_of_rest(self, line: str) -> int:
        """How many characters end `line` (the completion's one line) that repeat the start of
        the rest of the cursor's line and go: the longest such repeat that splits no name and
        leaves the line's brackets no less balanced (0: none)."""
        body = line.rstrip()
        whole = _off_balance(_plus(self.balance, _balance(line)))
        for k in _overlaps(body, self.rest):
            kept = body[:-k]
            if (_in_name((kept or self.before)[-1:]) and _in_name(self.rest[0])) or \
                    (k < len(self.rest) and _in_name(self.rest[k - 1]) and _in_name(self.rest[k])):
                continue  # would split a name
            if _off_balance(_plus(self.balance, _balance(kept))) <= whole:
                return len(line) - len(kept)
        return 0

    def held_back(self, text: str) -> int:
        """How many trailing characters of `text` a later token could still cut."""
        looping = _copies_after_the_first(text) if self.copies else 0
        return max(looping, self._held_back_by_lines(text))

    def _held_back_by_lines(self, text: str) -> int:
        if self.single_line:  # the newline and after are never emitted; a repeat of the rest may yet go
            line = text.split("\n", 1)[0]
            body = line.rstrip()
            return len(line) - len(body) + next(_overlaps(body, self.rest), 0) if "\n" not in text else 0
        line_start = text.rfind("\n") + 1
        keep = len(text) if self.line_start else len(text.rstrip())
        if line_start == 0 and not self.first_line_counts:
            return len(text) - keep
        last = text[line_start:]
        if last.strip() and self.anchor.startswith(last.strip()):
            keep = min(keep, self._before(text, line_start))  # the last line may yet equal the anchor
        if self.line_start:  # ... or end with it
            keep = min(keep, len(text) - next(_overlaps(last, self.anchor), 0))
        # A loop is cut from its second copy on, so copies after the first wait (the next may
        # make a loop), and so does a last line that may yet become the second copy.
        whole = [(line, run, second) for _, line, done, run, second in self._whole_lines(text, False) if done]
        if self.repeats and whole and whole[-1][1] >= 2:
            keep = min(keep, self._before(text, whole[-1][2]))
        elif whole and whole[-1][0].strip() and last and whole[-1][0].startswith(last):
            keep = min(keep, self._before(text, line_start))
        return len(text) - keep


_BRACKETS = ("()", "[]", "{}")


def _loops(unit: str) -> bool:
    """Whether a stretch repeated within a line counts as a loop: more than whitespace and
    more than one character (indentation, `=====` and `----` bars do not)."""
    return len(set(unit)) > 1 and not unit.isspace()


def _periods(text: str, end: int, most: int) -> Iterator[int]:
    """Each period p from 2 to `most`, shortest first, for which text[end - 1] is also
    text[end - 1 - p] (found by `str.rfind`: this runs for every token of every row)."""
    if end < 3:
        return
    last, at, lo = text[end - 1], end - 2, max(0, end - 1 - most)  # period 2 first: before end - 2
    while (at := text.rfind(last, lo, at)) >= 0:
        yield end - 1 - at


def _loop_in_line(text: str, copies: int, checked: int = 0) -> tuple[int, int] | None:
    """(where the first loop within a line of `text` is complete, where its first copy ends):
    the earliest end of a stretch of 2 to MAX_PERIOD characters, no line break among them,
    written `copies` times in a row (the shortest such stretch there); None when there is
    none. Only ends after `checked` are searched (none ends before it)."""
    for end in range(max(checked + 1, 2 * copies), len(text) + 1):
        last = text[end - 1]
        if last == "\n":
            continue
        for period in _periods(text, end, min(MAX_PERIOD, end // copies)):
            start = end - copies * period
            if text[start: end - period] != text[start + period: end]:
                continue  # not `copies` copies of the last `period` characters
            if "\n" not in text[start:end] and _loops(text[end - period: end]):
                return end, start + period
    return None


def _copies_after_the_first(text: str) -> int:
    """How many characters end `text` that repeat the stretch before them, after its first
    copy: a loop within the line may yet be completed, and then cut after that copy. (Mostly
    a few characters: text repeats itself a little everywhere.)"""
    held = 0
    for period in _periods(text, len(text), MAX_PERIOD):
        run = 0  # characters at the end equal to the one `period` before them
        while run < len(text) - period and text[-1 - run] == text[-1 - run - period] and text[-1 - run] != "\n":
            run += 1
        first = text[len(text) - run - period: len(text) - run]
        if run and "\n" not in first and _loops(first):
            held = max(held, run)
    return held


def _overlaps(text: str, code: str) -> Iterator[int]:
    """Each k, longest first, for which `text` ends with the first k characters of `code`
    (only where its first character matches is the whole compared: a line of minified code
    after the cursor costs no more than the completion's length a token)."""
    for k in range(min(len(text), len(code)), 0, -1):
        if text[-k] == code[0] and text.endswith(code[:k]):
            yield k


def _balance(text: str) -> tuple[int, ...]:
    """Openers minus closers of each bracket pair in `text`."""
    return tuple(text.count(pair[0]) - text.count(pair[1]) for pair in _BRACKETS)


def _plus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b))


def _off_balance(balance: tuple[int, ...]) -> int:
    return sum(abs(b) for b in balance)


def _in_name(ch: str) -> bool:
    return ch.isalnum() or ch == "_"
