"""Do the at-cursor stop rules help? The same greedy middles, read with and without each rule.

Cursors are placed in held-out files (the tree `eval perplexity` reads; --max-files files a
language, seeded by --seed, the file's language and SHA-256) as an editor places them:

- `closer`: mid-line, before the run of closing brackets, `;` `,` `:` that ends a line
  (what an editor's auto-closing leaves after the cursor: `f(a, b|)`); the middle is a
  random stretch of the line up to that run;
- `mid-line`: mid-line at random, the middle a random stretch of the line;
- `line-start`: at the start of a line of code, the middle 2-4 whole lines inserted above it;
- `new-line`: on a line of its own (the suffix starts with a line break), the middle 2-4
  lines.

Files are read with CRLF as LF, as the server gives code to the model at the cursor
(`polycoder.line_breaks`; the rules read the model's text, with LF). Each cursor's FIM prompt
is built as the server builds it (`polycoder.fim.cursor_ids`, SPM) and one greedy middle
is drawn, ended only by EOD, a FIM sentinel or --max-new-tokens.
That raw text is then read as it is (`raw`), under the rules as they were until 2026-12-03
(`before`: one line wherever code follows the cursor on its line; else until a line equal to
the suffix's first line), as they were then made (`lines`: mid-line, less an end that
repeats the rest of the line; at the start of a line of code, lines up to that code; in
lines, a line written three times cut after its first copy) and as they are (`now`: also a
loop within a line cut after its first copy). `SuffixStop.cut` on the finished text is where the streamed
completion would have ended: the rules only cut, and a greedy sample does not depend on
where it is cut. Each reading is scored against the true middle (exact match and edit
similarity, `eval infilling`'s); `lines` minus `before` and `now` minus `lines` with a 95 %
paired bootstrap and the share of middles each change moved. Prints a table, writes JSON.

    .venv/bin/python scripts/suffix_stop_effect.py --data RAW/heldout --max-files 40 --out stop_effect.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from polycoder.checkpoint import load
from polycoder.eval.infilling_report import paired_interval
from polycoder.eval.infilling_tasks import MAX_LINE_CHARS, edit_similarity, exact_match
from polycoder.eval.perplexity import read_documents
from polycoder.fim import cursor_ids
from polycoder.generation import SamplingParams, generate
from polycoder.generation.suffix_stop import SuffixStop
from polycoder.line_breaks import to_lf
from polycoder.options import ModelOptions

CLOSERS = re.compile(r"[)\]};,:]+\s*$")
KINDS = ("closer", "mid-line", "line-start", "new-line")
COMPARED = ("before", "lines")
"""The readings whose next one is compared with them (raw is the model's text, no rule)."""


def cursors(text: str, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(kind, prefix, middle, suffix) of one cursor of each kind that the file allows."""
    lines = text.split("\n")
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    out = []
    usable = [i for i, line in enumerate(lines) if 4 <= len(line.strip()) and len(line) <= MAX_LINE_CHARS]
    closing = [i for i in usable if CLOSERS.search(lines[i])]
    for kind, pool in (("closer", closing), ("mid-line", usable)):
        if not pool:
            continue
        i = rng.choice(pool)
        line, indent = lines[i], len(lines[i]) - len(lines[i].lstrip())
        end = CLOSERS.search(line).start() if kind == "closer" else rng.randint(indent + 1, len(line.rstrip()) - 1)
        if end <= indent:
            continue
        a = rng.randint(indent, end - 1)
        b = end if kind == "closer" else rng.randint(a + 1, end)
        if not line[b:].strip():
            continue  # the rest of the line must hold code
        at = starts[i]
        out.append((kind, text[: at + a], text[at + a: at + b], text[at + b:]))
    blocks = [i for i in usable if i + 5 < len(lines)]
    for kind in ("line-start", "new-line"):
        i = rng.choice(blocks) if blocks else None
        n = rng.randint(2, 4)
        if i is None or not lines[i + n].strip():
            continue  # line-start: code after the cursor; new-line: the same lines, the break left after
        end = starts[i + n] - (kind == "new-line")
        out.append((kind, text[: starts[i]], text[starts[i]: end], text[end:]))
    return out


def before(prefix: str, suffix: str, text: str) -> str:
    """`text` read by the rules as they were until 2026-12-03: one line wherever code
    followed the cursor on its line, else up to a line equal to the suffix's first line."""
    if suffix.split("\n", 1)[0].strip():
        return text.split("\n", 1)[0]
    rule = SuffixStop.of(prefix, suffix)
    return read(rule and replace(rule, repeats=0, copies=0), text)  # no loop rules then


def read(rule: SuffixStop | None, text: str) -> str:
    return text if rule is None else rule.kept(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="held-out files, one sub-folder a language")
    ap.add_argument("--model", default=None, help="a model folder or preset (default: the bundled model)")
    ap.add_argument("--max-files", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("suffix_stop_effect.json"))
    args = ap.parse_args()
    model, tok = load(ModelOptions(model=args.model))
    tasks = []
    for doc in read_documents(args.data, None, args.max_files):
        rng = random.Random(f"{args.seed}|{doc.language}|{doc.sha256}")
        tasks += [(doc.language, *c) for c in cursors(to_lf(doc.text), rng)]
    room = model.config.block_size - args.max_new_tokens
    prompts = [cursor_ids(tok.encode, tok.fim, p, s, room, "spm", tok.max_token_bytes) for _, _, p, _, s in tasks]
    raw = [""] * len(tasks)
    by_heal = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_heal[prompt.heal].append(i)
    for heal, idx in by_heal.items():
        params = SamplingParams(max_new_tokens=args.max_new_tokens, stop_ids=tok.fim.all, heal=heal)
        for i, [c] in zip(idx, generate(model, tok, [prompts[i].ids for i in idx], params)):
            raw[i] = c.text
    rows = []
    for (language, kind, prefix, middle, suffix), text in zip(tasks, raw):
        rule = SuffixStop.of(prefix, suffix)
        read_as = {"raw": text, "before": before(prefix, suffix, text),
                   "lines": read(rule and replace(rule, copies=0), text), "now": read(rule, text)}
        rows.append({"language": language, "kind": kind, "middle": middle, "text": text, "read": read_as,
                     "scores": {k: [exact_match(v, middle), edit_similarity(v, middle)] for k, v in read_as.items()}})
    summary = {}
    print(f"{len(rows)} cursors, {args.max_new_tokens} new tokens at most; exact match / edit similarity, % "
          "(a reading minus the one above it: mean [95 %]; share of middles it moved)")
    print("| cursor | n | reading | exact | edit sim | edit sim gain [95 %] | changed |")
    print("|---|---:|---|---:|---:|---|---:|")
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        readings = list(mine[0]["scores"])
        entry = {}
        for old, reading in zip([None, *readings], readings):
            exact = 100 * statistics.fmean(r["scores"][reading][0] for r in mine)
            sim = 100 * statistics.fmean(r["scores"][reading][1] for r in mine)
            entry[reading] = {"exact": exact, "edit_similarity": sim}
            gain = changed = ""
            if old in COMPARED:
                diff = [100 * (r["scores"][reading][1] - r["scores"][old][1]) for r in mine]
                lo, hi = paired_interval(diff, random.Random(0))
                moved = sum(r["read"][reading] != r["read"][old] for r in mine) / len(mine)
                entry[reading]["gain"] = {"edit_similarity": statistics.fmean(diff), "interval": [lo, hi],
                                          "changed": moved}
                gain, changed = f"{statistics.fmean(diff):+.2f} [{lo:+.2f}, {hi:+.2f}]", f"{100 * moved:.1f} %"
            print(f"| {kind} | {len(mine)} | {reading} | {exact:.2f} | {sim:.2f} | {gain} | {changed} |")
        summary[kind] = entry
    args.out.write_text(json.dumps({"settings": vars(args) | {"data": str(args.data), "out": str(args.out)},
                                    "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
