"""What cutting long code before tokenizing costs a request at the cursor: the time to
tokenize the text on either side of a cursor in a long file, cut at the sure bound alone
(the tokenizer's longest token, 64 characters, a token of room) against a first guess of 8
characters a token (`polycoder.fim.encode_around_cursor`, which falls back on the sure bound
where the guess gives too few tokens).

The file is this repository's Python source, joined into one text (about 1 MB), the cursor
at its middle; the bundled tokenizer. Rooms: the bundled model's and a 2,048-token
PolyCoder's, less 64 new tokens and the sentinels. Calls of the two alternate, best of
--repeats each.

    python benchmarks/cursor_cut.py --json docs/benchmarks/cursor-cut-DATE.json

Writes JSON (and Markdown next to it); prints a table. Nothing here is asserted; the tests
are in tests/test_serve_infill.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from machine import cpu_description, cpu_line
from report import publish

from polycoder.fim import around_cursor, encode_around_cursor
from polycoder.locate import BUNDLED_DIR
from polycoder.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rooms", default="445,1981")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    tok = Tokenizer.from_pretrained(BUNDLED_DIR)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "src").rglob("*.py")))
    prefix, suffix = text[: len(text) // 2], text[len(text) // 2:]

    def sure(room: int) -> tuple[list[int], list[int]]:
        near_prefix, near_suffix = around_cursor(prefix, suffix, room, tok.max_token_bytes)
        return tok.encode(near_prefix), tok.encode(near_suffix)

    def guessed(room: int) -> tuple[list[int], list[int]]:
        return encode_around_cursor(tok.encode, prefix, suffix, room, tok.max_token_bytes)[:2]

    rows = []
    for room in (int(r) for r in args.rooms.split(",")):
        best = {"sure bound": float("inf"), "guess first": float("inf")}
        tokens = {}
        for _ in range(args.repeats):
            for name, fn in (("sure bound", sure), ("guess first", guessed)):
                start = time.perf_counter()
                p, s = fn(room)
                best[name] = min(best[name], time.perf_counter() - start)
                tokens[name] = len(p) + len(s)
        rows.append({"room": room, "sure_ms": best["sure bound"] * 1e3, "guess_ms": best["guess first"] * 1e3,
                     "sure_tokens": tokens["sure bound"], "guess_tokens": tokens["guess first"],
                     "speedup": best["sure bound"] / best["guess first"]})

    lines = [f"# Cutting code around the cursor before tokenizing ({len(text):,} characters, cursor at the middle)", "",
             f"CPU: {cpu_line()}", "",
             "| room (tokens) | sure bound: ms | tokens | guess first: ms | tokens | speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['room']} | {r['sure_ms']:.1f} | {r['sure_tokens']:,} | {r['guess_ms']:.1f} | "
              f"{r['guess_tokens']:,} | {r['speedup']:.1f}x |" for r in rows]
    publish({"cpu": cpu_description(), "characters": len(text), "repeats": args.repeats, "rows": rows},
            "\n".join(lines) + "\n", args.json)


if __name__ == "__main__":
    main()
