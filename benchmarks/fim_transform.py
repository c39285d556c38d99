"""What the fill-in-the-middle transform costs the data loader: tokens a second of windows
drawn plain and with the transform at two rates, on this repository's own source files.

The documents are the repository's Python files, tokenized with the bundled tokenizer plus
the FIM sentinels and packed with EOD between them (as `polycoder data tokenize` and
`finetune` do); each row of the table draws `--steps` batches of `--batch` windows of
`--seq-len` tokens from `polycoder.train.loader.WindowLoader` (random order). The transform
runs on one process's rows only, so divide the batch by the number of processes to read off
one rank's share.

    python benchmarks/fim_transform.py --json docs/benchmarks/fim-transform-DATE.json

Writes JSON (and Markdown next to it); prints a table. Nothing here is asserted; the tests
are tests/test_fim_train.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from machine import cpu_description
from report import publish

from polycoder.locate import BUNDLED_DIR
from polycoder.tokenizer import Tokenizer
from polycoder.train.fim_transform import FimTransform
from polycoder.train.loader import WindowLoader

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    tok = Tokenizer.from_pretrained(BUNDLED_DIR).with_fim_tokens()
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "src").rglob("*.py"))]
    stream = np.concatenate([np.asarray(ids + [tok.eod_id], dtype=np.uint16) for ids in tok.encode_batch(texts)])
    rows = []
    for label, rate in (("plain", 0.0), ("FIM rate 0.5", 0.5), ("FIM rate 1.0", 1.0)):
        transform = FimTransform(tok, rate, 0.5, seed=0) if rate else None
        loader = WindowLoader([stream], args.seq_len, args.batch, "random", 0, transform=transform)
        loader.global_batch(0)  # warm-up
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            loader.global_batch(step)
        seconds = time.perf_counter() - t0
        tokens = args.steps * args.batch * args.seq_len
        rows.append({"loader": label, "fim_rate": rate, "tokens_per_s": tokens / seconds,
                     "ms_per_batch": 1000 * seconds / args.steps})
    results = {"cpu": cpu_description(), "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps,
               "stream_tokens": int(len(stream)), "rows": rows}
    text = (f"# FIM transform cost ({results['cpu']['model']}; {len(stream):,} tokens of this repository's "
            f"Python files; batches of {args.batch} x {args.seq_len})\n\n"
            "| loader | tokens/s | ms a batch |\n|---|---:|---:|\n"
            + "".join(f"| {r['loader']} | {r['tokens_per_s']:,.0f} | {r['ms_per_batch']:.1f} |\n" for r in rows))
    publish(results, text, args.json)


if __name__ == "__main__":
    main()
