"""scripts/suffix_stop_effect.py: the cursors it places are the kinds it names, and its
"before" reading is the rule as it was (one line wherever code followed the cursor)."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

from polycoder.checkpoint import build_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("suffix_stop_effect", REPO / "scripts" / "suffix_stop_effect.py")
effect = importlib.util.module_from_spec(spec)
spec.loader.exec_module(effect)

SOURCE = "".join(f"def f{i}(a, b):\n    total = g(a, b)\n    return h(total);\n\n" for i in range(6))


def test_each_cursor_is_of_its_kind_and_splits_the_file():
    seen = set()
    for seed in range(40):
        for kind, prefix, middle, suffix in effect.cursors(SOURCE, random.Random(seed)):
            seen.add(kind)
            assert prefix + middle + suffix == SOURCE and middle
            rest, before = suffix.split("\n", 1)[0], prefix.rsplit("\n", 1)[-1]
            if kind == "closer":
                assert effect.CLOSERS.match(rest) and middle.strip()
            elif kind == "mid-line":
                assert rest.strip() and "\n" not in middle
            elif kind == "line-start":
                assert not before and rest.strip() and middle.endswith("\n") and 2 <= middle.count("\n") <= 4
            else:
                assert kind == "new-line" and not before and not rest.strip() and suffix.startswith("\n")
    assert seen == set(effect.KINDS)


def test_before_reads_one_line_where_code_follows_the_cursor_and_up_to_the_anchor_elsewhere():
    assert effect.before("x = f(", ")\n", "a, b)\nmore\n") == "a, b)"
    assert effect.before("def f():\n", "    return x\n", "    y = 1\n    return x\n") == "    y = 1"
    looped = "y = 1\ny = 1\ny = 1\n\nprint(f())\n"
    assert effect.before("def f():\n", "\n\nprint(f())\n", looped) == "y = 1\ny = 1\ny = 1"  # no loop rule then
    assert effect.read(effect.SuffixStop.of("def f():\n", "\n\nprint(f())\n"), looped) == "y = 1"  # now


def test_the_script_runs_end_to_end(tmp_path, tiny_config, code_tokenizer):
    """A tiny random FIM model over two languages' files: every cursor read four ways."""
    model = tmp_path / "model"
    save_checkpoint(build_model(tiny_config, seed=3), code_tokenizer.with_fim_tokens(), model)
    for language, name, text in [("Python", "a.py", SOURCE), ("C", "b.c", "int f(int a) {\n    return g(a);\n}\n" * 8)]:
        (tmp_path / "data" / language).mkdir(parents=True)
        (tmp_path / "data" / language / name).write_text(text)
    out = tmp_path / "effect.json"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "suffix_stop_effect.py"), "--data", str(tmp_path / "data"),
                          "--model", str(model), "--max-new-tokens", "8", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["rows"] and all(set(r["read"]) == {"raw", "before", "lines", "now"} for r in result["rows"])
    for r in result["rows"]:  # rules only cut
        assert all(r["text"].startswith(r["read"][k]) for k in ("before", "lines", "now"))
    assert set(result["summary"]) <= set(effect.KINDS) and "| cursor |" in run.stdout
