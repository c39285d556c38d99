"""How a benchmark hands over its figures: the table on stdout, and with --json the results
as JSON and the same table as Markdown beside it (FILE.json, FILE.md).

The files are for the repository's docs, so this machine's own places are written as
places anyone has: the repository's root as a relative path, Python's standard library as
<stdlib>, the home folder as ~ (the printed table keeps them as they are)."""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def portable(text: str) -> str:
    """`text` with this machine's repository, standard library and home folder paths made
    relative or named (longest first, so the repository inside the home folder stays
    relative); a path is matched whole, up to a separator, never as the start of a longer name."""
    places = [(str(REPO), "."), (sysconfig.get_paths()["stdlib"], "<stdlib>"), (str(Path.home()), "~")]
    for path, name in sorted(places, key=lambda p: -len(p[0])):
        if len(path) > 1:
            if name == ".":  # files in the repository read as relative paths: src/..., not ./src/...
                text = re.sub(re.escape(path) + "/", "", text)
            text = re.sub(re.escape(path) + r"(?![\w.-])", name, text)
    return text


def publish(results: dict, text: str, json_path: Path | None) -> None:
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(portable(json.dumps(results, indent=2)) + "\n")
        json_path.with_suffix(".md").write_text(portable(text))
