"""`polycoder data collect`: filters, majority language, exact/near dedup, archives, determinism, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_data_fixtures import build_sources, python_code

from polycoder.corpus import iter_documents, read_index
from polycoder.data.collect import collect
from polycoder.errors import PolycoderError

OPTS = dict(max_bytes=20000, tasks=4)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    info = build_sources(root)
    out = root / "corpus"
    # keep_work: test_resume_after_a_lost_task_gives_the_same_corpus plays a killed run from it
    summary = collect([str(info["src"]), str(info["broken"])], out, workers=1, keep_work=True, **OPTS)
    return root, info, out, summary


def removed(summary, reason):
    return summary["removed"].get(reason, {}).get("files", 0)


def test_each_filter_removes_what_it_should(collected):
    _, _, out, s = collected
    docs = list(iter_documents(out))
    paths = {d["path"] for d in docs}
    for name in ("binary.py", "big.py", "latin1.py", "empty.py", "tiny.py", "minified.py", "gen_pb2.py",
                 "outside_link.py", "loop.py", "tool.c", "dep.py", "script0.py", "link.rs"):
        assert not any(p.endswith(name) for p in paths), name
    # of each duplicate pair exactly one stays: the first in (repository, path) order
    assert "pkg/copy_of_mod0.py" in paths and "pkg/mod0.py" not in paths
    assert "pkg/inside_link.py" in paths and "pkg/mod2.py" not in paths
    assert "pkg/mod1.py" in paths and "pkg/near_mod1.py" not in paths
    assert removed(s, "binary") == 1 and removed(s, "too_large") == 1 and removed(s, "non_utf8") == 1
    assert removed(s, "empty") == 1 and removed(s, "few_tokens") == 1 and removed(s, "long_lines") == 1
    assert removed(s, "generated") == 1
    assert removed(s, "symlink_outside") == 2  # the folder link and the tar symlink member
    assert removed(s, "symlink_broken") == 1
    assert removed(s, "unreadable") == 1       # the corrupt archive, counted, not fatal
    assert removed(s, "not_majority_language") == 1 + 2 + 1  # tool.c, proj2's Python (2 + the copied one)
    # exact: copy_of_mod0 and inside_link (mod2); the Python copy in proj2 went with the majority rule
    assert removed(s, "exact_duplicate") == 2
    assert removed(s, "near_duplicate") == 1 and s["near_duplicates_removed"] == 1


def test_kept_files_languages_and_repositories(collected):
    _, _, out, s = collected
    docs = list(iter_documents(out))
    assert s["languages"] == {
        "Go": {"repositories": 1, "files": 5, "bytes": s["languages"]["Go"]["bytes"]},
        "Java": {"repositories": 1, "files": 3, "bytes": s["languages"]["Java"]["bytes"]},
        "Python": {"repositories": 1, "files": 8, "bytes": s["languages"]["Python"]["bytes"]},
        "Rust": {"repositories": 1, "files": 4, "bytes": s["languages"]["Rust"]["bytes"]},
    }
    assert len(docs) == s["total"]["files"] == 20
    assert sorted(d["path"] for d in docs if d["language"] == "Python") == [
        "pkg/copy_of_mod0.py", "pkg/inside_link.py"] + [f"pkg/mod{i}.py" for i in (1, 3, 4, 5, 6, 7)]
    by_repo = {d["repo"] for d in docs}
    assert by_repo == {"src/proj1", "src/proj2", "src/crate-1.0", "src/jlib"}
    assert {d["licence"] for d in docs if d["repo"] == "src/proj1"} == {"MIT"}
    # text is the file, sha256 is of its bytes, size its length
    import hashlib

    for d in docs:
        assert hashlib.sha256(d["text"].encode()).hexdigest() == d["sha256"]
        assert d["size"] == len(d["text"].encode())
    assert (out / "stats.md").read_text().startswith("# Corpus statistics")
    assert json.loads((out / "stats.json").read_text())["total"]["files"] == 20


def test_no_two_kept_files_share_a_sha256(collected):
    _, _, out, _ = collected
    shas = [d["sha256"] for d in iter_documents(out, columns=["sha256"])]
    assert len(shas) == len(set(shas))


def test_index_is_in_the_published_format(collected):
    _, _, out, _ = collected
    lines = (out / "index.tsv").read_text().splitlines()
    assert len(lines) == 20
    assert len(read_index(out / "index.tsv")) == 20
    docs = {(d["language"], d["repo"], d["path"]): d["sha256"] for d in iter_documents(out)}
    for line in lines:
        key, sha = line.split("\t")
        lang, org, project, path = key.split("__", 3)
        assert docs[(lang, f"{org}/{project}", path)] == sha
    assert any(line.startswith("Rust__src__crate-1.0__crate-1.0/src/m0.rs\t") for line in lines)


def test_all_languages_keeps_minority_files(collected, tmp_path):
    _, info, _, _ = collected
    s = collect([str(info["src"])], tmp_path / "all", workers=1, all_languages=True, near_dedup=False, **OPTS)
    assert s["languages"]["C"]["files"] == 1
    assert removed(s, "not_majority_language") == 0
    assert removed(s, "near_duplicate") == 0  # off
    # the copy in proj2 of proj1's mod3 is now an exact duplicate (proj1 sorts first, so it stays)
    assert removed(s, "exact_duplicate") == 3


def _table_rows(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("corpus-*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_same_result_for_any_worker_count_through_the_cli(collected, tmp_path):
    _, info, out, _ = collected
    out2 = tmp_path / "w2"
    r = subprocess.run([sys.executable, "-m", "polycoder", "data", "collect", str(info["src"]), str(info["broken"]),
                        "--out", str(out2), "--workers", "2", "--max-bytes", "20000", "--tasks", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| Python | 1 | 8 |" in r.stdout
    assert _table_rows(out2) == _table_rows(out)
    assert (out2 / "index.tsv").read_bytes() == (out / "index.tsv").read_bytes()
    assert not (out2 / ".work").exists()  # a finished run leaves no resume state behind


def test_resume_after_a_lost_task_gives_the_same_corpus(collected, tmp_path):
    _, info, out, _ = collected
    dest = tmp_path / "resumed"
    shutil.copytree(out, dest)
    # as if killed: one task never finished, the final outputs never written
    (dest / ".work" / "logs" / "completions" / "00001").unlink()
    (dest / ".work" / "parts" / "part-00001.parquet").unlink()
    for f in dest.glob("corpus-*.parquet"):
        f.unlink()
    collect([str(info["src"]), str(info["broken"])], dest, workers=1, **OPTS)
    assert _table_rows(dest) == _table_rows(out)


def test_headers_follow_the_repository_language(tmp_path):
    """Pygments gives .h to C; a C++ project with more headers than sources must stay C++."""
    from test_data_fixtures import c_like

    cpp, c = tmp_path / "src" / "cpp", tmp_path / "src" / "c"
    cpp.mkdir(parents=True)
    c.mkdir(parents=True)
    for i in range(4):
        (cpp / f"h{i}.h").write_text(c_like(600 + i, "C"))
        (c / f"h{i}.h").write_text(c_like(700 + i, "C"))
    for i in range(2):
        (cpp / f"s{i}.cpp").write_text(c_like(800 + i, "C"))
        (c / f"s{i}.c").write_text(c_like(900 + i, "C"))
    s = collect([str(tmp_path / "src")], tmp_path / "out", workers=1)
    langs = {(d["repo"], d["path"]): d["language"] for d in iter_documents(tmp_path / "out")}
    assert {v for (repo, _), v in langs.items() if repo == "src/cpp"} == {"C++"}
    assert {v for (repo, _), v in langs.items() if repo == "src/c"} == {"C"}
    assert len(langs) == 12 and s["headers_relabelled"] == 4
    assert "C++__src__cpp__h0.h\t" in (tmp_path / "out" / "index.tsv").read_text()


def test_git_repository_is_cloned(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "upstream" / "proj"
    repo.mkdir(parents=True)
    for i in range(3):
        (repo / f"m{i}.py").write_text(python_code(500 + i))
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for cmd in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-q", "-m", "x"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)
    s = collect([f"file://{repo}"], tmp_path / "out", workers=1, near_dedup=False)
    assert s["languages"]["Python"]["files"] == 3
    assert {d["repo"] for d in iter_documents(tmp_path / "out")} == {"upstream/proj"}


def test_unreachable_git_url_is_reported_not_fatal(tmp_path, collected):
    _, info, _, _ = collected
    s = collect([f"file://{tmp_path}/nope", str(info["src"] / "jlib.zip")], tmp_path / "out", workers=1)
    assert s["failed_sources"] and "nope" in s["failed_sources"][0]["source"]
    assert s["languages"]["Java"]["files"] == 3


def test_user_errors_are_clear(tmp_path):
    with pytest.raises(PolycoderError, match="source not found"):
        collect([str(tmp_path / "missing")], tmp_path / "out")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(PolycoderError, match="not an archive"):
        collect([str(tmp_path / "notes.txt")], tmp_path / "out")
    with pytest.raises(PolycoderError, match="near-dedup threshold"):
        collect([str(tmp_path)], tmp_path / "out", near_threshold=1.5)


@pytest.mark.parametrize("verb", ["data collect", "data split", "data tokenize", "data overlap", "tokenizer train"])
def test_verb_help(verb, capsys):
    from polycoder.cli import main

    with pytest.raises(SystemExit) as e:
        main(verb.split() + ["--help"])
    assert e.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_every_removed_file_is_listed_with_its_reason(collected):
    _, _, out, s = collected
    lines = (out / "removed.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t") == ["reason", "language", "repo", "path", "bytes", "detail"]
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 6 for r in rows)
    by_reason: dict[str, int] = {}
    for r in rows:
        by_reason[r[0]] = by_reason.get(r[0], 0) + 1
    assert by_reason == {reason: v["files"] for reason, v in s["removed"].items()}  # the same files as counted
    paths = {(r[0], r[3].rsplit("/", 1)[-1]) for r in rows}
    assert {("binary", "binary.py"), ("few_tokens", "tiny.py"), ("non_utf8", "latin1.py")} <= paths
    dup = next(r for r in rows if r[0] == "exact_duplicate" and r[3] == "pkg/mod0.py")
    assert dup[5] == f"same bytes as {dup[2]}/pkg/copy_of_mod0.py"
    near = next(r for r in rows if r[0] == "near_duplicate")
    assert near[3].endswith("near_mod1.py") and near[5].endswith("pkg/mod1.py")


def test_file_and_folder_names_of_any_bytes_never_stop_a_run(tmp_path):
    """Names that are not UTF-8 (0xFF, a folder pkg\\xe9) and names with a newline, a tab or a
    backslash are kept and stored losslessly; index.tsv stays one line a file."""
    from polycoder.corpus import unescape_name

    repo = tmp_path / "src" / "weird"
    names = [b"bad\xffname.py", b"new\nline.py", b"tab\tname.py", b"back\\slash.py", b"pkg\xe9/inner.py"]
    for i, raw in enumerate(names):
        path = os.fsencode(repo) + b"/" + raw
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(python_code(100 + i))
    out = tmp_path / "corpus"
    r = subprocess.run([sys.executable, "-m", "polycoder", "data", "collect", str(repo), "--out", str(out),
                        "--workers", "1", "--no-near-dedup"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    docs = list(iter_documents(out, columns=["path", "text"]))
    assert sorted(os.fsencode(unescape_name(d["path"])) for d in docs) == sorted(names)
    index_lines = (out / "index.tsv").read_text(encoding="utf-8").splitlines()
    assert len(index_lines) == len(names) and all(line.count("\t") == 1 for line in index_lines)
    assert any("bad\\xffname.py" in line for line in index_lines)
