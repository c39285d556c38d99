"""`polycoder data split` (no repository straddles splits) and `polycoder data overlap` (contamination)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_data_fixtures import c_like, python_code

from polycoder.corpus import iter_documents
from polycoder.data.collect import collect
from polycoder.data.overlap import overlap
from polycoder.data.split import assign_repositories, split, split_warnings


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    for r in range(12):
        repo = root / "src" / "org" / f"repo{r:02d}"
        repo.mkdir(parents=True)
        for i in range(3 + r % 4):
            (repo / f"m{i}.py").write_text(python_code(1000 + 10 * r + i))
    collect([str(root / "src")], root / "corpus", workers=1, repo_depth=2)
    return root


@pytest.fixture(scope="module")
def few_repositories(tmp_path_factory):
    """The README's small fetch in miniature: Python in one repository, C in two uneven ones."""
    root = tmp_path_factory.mktemp("few")
    for repo, n, make in (("py", 25, lambda i: python_code(5000 + i)), ("c_big", 20, lambda i: c_like(6000 + i, "C")),
                          ("c_small", 4, lambda i: c_like(7000 + i, "C"))):
        d = root / "src" / "org" / repo
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"f{i}.{'py' if repo == 'py' else 'c'}").write_text(make(i))
    collect([str(root / "src")], root / "corpus", workers=1, repo_depth=2, near_dedup=False)
    return root / "corpus"


def _split_cli(corpus, out, *args):
    r = subprocess.run([sys.executable, "-m", "polycoder", "data", "split", str(corpus), "--out", str(out), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r, json.loads((out / "split.json").read_text())


def test_empty_or_lopsided_split_is_warned_with_the_fix(few_repositories, tmp_path):
    r, s = _split_cli(few_repositories, tmp_path / "s")
    assert s["splits"]["valid"] == {} and s["split_by_file"] == []
    c_test = s["splits"]["test"]["C"]["files"]
    assert c_test in (4, 20)  # one whole repository: 17 % or 83 % for a 1 % split
    assert s["warnings"] == [
        "the valid split is empty (asked for 0.10% of each language's files); "
        "`polycoder train` will measure no validation loss",
        f"C: test holds {c_test} of 24 files ({c_test / 24:.0%}; asked for 1.00%): 2 repositories are too few or "
        "too uneven to split by repository; pass --by-file-below 3 to split C by file (its files then share "
        "repositories across splits), add repositories, or try another --seed"]
    assert r.stderr.splitlines() == [f"warning: {w}" for w in s["warnings"]]
    md = (tmp_path / "s" / "split.md").read_text()
    assert "## Warnings" in md and "--by-file-below 3" in md


def test_by_file_below_splits_small_languages_by_file(few_repositories, tmp_path):
    r, s = _split_cli(few_repositories, tmp_path / "s", "--by-file-below", "3")
    assert s["split_by_file"] == ["C", "Python"] and s["warnings"] == [] and r.stderr == ""
    for lang, n in (("Python", 25), ("C", 24)):
        assert [s["splits"][name][lang]["files"] for name in ("train", "valid", "test")] == [n - 2, 1, 1]
    py_repos = {name: {d["repo"] for d in iter_documents(tmp_path / "s", name) if d["language"] == "Python"}
                for name in ("train", "valid", "test")}
    assert py_repos["train"] == py_repos["test"] == {"org/py"}  # the cost of splitting by file
    assert "Split by file" in (tmp_path / "s" / "split.md").read_text()
    assert "--by-file-below" in subprocess.run([sys.executable, "-m", "polycoder", "data", "split", "--help"],
                                               capture_output=True, text=True, timeout=60).stdout
    # fewer than 2 repositories: Python only; C stays by repository, and still warned about
    _, two = _split_cli(few_repositories, tmp_path / "t", "--by-file-below", "2")
    assert two["split_by_file"] == ["Python"] and [w[:2] for w in two["warnings"]] == ["C:"]


def test_far_from_the_fraction_means_off_by_half_of_it_and_5_points():
    def warned(test_files: int, total: int, frac: float) -> bool:
        splits = {"train": {"Go": {"files": total - test_files}}, "valid": {}, "test": {"Go": {"files": test_files}}}
        return any(w.startswith("Go:") for w in split_warnings(splits, {"valid": 0.0, "test": frac}, {"Go": 9}, set()))

    assert not warned(29, 100, 0.2) and warned(31, 100, 0.2) and warned(9, 100, 0.2)  # 20 %: 10-30 % is near
    assert not warned(6, 100, 0.01) and warned(7, 100, 0.01)  # 1 %: up to 6 %
    assert warned(161, 213, 0.01)  # the lopsided C split
    # the README's small fetch: one repository, 213 files, a test fraction asking for 2
    one = split_warnings({"train": {"C": {"files": 213}}, "valid": {}, "test": {}}, {"valid": 0.001, "test": 0.01},
                         {"C": 1}, set())
    assert one[-1] == ("C: test has no files (asked for 1.00% of 213): one repository cannot be split by repository; "
                       "pass --by-file-below 2 to split C by file (its files then share repositories across splits), "
                       "or add repositories")


def test_repositories_never_straddle_splits(corpus, tmp_path):
    s = split(corpus / "corpus", tmp_path / "s", valid_fraction=0.1, test_fraction=0.2, seed=0, heldout_per_language=3)
    repos = {name: {d["repo"] for d in iter_documents(tmp_path / "s", name)} for name in ("train", "valid", "test")}
    assert repos["train"] and repos["valid"] and repos["test"]
    assert not (repos["train"] & repos["test"]) and not (repos["train"] & repos["valid"]) and not (repos["valid"] & repos["test"])
    total = sum(len(v) for v in repos.values())
    assert total == 12
    held = list(iter_documents(tmp_path / "s" / "heldout"))
    assert len(held) == 3 == s["heldout_files"]["Python"]
    assert {d["repo"] for d in held} <= repos["test"]
    n_files = {name: sum(1 for _ in iter_documents(tmp_path / "s", name)) for name in ("train", "valid", "test")}
    assert sum(n_files.values()) == sum(1 for _ in iter_documents(corpus / "corpus"))
    assert len((tmp_path / "s" / "test" / "index.tsv").read_text().splitlines()) == n_files["test"]


def test_split_is_seeded(corpus, tmp_path):
    a = split(corpus / "corpus", tmp_path / "a", seed=1, test_fraction=0.2)
    b = split(corpus / "corpus", tmp_path / "b", seed=1, test_fraction=0.2)
    assert a["splits"] == b["splits"]
    assert (tmp_path / "a" / "test" / "index.tsv").read_text() == (tmp_path / "b" / "test" / "index.tsv").read_text()


def test_assignment_keeps_a_training_repository_per_language():
    counts = {"a/x": {"Go": 5}, "a/y": {"Python": 3}, "a/z": {"Python": 4}}
    got = assign_repositories(counts, 0.3, 0.3, seed=0)
    assert got["a/x"] == "train"  # Go's only repository
    assert sorted(got[r] for r in ("a/y", "a/z")).count("train") == 1


def test_overlap_finds_exact_and_near_copies(corpus, tmp_path):
    split(corpus / "corpus", tmp_path / "s", test_fraction=0.2, seed=0)
    train_docs = list(iter_documents(tmp_path / "s", "train"))
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "exact.py").write_text(train_docs[0]["text"])
    (evals / "near.py").write_text(train_docs[1]["text"].replace("import os", "import sys", 1))
    (evals / "new.py").write_text(python_code(99999))
    out = tmp_path / "overlap.json"
    r = subprocess.run([sys.executable, "-m", "polycoder", "data", "overlap", str(evals), str(tmp_path / "s" / "test"),
                        "--index", str(tmp_path / "s" / "train" / "index.tsv"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert [e["file"].rsplit("/", 1)[-1] for e in report["exact"]] == ["exact.py"]
    assert [e["file"].rsplit("/", 1)[-1] for e in report["near"]] == ["near.py"]
    first = train_docs[1]
    assert report["near"][0]["matches"][0]["training"] == f"Python__org__{first['repo'].split('/')[1]}__{first['path']}"
    test_files = sum(1 for _ in iter_documents(tmp_path / "s", "test"))
    assert report["files"] == 3 + test_files  # the test split itself is clean


def test_overlap_without_signatures_is_exact_only(corpus, tmp_path):
    index = tmp_path / "index.tsv"
    index.write_text((corpus / "corpus" / "index.tsv").read_text())
    report = overlap([corpus / "src" / "org" / "repo00"], index, out=tmp_path / "o.json")
    assert not report["near_checked"] and len(report["exact"]) == report["files"] == 3


def test_overlap_report_goes_beside_the_index_not_into_the_current_folder(corpus, tmp_path):
    index = tmp_path / "train" / "index.tsv"
    index.parent.mkdir()
    index.write_text((corpus / "corpus" / "index.tsv").read_text())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "polycoder", "data", "overlap", str(corpus / "src" / "org" / "repo00"),
                        "--index", str(index)], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert list(cwd.iterdir()) == []
    report = json.loads((index.parent / "overlap.json").read_text())
    assert report["files"] == len(report["exact"]) == 3
    assert f"wrote {index.parent / 'overlap.json'}" in r.stdout
