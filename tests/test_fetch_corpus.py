"""Tests of `polycoder data fetch` (polycoder.data.fetch): the pinned manifest's validity and safe extraction.

No network: archives are built here (tar with traversal names, symlinks and hard links;
zip with a symlink entry) and the download cache is pre-filled for the end-to-end runs.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from polycoder.data.fetch import fetch_corpus
from polycoder.data.fetch.archives import (
    MAX_FILE_BYTES,
    Budget,
    UnsafeMember,
    extract_members,
    iter_archive,
    make_selector,
    safe_relpath,
    strip_components,
    write_file_safely,
)
from polycoder.data.fetch.manifest import DEFAULT_MANIFEST, LANGUAGES, SPLITS, Source, load_manifest
from polycoder.errors import PolycoderError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fetch_corpus.py"
MANIFEST = DEFAULT_MANIFEST


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polycoder", "data", "fetch", *args],
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------ manifest
@pytest.fixture(scope="module")
def manifest():
    return load_manifest(MANIFEST)


def test_manifest_covers_every_language_in_both_splits(manifest):
    for split in SPLITS:
        langs = {s.language for s in manifest.sources if s.split == split}
        assert langs == set(LANGUAGES), (split, set(LANGUAGES) - langs)


def test_manifest_pins_exact_versions_and_licences(manifest):
    for s in manifest.sources:
        assert s.licence.strip(), s.name
        for _, version in s.packages:
            assert version and not any(c in version for c in "<>*^ "), (s.name, version)
            assert version[0].isdigit(), (s.name, version)  # no "latest", no ranges


def test_heldout_and_train_share_no_package_or_name(manifest):
    train = {(s.kind, p) for s in manifest.sources if s.split == "train" for p, _ in s.packages}
    held = {(s.kind, p) for s in manifest.sources if s.split == "heldout" for p, _ in s.packages}
    assert not train & held
    # Held-out Rust crates' sibling crates (serde_derive, regex-automata, tokio-util...)
    # live in the same upstream repositories: none may be in training.
    held_crates = {p.removeprefix("librust-").removesuffix("-dev") for k, p in held if p.startswith("librust-")}
    for _, p in train:
        if p.startswith("librust-"):
            crate = p.removeprefix("librust-").removesuffix("-dev")
            assert not any(crate.startswith(h) for h in held_crates), p


def test_manifest_handles_the_known_pitfalls(manifest):
    by = {s.name: s for s in manifest.sources}
    sel = lambda name, path: make_selector(by[name], manifest.default_drop, 0)(path)  # noqa: E731
    # gcc: libgo (a copy of Go's standard library) and testsuites never kept.
    assert sel("gcc", "libgo/go/fmt/print.go") is None
    assert sel("gcc", "gcc/testsuite/g++.dg/x.C") is None
    assert sel("gcc", "gcc/cp/parser.cc") == "gcc/cp/parser.cc"
    # mediawiki: vendor/ holds copies of symfony, guzzle, monolog (training sources).
    mw = make_selector(by["mediawiki"], manifest.default_drop, 0)
    assert mw("usr/share/mediawiki/vendor/symfony/yaml/Yaml.php") is None
    assert mw("usr/share/mediawiki/includes/Title.php") == "includes/Title.php"
    # typescript: tests/cases (deliberately invalid programs) dropped, src/ kept.
    assert sel("typescript", "tests/cases/compiler/x.ts") is None
    assert sel("typescript", "src/compiler/checker.ts") == "src/compiler/checker.ts"
    # transformers' "Copied from" near-copies are documented, left to near-dedup.
    assert "Copied from" in by["transformers"].note
    # bundles and minified files dropped everywhere.
    assert sel("three", "src/x.min.js") is None
    assert sel("three", "src/node_modules/a/index.js") is None


def test_bad_manifest_entries_are_refused():
    good = dict(name="x", kind="npm", packages=(("x", "1.0.0"),), language="Go", split="train", licence="MIT")
    Source(**good)
    for bad in (dict(kind="git"), dict(language="Cobol"), dict(split="test"), dict(licence=""),
                dict(packages=(("x", "^1.0.0"),)), dict(packages=(("a", "1"), ("b", "2"))),
                dict(name="../x")):
        with pytest.raises(ValueError):
            Source(**{**good, **bad})


# ------------------------------------------------------------------------ safe extraction
@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd", "C:evil", "a\\..\\evil", "a\x00b"])
def test_safe_relpath_refuses_escaping_names(name):
    with pytest.raises(UnsafeMember):
        safe_relpath(name)


def test_safe_relpath_cleans_harmless_names():
    assert safe_relpath("./a//b/./c.go") == "a/b/c.go"


def _tar_with_attacks(path: Path, outside: Path) -> None:
    with tarfile.open(path, "w:gz") as tf:
        def add_file(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        add_file("pkg/src/ok.go", b"package ok\n")
        add_file("pkg/../../evil.go", b"package evil\n")
        add_file("/abs/evil.go", b"package evil\n")
        ln = tarfile.TarInfo("pkg/src/link")
        ln.type, ln.linkname = tarfile.SYMTYPE, str(outside)
        tf.addfile(ln)
        # Classic attack: a file written "through" the symlink above.
        add_file("pkg/src/link/pwn.go", b"package pwn\n")
        hl = tarfile.TarInfo("pkg/src/hard.go")
        hl.type, hl.linkname = tarfile.LNKTYPE, "/etc/passwd"
        tf.addfile(hl)
        dev = tarfile.TarInfo("pkg/src/dev.go")
        dev.type = tarfile.CHRTYPE
        tf.addfile(dev)


def test_tar_extraction_refuses_traversal_and_never_creates_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    arc = tmp_path / "a.tgz"
    _tar_with_attacks(arc, outside)
    dest = tmp_path / "dest"
    st = extract_members(iter_archive(arc), dest, lambda c: strip_components(c, 1), exts=(".go",))
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "evil.go").exists() and not Path("/abs/evil.go").exists()
    written = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    # pwn.go lands in a real directory inside dest (the symlink was never created).
    assert written == ["src/link/pwn.go", "src/ok.go"]
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert st.refused == 2 and st.links_skipped == 3 and st.files == 2


def test_zip_symlink_entries_are_skipped(tmp_path):
    arc = tmp_path / "a.whl"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("pkg/mod.py", "x = 1\n")
        zi = zipfile.ZipInfo("pkg/link.py")
        zi.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(zi, "/etc/passwd")
        zf.writestr("../evil.py", "x = 2\n")
    dest = tmp_path / "dest"
    st = extract_members(iter_archive(arc), dest, lambda c: c, exts=(".py",))
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["mod.py"]
    assert st.links_skipped == 1 and st.refused == 1
    assert not (tmp_path / "evil.py").exists()


def test_write_refuses_a_symlink_planted_in_the_target(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "sub")
    os.symlink(outside / "f.go", dest / "f.go")
    with pytest.raises(UnsafeMember):
        write_file_safely(dest, "sub/x.go", b"x")
    with pytest.raises(OSError):  # O_NOFOLLOW on the final component
        write_file_safely(dest, "f.go", b"x")
    assert list(outside.iterdir()) == []


def test_size_minified_and_budget_filters(tmp_path):
    arc = tmp_path / "a.tar"
    with tarfile.open(arc, "w") as tf:
        for name, data in [("a.js", b"var a = 1;\n" * 10), ("big.js", b"//" + b"x" * (MAX_FILE_BYTES + 1)),
                           ("min.js", b"var a=1;" * 1000), ("b.js", b"var b = 2;\n" * 10),
                           ("c.js", b"var c = 3;\n" * 10), ("readme.md", b"# hi\n")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    budget = Budget(250)
    st = extract_members(iter_archive(arc), tmp_path / "d", lambda c: c, exts=(".js",),
                            take=lambda n: budget.take(("train", "JavaScript"), n))
    assert st.too_large == 1 and st.minified == 1
    assert st.files == 2 and st.truncated  # a.js + b.js fit in 250 bytes, c.js does not
    assert budget.exhausted(("train", "JavaScript"))


# ------------------------------------------------------------------ the command line
def test_the_verb_has_the_options_of_the_old_script():
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--out", "--manifest", "--max-mb-per-language", "--jobs", "--only", "--force", "--check"):
        assert flag in r.stdout, flag
    r = _cli("--check")
    assert r.returncode == 0 and r.stdout.startswith("manifest ok: "), r.stderr


def test_the_old_script_path_still_works():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "polycoder data fetch" in r.stdout and "--max-mb-per-language" in r.stdout


def test_a_bad_manifest_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"extensions": {}, "default_drop": [], "sources": []}))
    with pytest.raises(PolycoderError, match="bad manifest .*: extensions missing"):
        fetch_corpus(manifest=bad, check=True)
    r = subprocess.run([sys.executable, "-m", "polycoder", "data", "fetch", "--manifest", str(bad), "--check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith(f"polycoder data fetch: error: bad manifest {bad}: extensions")


# ------------------------------------------------------------------ end to end, offline
def test_main_offline_with_prefilled_download_cache(tmp_path, capsys):
    out = tmp_path / "corpus"
    # Pre-fill the download cache exactly as Downloader.fetch leaves it.
    d = out / "downloads" / "npm" / "demo-lib_1.2.3"
    d.mkdir(parents=True)
    with tarfile.open(d / "demo-lib-1.2.3.tgz", "w:gz") as tf:
        for name, data in [("package/src/index.ts", b"export const a = 1;\n"),
                           ("package/src/util.ts", b"export const b = 2;\n"),
                           ("package/dist/index.js", b"exports.a = 1;\n"),
                           ("package/src/types.d.ts", b"export declare const a: number;\n")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    (d / ".complete").write_text(json.dumps({"files": ["demo-lib-1.2.3.tgz"]}))
    manifest = json.loads(MANIFEST.read_text())
    manifest["sources"] = [dict(name="demo-lib", kind="npm", packages=[["demo-lib", "1.2.3"]], language="TypeScript",
                                split="heldout", licence="MIT", keep=["src/*"])]
    mpath = tmp_path / "m.json"
    mpath.write_text(json.dumps(manifest))
    r = _cli("--out", str(out), "--manifest", str(mpath), "--jobs", "1")  # through the real command line
    assert r.returncode == 0, r.stderr
    repo = out / "raw" / "heldout" / "TypeScript" / "demo-lib"
    assert sorted(p.name for p in repo.rglob("*") if p.is_file()) == ["index.ts", "util.ts"]
    lock = json.loads((out / "manifest.lock.json").read_text())
    (src,) = lock["sources"]
    assert src["status"] == "ok" and src["files"] == 2 and len(src["archives"][0]["sha256"]) == 64
    assert lock["per_language"]["heldout/TypeScript"]["files"] == 2
    assert (out / "SUMMARY.md").read_text().startswith("```\n")
    assert not [p.name for p in (out / "state").iterdir() if p.name.startswith(".")]  # no temporaries left
    # Re-run (as a Python function this time): nothing re-extracted.
    assert fetch_corpus(out=out, manifest=mpath, jobs=1) == 0
    assert "cached" in capsys.readouterr().out


def test_failed_download_is_reported_not_fatal(tmp_path, capsys):
    manifest = json.loads(MANIFEST.read_text())
    # A kind whose client is asked for a package in a cache-less, offline-failing way:
    # an npm name that cannot exist (invalid characters) fails fast without a network.
    manifest["sources"] = [dict(name="nope", kind="npm", packages=[["../nope", "0.0.0"]], language="Go",
                                split="train", licence="MIT")]
    mpath = tmp_path / "m.json"
    mpath.write_text(json.dumps(manifest))
    assert fetch_corpus(out=tmp_path / "o", manifest=mpath, jobs=1) == 0
    text = capsys.readouterr().out
    assert "failed" in text and "nope" in text


def test_fallback_is_fetched_only_when_its_source_failed(tmp_path, capsys):
    out = tmp_path / "corpus"
    d = out / "downloads" / "npm" / "lib_1.0.0"
    d.mkdir(parents=True)
    with tarfile.open(d / "lib-1.0.0.tgz", "w:gz") as tf:
        ti = tarfile.TarInfo("package/src/a.go")
        ti.size = 11
        tf.addfile(ti, io.BytesIO(b"package a\n\n"))
    (d / ".complete").write_text(json.dumps({"files": ["lib-1.0.0.tgz"]}))
    manifest = json.loads(MANIFEST.read_text())
    base = dict(kind="npm", language="Go", split="train", licence="MIT", keep=["src/*"])
    # The fallback has no cached download: were it fetched, npm would be asked for a name
    # that cannot exist and the source would show up as failed.
    manifest["sources"] = [dict(base, name="lib", packages=[["lib", "1.0.0"]]),
                           dict(base, name="lib-copy", packages=[["../no-such", "1.0.0"]], fallback_for="lib")]
    mpath = tmp_path / "m.json"
    mpath.write_text(json.dumps(manifest))
    assert fetch_corpus(out=out, manifest=mpath, jobs=1) == 0
    lock = json.loads((out / "manifest.lock.json").read_text())
    assert [s["name"] for s in lock["sources"]] == ["lib"]
    assert "lib-copy" not in capsys.readouterr().out


def test_a_repeated_entry_is_counted_once(tmp_path):
    arc = tmp_path / "a.tar"
    with tarfile.open(arc, "w") as tf:
        for data in (b"x = 1\n", b"x = 22\n"):
            ti = tarfile.TarInfo("m.py")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    st = extract_members(iter_archive(arc), tmp_path / "d", lambda c: c, exts=(".py",))
    assert (st.files, st.bytes) == (1, 7)
    assert (tmp_path / "d" / "m.py").read_bytes() == b"x = 22\n"


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "corpus"
    out.mkdir()
    with open(out / ".fetch.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(PolycoderError, match="another `polycoder data fetch` run is using"):
            fetch_corpus(out=out, only=["nothing"])


def test_a_smaller_cap_on_a_full_corpus_cuts_it_down(tmp_path):
    out = tmp_path / "corpus"
    manifest = json.loads(MANIFEST.read_text())
    manifest["sources"] = []
    for name in ("one", "two"):
        d = out / "downloads" / "npm" / f"{name}_1.0.0"
        d.mkdir(parents=True)
        with tarfile.open(d / f"{name}.tgz", "w:gz") as tf:
            for i in range(3):
                data = f"package p\n// {name} {i}\n".encode() + b"x" * 100
                ti = tarfile.TarInfo(f"package/src/f{i}.go")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        (d / ".complete").write_text(json.dumps({"files": [f"{name}.tgz"]}))
        manifest["sources"].append(dict(name=name, kind="npm", packages=[[name, "1.0.0"]], language="Go",
                                        split="train", licence="MIT", keep=["src/*"]))
    mpath = tmp_path / "m.json"
    mpath.write_text(json.dumps(manifest))
    run = lambda **kw: fetch_corpus(out=out, manifest=mpath, jobs=2, **kw)  # noqa: E731
    files = lambda: sorted(str(p.relative_to(out / "raw")) for p in (out / "raw").rglob("*.go"))  # noqa: E731
    assert run() == 0 and len(files()) == 6
    assert run(max_mb_per_language=0.0003) == 0  # 300 bytes: two files of "one"
    assert files() == ["train/Go/one/src/f0.go", "train/Go/one/src/f1.go"]
    lock = json.loads((out / "manifest.lock.json").read_text())
    assert [(s["name"], s["status"]) for s in lock["sources"]] == [("one", "truncated"), ("two", "skipped-budget")]
    assert run() == 0 and len(files()) == 6  # back to the full corpus
