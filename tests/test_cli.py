"""The `polycoder generate` and `polycoder tokenize` commands, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from polycoder.checkpoint import load_model
from polycoder.generation import SamplingParams, generate

PROMPT = "def f(a,\tb):\n    # keep  these   spaces\n    return"


def run(*args, stdin: str | None = None, check: bool = True):
    r = subprocess.run([sys.executable, "-m", "polycoder", *args], input=stdin, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def expected(tiny_folder):
    model, tok = load_model(tiny_folder)
    return generate(model, tok, [PROMPT], SamplingParams(max_new_tokens=12))[0][0].text


def test_prompt_from_argument_file_and_stdin_are_the_same(tiny_folder, tmp_path, expected):
    f = tmp_path / "prompt.py"
    f.write_text(PROMPT)
    common = ["generate", "--model", str(tiny_folder), "--max-new-tokens", "12", "--temperature", "0"]
    outs = [run(*common, "--prompt", PROMPT).stdout, run(*common, "--prompt-file", str(f)).stdout,
            run(*common, stdin=PROMPT).stdout]
    assert outs[0] == outs[1] == outs[2] == expected  # exactly the completion: no newline added in a pipe
    echoed = run(*common, "--prompt", PROMPT, "--echo").stdout
    assert echoed == PROMPT + expected  # whitespace kept exactly


def test_json_samples(tiny_folder):
    out = run("generate", "--model", str(tiny_folder), "--prompt", "int", "--num-samples", "3", "--temperature", "0.8",
              "--seed", "4", "--max-new-tokens", "6", "--json-output", "--stop", "\n", "--stop", ";").stdout
    samples = json.loads(out)
    assert len(samples) == 3 and all(set(s) == {"text", "finish_reason", "tokens"} for s in samples)
    assert all("\n" not in s["text"] and ";" not in s["text"] for s in samples)


def test_tokenize_and_decode(tiny_folder, tmp_path, code_tokenizer):
    f = tmp_path / "x.go"
    f.write_text("func main() {\n\tprintln(\"hi\")\n}\n")
    ids = json.loads(run("tokenize", "--model", str(tiny_folder), "--file", str(f)).stdout)
    assert ids == code_tokenizer.encode(f.read_text())
    back = run("tokenize", "--model", str(tiny_folder), "--decode", "--text", json.dumps(ids)).stdout
    assert back == f.read_text()


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "no/such/folder/here", "--prompt", "x"], "not found"),
    (["generate", "--model", "polycoder-160m", "--prompt", "x"], "--random-init"),
    (["generate", "--model", "test-tiny", "--random-init", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["tokenize", "--decode", "--text", "[1, 'a']", "--model", "test-tiny"], "JSON list"),
    (["generate", "--prompt-file", "."], "cannot read the prompt file"),  # a folder
    (["generate", "--prompt", "x", "--suffix-file", "."], "cannot read the suffix file"),
    (["generate", "--prompt", "x", "--suffix", "y", "--suffix-file", "f"], "not both"),
    (["frobnicate"], "unknown verb"),
])
def test_user_errors_are_one_clear_line(args, message, capsys):
    from polycoder.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_texts_may_contain_percent_signs(capsys):
    import argparse

    from polycoder.cli import add_function_arguments

    def verb(share: float = 0.05) -> None:
        """Sample a share of files (5 % by default).

        Args:
            share: fraction of files, e.g. 0.05 for 5 %.
        """

    parser = argparse.ArgumentParser()
    add_function_arguments(parser, verb)
    parser.print_help()
    assert "5 %" in capsys.readouterr().out


def test_a_missing_extra_is_named(tmp_path):
    """A verb whose extra is not installed says which one to install (here uvicorn is made
    unimportable for one real run of `polycoder serve`)."""
    (tmp_path / "uvicorn.py").write_text("raise ModuleNotFoundError(\"No module named 'uvicorn'\", name='uvicorn')\n")
    r = subprocess.run([sys.executable, "-m", "polycoder", "serve", "--model", "test-tiny"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'uvicorn'" in r.stderr and "pip install 'polycoder[serve]'" in r.stderr
