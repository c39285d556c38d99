"""Line breaks at the cursor: the model reads LF, the editor gets its document's own.

Code corpora are mostly LF, so a model reads a file with Windows line breaks (CRLF,
`\\r\\n`) as rarer text, and one trained on our corpus reads it as a hint of the language:
there, CRLF is mostly C#, JavaScript and TypeScript, and none of the C++, so in a C++ file
with CRLF the bundled model wrote C# (`namespace System.Linq.Expressions`). Tabby (issue
#3279) and Cody's autocomplete found the same and convert too.

So every route that completes at a cursor (the server's three, `polycoder generate
--suffix`, `eval infilling`) gives the model the code around the cursor with CRLF read as
LF (`lf_around_cursor`), and writes the model's line breaks as the document's at the cursor
(`written`; `SamplingParams.eol`). A lone `\\r` (classic Mac) is left as it is. What it
changed on held-out files of CRLF: docs/bundled_model_heldout.md.
"""

from __future__ import annotations

CRLF = "\r\n"
LF = "\n"


def cursor_line_break(prefix: str, suffix: str) -> str:
    """The document's line break at a cursor: that of the line the cursor is on (the suffix's
    first line break), else the prefix's last one, else LF."""
    i = suffix.find(LF)
    if i > 0 or (i == 0 and prefix):
        return CRLF if (suffix[i - 1] if i > 0 else prefix[-1]) == "\r" else LF
    j = prefix.rfind(LF)
    return CRLF if j > 0 and prefix[j - 1] == "\r" else LF


def to_lf(text: str) -> str:
    """`text` with every CRLF read as LF."""
    return text.replace(CRLF, LF) if "\r" in text else text


def lf_around_cursor(prefix: str, suffix: str) -> tuple[str, str, str]:
    """(prefix, suffix) as the model reads them, with CRLF as LF, and the document's line break
    at the cursor, for the output (`written`)."""
    return to_lf(prefix), to_lf(suffix), cursor_line_break(prefix, suffix)


def written(text: str, eol: str) -> str:
    """The model's `text` with its line breaks (LF, or CRLF where it wrote them) as `eol`."""
    text = to_lf(text)
    return text.replace(LF, eol) if eol != LF else text
