"""Start-up time: `polycoder --help`, `polycoder generate --help` and the time to the first
token of `polycoder generate`, against the code before the start was made fast and against
llama.cpp opening the same model's GGUF, in one run.

Every figure is the wall time of a fresh process (`python -m polycoder ...`), as a user
waits for it: the interpreter's start, the imports, loading the model and one token
(`--max-new-tokens 1`, so the process ends at the first token). Each command runs `--runs`
times, the commands round-robin so that a machine shared with other work slows all of them
alike; the median is reported, the best beside it, every run in the JSON.

- this checkout: the `src/` beside this script, by PYTHONPATH;
- the baseline: `--baseline-src PATH`, another checkout (its root or its src/), e.g. the
  commit before this work: `git worktree add /tmp/startup-base 83510c4`, then
  `--baseline-src /tmp/startup-base`; left out without it;
- llama.cpp: our `polycoder export gguf --outtype f32` of the same model, opened in a fresh
  process by llama-cpp-python (`Llama(model_path, n_ctx, verbose=False)`) and asked for one
  token; the process's time, and inside it the load and the token alone (the figure
  llama.cpp users quote); skipped with a note where llama_cpp is not installed;
- floors: the interpreter alone (`python -c pass`) and `python -c "import torch"`, which
  every start that runs a model pays.

    python benchmarks/startup.py --baseline-src /tmp/startup-base --json docs/benchmarks/startup-DATE.json

Writes JSON (and Markdown next to it); prints a table. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description
from report import publish

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):"

# Run inside the llama.cpp process: the whole process is timed from outside, the load and
# the token from inside.
LLAMA = """
import sys, time
t0 = time.perf_counter()
from llama_cpp import Llama
t1 = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False)
t2 = time.perf_counter()
out = llm(sys.argv[3], max_tokens=1, temperature=0.0)
t3 = time.perf_counter()
print(repr(out["choices"][0]["text"]), t1 - t0, t2 - t1, t3 - t2)
"""


def src_of(path: Path) -> Path:
    """A checkout's src/ folder (given the checkout or the folder itself)."""
    for candidate in (path / "src", path):
        if (candidate / "polycoder" / "__init__.py").is_file():
            return candidate.resolve()
    raise SystemExit(f"{path}: no polycoder package there (neither {path}/src/polycoder nor {path}/polycoder)")


def run(argv: list[str], src: Path | None = None) -> tuple[float, str]:
    """(wall seconds, stdout) of a fresh process; PYTHONPATH is `src` alone (or unset)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return dt, r.stdout


def commands(model: str | None, codes: dict[str, Path]) -> dict[tuple[str, str], tuple[list[str], Path | None]]:
    """(what, whose) -> (argv, PYTHONPATH) of every timed command."""
    py = sys.executable
    model_args = ["--model", model] if model else []
    out: dict[tuple[str, str], tuple[list[str], Path | None]] = {
        ("python -c pass", "floor"): ([py, "-c", "pass"], None),
        ("python -c 'import torch'", "floor"): ([py, "-c", "import torch"], None),
    }
    for who, src in codes.items():
        out[("polycoder --help", who)] = ([py, "-m", "polycoder", "--help"], src)
        out[("polycoder generate --help", who)] = ([py, "-m", "polycoder", "generate", "--help"], src)
        out[("generate: first token", who)] = ([py, "-m", "polycoder", "generate", *model_args, "--prompt", PROMPT,
                                                "--max-new-tokens", "1"], src)
    return out


def export(model: str | None, src: Path, folder: Path) -> Path:
    path = folder / "model-f32.gguf"
    run([sys.executable, "-m", "polycoder", "export", "gguf", "--out", str(path), "--outtype", "f32", "--no-check",
         *(["--model", model] if model else [])], src)
    return path


def commit_of(folder: Path) -> str | None:
    """The checkout's commit (short), marked when its files differ from it."""
    head = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no", "."],
                           capture_output=True, text=True)
    return (head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")) or None


def llama_cpp_available() -> bool:
    try:
        run([sys.executable, "-c", "import llama_cpp"])
        return True
    except SystemExit:
        return False


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "best_s": min(times), "all_s": times}


def markdown(results: dict) -> str:
    cpu = results["cpu"]
    rows = results["rows"]
    who = [w for w in ("this checkout", "baseline") if any(r["who"] == w for r in rows)]
    lines = [f"# Start-up time ({results['date']})", "",
             f"CPU: {cpu['model']} ({', '.join(cpu['features'])}); {os.cpu_count()} logical cores; "
             f"Python {results['python']}; model: {results['model']}; {results['runs']} runs a command, "
             "each a fresh process, commands round-robin; median (best) seconds. The first token is the whole "
             "process of `generate --max-new-tokens 1`: interpreter, imports, model load, prefill, one token.", "",
             f"This checkout: {results.get('this_commit') or 'commit unknown'}."
             + (f" Baseline: {results['baseline_src']} ({results.get('baseline_commit') or 'commit unknown'})."
                if "baseline" in who else ""), ""]
    lines += ["| command | " + " | ".join(who) + (" | speed-up |" if len(who) == 2 else " |"),
              "|---|" + "---:|" * (len(who) + (len(who) == 2))]
    for what in ("polycoder --help", "polycoder generate --help", "generate: first token"):
        cells = {r["who"]: r for r in rows if r["what"] == what}
        line = f"| `{what}` | " + " | ".join(f"{cells[w]['median_s']:.2f} ({cells[w]['best_s']:.2f})" for w in who)
        if len(who) == 2:
            line += f" | {cells['baseline']['median_s'] / cells['this checkout']['median_s']:.1f}x"
        lines.append(line + " |")
    lines += ["", "| reference | median (best) s |", "|---|---:|"]
    for r in rows:
        if r["who"] in ("floor", "llama.cpp"):
            lines.append(f"| {r['what']} | {r['median_s']:.2f} ({r['best_s']:.2f}) |")
    if "llama_inside" in results:
        inside = results["llama_inside"]
        lines.append(f"| llama.cpp inside its process: import llama_cpp / load / one token | "
                     f"{inside['import_s']:.2f} / {inside['load_s']:.3f} / {inside['token_s']:.3f} |")
    lines += [""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write results here (and .md beside it)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each command (fresh processes); the median is reported")
    ap.add_argument("--baseline-src", type=Path, default=None, help="another checkout (root or src/) to time the same way")
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--n-ctx", type=int, default=0, help="llama.cpp's context (0: the model's)")
    ap.add_argument("--note", action="append", default=[], help="a line for the notes under the table (repeatable)")
    args = ap.parse_args(argv)

    notes: list[str] = list(args.note)
    codes = {"this checkout": src_of(REPO)}
    baseline_commit = None
    if args.baseline_src is not None:
        codes["baseline"] = src_of(args.baseline_src)
        baseline_commit = commit_of(codes["baseline"])
    else:
        notes.append("no --baseline-src: the code before this change was not timed")
    for who, src in codes.items():  # each run must import the code it names, not an installed copy
        _, where = run([sys.executable, "-c", "import polycoder; print(polycoder.__file__)"], src)
        if not Path(where.strip()).is_relative_to(src):
            raise SystemExit(f"{who}: PYTHONPATH={src} imports polycoder from {where.strip()}")
    cmds = commands(args.model, codes)
    print(f"CPU {cpu_description()['model']}; {len(cmds)} commands x {args.runs} runs", flush=True)

    with tempfile.TemporaryDirectory(prefix="startup-bench-") as work:
        if llama_cpp_available():
            gguf_path = export(args.model, codes["this checkout"], Path(work))
            llama = [sys.executable, "-c", LLAMA, str(gguf_path), str(args.n_ctx), PROMPT]
            cmds[("llama.cpp: fresh process, import + load + one token", "llama.cpp")] = (llama, None)
        else:
            notes.append("llama_cpp is not installed here (pip install llama-cpp-python): its rows are left out")
        for argv_, src in cmds.values():  # warm the file cache once, untimed
            run(argv_, src)
        times: dict[tuple[str, str], list[float]] = {k: [] for k in cmds}
        inside: list[tuple[float, float, float]] = []
        for i in range(args.runs):
            for key, (argv_, src) in cmds.items():
                dt, out = run(argv_, src)
                times[key].append(dt)
                if key[1] == "llama.cpp":
                    inside.append(tuple(float(x) for x in out.split()[-3:]))
            print(f"  run {i + 1}/{args.runs}: " + ", ".join(f"{w} {k}: {times[(k, w)][-1]:.2f}s" for k, w in cmds
                                                               if k.startswith("generate")), flush=True)

    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(), "python": platform.python_version(),
                     "model": args.model or "bundled (polycoder-tiny)", "runs": args.runs,
                     "this_commit": commit_of(codes["this checkout"]), "baseline_src": str(codes.get("baseline", "")),
                     "baseline_commit": baseline_commit, "notes": notes,
                     "rows": [{"what": k, "who": w, **summary(t)} for (k, w), t in times.items()]}
    if inside:
        results["llama_inside"] = {name: statistics.median(x[i] for x in inside)
                                   for i, name in enumerate(("import_s", "load_s", "token_s"))}
    text = markdown(results)
    publish(results, text, args.json)
    return results


if __name__ == "__main__":
    main()
