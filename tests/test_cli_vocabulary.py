"""The command line's own manners (issue 17, points 5 and 8): help that names every verb,
group help, -V, defaults of boolean flags shown, one spelling of an option across verbs with
the old ones kept, a closed pipe, a completion printed exactly. Run as a user runs them."""

from __future__ import annotations

import subprocess
import sys

from polycoder import __version__
from polycoder.cli import COMMANDS

POLYCODER = [sys.executable, "-m", "polycoder"]


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([*POLYCODER, *args], capture_output=True, text=True, timeout=300, **kw)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_top_level_help_gives_every_verb_a_line_and_imports_no_torch():
    code = ("import sys; from polycoder.cli import main; main(['--help']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.rstrip().endswith("NO-TORCH")
    lines = {line[2:].split("  ")[0]: line for line in out.splitlines() if line.startswith("  ")}
    for verb in COMMANDS:
        assert verb in lines, verb
        assert len(lines[verb].split()) > len(verb.split()) + 3, f"{verb} has no summary line: {lines[verb]!r}"


def test_a_group_alone_or_with_help_lists_its_verbs():
    for args in (["data"], ["data", "--help"], ["eval", "-h"]):
        out = run(*args).stdout
        group = args[0]
        assert all(verb in out for verb in COMMANDS if verb.startswith(group + " "))
        assert "unknown verb" not in out
    bad = run("data", "frobnicate", check=False)
    assert bad.returncode == 2 and "unknown verb 'data frobnicate'" in bad.stderr and "data collect" in bad.stderr


def test_version_short_and_long():
    assert run("-V").stdout.strip() == __version__ == run("--version").stdout.strip()


def test_boolean_flags_show_their_default():
    out = run("generate", "--help").stdout
    assert "print the prompt before the completion. (default: off)" in " ".join(out.split())
    assert "(default: on)" in out  # --stop-at-eod


def test_old_spellings_of_dtype_and_device_are_accepted(tiny_folder):
    common = ["generate", "--model", str(tiny_folder), "--prompt", "int main", "--max-new-tokens", "3", "--temperature", "0"]
    assert run(*common, "--dtype", "bf16").stdout == run(*common, "--dtype", "bfloat16").stdout
    assert run(*common, "--device", "auto").stdout == run(*common).stdout == run(*common, "--device", "cpu").stdout
    bad = run(*common, "--dtype", "fp8", check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "float32" in bad.stderr


def test_a_closed_pipe_ends_quietly(tiny_folder):
    # `polycoder generate | head -c 1`: head leaves after one byte, the generator still writes.
    shell = (f"{sys.executable} -m polycoder generate --model '{tiny_folder}' --prompt 'int main' "
             "--max-new-tokens 200 --no-stop-at-eod --temperature 0 | head -c 1 >/dev/null; echo \"rc=${PIPESTATUS[0]}\"")
    r = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert r.stdout.strip() == "rc=141"


def test_one_name_for_an_input_file_and_the_old_name_still_works(tiny_folder, tmp_path):
    f = tmp_path / "x.c"
    f.write_text("int main(void) { return 0; }\n")
    new = run("tokenize", "--model", str(tiny_folder), "--text-file", str(f)).stdout
    assert new == run("tokenize", "--model", str(tiny_folder), "--file", str(f)).stdout  # the old name, kept
    assert new == run("tokenize", "--model", str(tiny_folder), "--text", f.read_text()).stdout


def test_the_near_duplicate_threshold_has_one_name_in_every_verb():
    for verb in (["data", "collect"], ["data", "overlap"], ["eval", "contamination"]):
        assert "--near-threshold" in run(*verb, "--help").stdout, verb
    assert "--near-threshold NEAR_THRESHOLD, --threshold NEAR_THRESHOLD" in run("eval", "contamination", "--help").stdout


def test_train_and_finetune_speak_the_same_words_as_the_other_verbs():
    from polycoder.config import PRESETS

    train = " ".join(run("train", "--help").stdout.split())
    assert all(name in train for name in PRESETS)  # the presets are listed
    assert "--model MODEL, --init MODEL" in train and "--dtype {auto,float32,bfloat16,float16}, --precision" in train
    finetune = " ".join(run("finetune", "--help").stdout.split())
    assert "--dtype {auto,float32,bfloat16,float16}, --precision" in finetune
    assert "--device DEVICE cpu, cuda or auto. (default: auto)" in finetune
    bad = run("train", "--data", "x", "--out", "y", "--preset", "polycoder-16m", check=False)
    assert bad.returncode == 2 and "invalid choice: 'polycoder-16m'" in bad.stderr and "polycoder-160m" in bad.stderr


def test_precision_helpers_agree_on_every_spelling():
    from polycoder.options import precision_of

    assert [precision_of(x) for x in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "auto", None)] == \
        ["fp32", "fp32", "bf16", "bf16", "fp16", "fp16", "auto", None]
