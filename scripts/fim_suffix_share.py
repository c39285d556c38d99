"""Which share of a cut FIM prompt should the suffix keep? The removed lines' loss, share by share.

`eval infilling`'s held-out lines (the same selection: --max-files files a language,
--lines-per-file lines each, --seed) are scored by the loss of the removed line after the
prefix alone and after the FIM prompt cut with each `polycoder.fim.SUFFIX_SHARE` given
(`polycoder.eval.infilling_sources.score_middles`, SPM), for one model; prints the mean losses, the
gain over prefix-only per language, and paired bootstrap intervals of each share against
the best. docs/bundled_model_heldout.md ("How much of the context the suffix gets") chose
the share this way.

    .venv/bin/python scripts/fim_suffix_share.py --data RAW/heldout --shares 0.125 0.25 0.5 0.75
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import polycoder.fim as fim
from polycoder.eval.infilling_report import paired_interval
from polycoder.eval.infilling_sources import LoadOnce, score_middles
from polycoder.eval.infilling_tasks import line_tasks
from polycoder.eval.perplexity import read_documents
from polycoder.options import ModelOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="held-out files, one sub-folder a language")
    ap.add_argument("--model", default=None, help="a model folder or preset (default: the bundled model)")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.125, 0.25, 0.5, 0.75])
    ap.add_argument("--max-files", type=int, default=40)
    ap.add_argument("--lines-per-file", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tasks = line_tasks(read_documents(args.data, None, args.max_files), args.lines_per_file, args.seed)
    model = LoadOnce(ModelOptions(model=args.model))  # loaded once for every share
    base = score_middles(model, "spm", [(t, "prefix-only") for t in tasks])
    losses = {}
    for share in args.shares:
        fim.SUFFIX_SHARE = share  # read by polycoder.fim.fit at each call
        losses[share] = score_middles(model, "spm", [(t, "fim") for t in tasks])
    languages = sorted({t.language for t in tasks})
    print(f"{len(tasks)} lines; loss after the prefix alone {statistics.fmean(base):.4f}")
    print("| share | loss after FIM | gain | " + " | ".join(languages) + " |")
    for share, v in losses.items():
        per = [statistics.fmean(b - x for b, x, t in zip(base, v, tasks) if t.language == lang) for lang in languages]
        print(f"| {share:g} | {statistics.fmean(v):.4f} | {statistics.fmean(base) - statistics.fmean(v):+.4f} | "
              + " | ".join(f"{g:+.3f}" for g in per) + " |")
    best = min(losses, key=lambda s: statistics.fmean(losses[s]))
    for share, v in losses.items():
        if share != best:
            diff = [x - y for x, y in zip(v, losses[best])]
            lo, hi = paired_interval(diff, random.Random(0))
            print(f"share {share:g} minus {best:g}: {statistics.fmean(diff):+.4f} nats [{lo:+.4f}, {hi:+.4f}]")


if __name__ == "__main__":
    main()
