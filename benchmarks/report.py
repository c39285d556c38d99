"""How a benchmark hands over its figures: the table on stdout, and with --json the results
as JSON and the same table as Markdown beside it (FILE.json, FILE.md)."""

from __future__ import annotations

import json
from pathlib import Path


def publish(results: dict, text: str, json_path: Path | None) -> None:
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        json_path.with_suffix(".md").write_text(text)
