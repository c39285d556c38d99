"""Where a completion at the cursor ends, from the code after the cursor (the suffix).

A model asked to fill the middle ends it with `<|endoftext|>` when it was trained to; an
untrained or weak one runs on and rewrites the code below the cursor, which the editor
then shows twice. Editors cut such runs themselves (Continue's "stop at similar line",
llama.cpp's `n_indent`); the server cuts them too, so that every client gets the same
answer and the row is freed as soon as the completion is known to be over.

The rule (`SuffixStop.of(prefix, suffix)`; no rule when the suffix is blank):

- cursor mid-line (the suffix's first line, the rest of the cursor's line, holds code):
  the completion is that one line: it ends before the first newline it generates;
- otherwise the anchor is the suffix's first non-blank line, stripped of surrounding
  whitespace. The completion ends before the first generated line whose stripped text
  equals the anchor (the model has started to repeat the code below), and the blank
  lines and newline before that line go too (the suffix brings its own newline and blank
  lines). A line counts once it is complete (a newline follows, or the sample ended);
  the first generated line counts only when the prefix's last line is blank (indentation
  only), since it otherwise continues code before the cursor.

Text that a later token could still cut (trailing whitespace, a last line that could grow
into the anchor) is held back from a stream until it is safe, like a partial stop string.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SuffixStop:
    """The suffix-driven stop rule of one at-cursor completion."""

    single_line: bool
    """The cursor is mid-line: end at the first generated newline."""
    anchor: str = ""
    """The suffix's first non-blank line, stripped (multi-line completions)."""
    first_line_counts: bool = False
    """The prefix's last line is blank, so the first generated line is a whole line."""

    @classmethod
    def of(cls, prefix: str, suffix: str) -> SuffixStop | None:
        """The rule for a cursor between `prefix` and `suffix` (None when the suffix is blank)."""
        if not suffix.strip():
            return None
        rest_of_line = suffix.split("\n", 1)[0]
        if rest_of_line.strip():
            return cls(single_line=True)
        anchor = next(line.strip() for line in suffix.split("\n") if line.strip())
        return cls(single_line=False, anchor=anchor, first_line_counts=not prefix.rsplit("\n", 1)[-1].strip())

    def cut(self, text: str, final: bool) -> int | None:
        """Where `text` (the completion so far) ends under this rule, or None if it goes on.
        `final`: the sample has ended, so its last line is complete."""
        if self.single_line:
            i = text.find("\n")
            return i if i >= 0 else None
        start = 0 if self.first_line_counts else text.find("\n") + 1
        if start == 0 and not self.first_line_counts:
            return None  # no whole line yet
        while True:
            end = text.find("\n", start)
            if end < 0 and not final:
                return None
            line = text[start:] if end < 0 else text[start:end]
            if line.strip() == self.anchor:
                return len(text[:start].rstrip())
            if end < 0:
                return None
            start = end + 1

    def held_back(self, text: str) -> int:
        """How many trailing characters of `text` a later token could still cut."""
        if self.single_line:
            return 0  # a cut only ever drops text from the newline on, which is never emitted
        keep = len(text.rstrip())
        line_start = text.rfind("\n") + 1
        if line_start == 0 and not self.first_line_counts:
            return len(text) - keep
        last = text[line_start:]
        if last.strip() and self.anchor.startswith(last.strip()):
            keep = min(keep, len(text[:line_start].rstrip()))  # the last line may yet equal the anchor
        return len(text) - keep
