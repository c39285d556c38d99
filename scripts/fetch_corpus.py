#!/usr/bin/env python3
"""Kept for old commands: `scripts/fetch_corpus.py ARGS` is `polycoder data fetch ARGS`.

The corpus fetch is the verb `polycoder data fetch` (code in `polycoder.data.fetch`, the
pinned manifest in `src/polycoder/data/fetch/corpus_manifest.json`); this file only passes
its arguments on, so the old spelling keeps working.
"""

import sys
from pathlib import Path

try:
    from polycoder.cli import main
except ModuleNotFoundError:  # run from a checkout without `pip install`: use its src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from polycoder.cli import main

if __name__ == "__main__":
    main(["data", "fetch", *sys.argv[1:]])
