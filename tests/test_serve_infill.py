"""Completion at the cursor against a real `polycoder serve`: `suffix` on OpenAI's
/v1/completions (the `openai` package) and Ollama's /api/generate (the `ollama` package,
and Continue's request shape), llama.cpp's /infill (llama.vscode's request shape); the
same greedy answer on every route, equal to `polycoder.fim.arrange` + plain greedy
generation; --fim-order; the stop rules; streaming; disconnects; a model without FIM
tokens (each API's refusal, and the prefix-only fallback); hostile bodies.

The model is a tiny random one whose tokenizer has the FIM sentinels
(`Tokenizer.with_fim_tokens()`): it does not infill well, the tests check the plumbing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace

import httpx
import pytest

pytest.importorskip("fastapi")

from serve_server import Server, post, still_serves  # noqa: E402

from polycoder.checkpoint import build_model, load_model, save_checkpoint  # noqa: E402
from polycoder.config import ModelConfig, pad_vocab  # noqa: E402
from polycoder.fim import (  # noqa: E402
    CUT_BLOCK_CHARS,
    SUFFIX_SHARE,
    Cursor,
    around_cursor,
    arrange,
    back_off,
    cut_step,
    encode_around_cursor,
    fit,
    read_template,
)
from polycoder.fim import _marked as fim_marked  # noqa: E402
from polycoder.generation import Penalties, SamplingParams, generate  # noqa: E402
from polycoder.generation.penalties import OFF  # noqa: E402
from polycoder.generation.suffix_stop import COPIES, REPEATS, SuffixStop  # noqa: E402
from polycoder.generation.text import Sequence, under_indented  # noqa: E402
from polycoder.serve.llamacpp_api import NOT_SUPPORTED  # noqa: E402

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"
N = 12


@pytest.fixture(scope="module")
def fim_folder(tmp_path_factory, code_tokenizer):
    tok = code_tokenizer.with_fim_tokens()
    config = ModelConfig.from_preset("test-tiny").replace(vocab_size=pad_vocab(tok.vocab_size + 1))
    folder = tmp_path_factory.mktemp("fim") / "model"
    save_checkpoint(build_model(config, seed=3), tok, folder)
    return folder


@pytest.fixture(scope="module")
def local(fim_folder):
    model, tok = load_model(fim_folder)
    assert tok.fim is not None
    return model, tok


@pytest.fixture(scope="module")
def server(fim_folder):
    s = Server(fim_folder, "--max-batch-size", "4")
    yield s
    s.stop()


def expected_ids(local, prefix=PREFIX, suffix=SUFFIX, order="spm"):
    tok = local[1]
    return arrange(tok.fim, tok.encode(back_off(prefix)[0]), [], tok.encode(suffix), order)


def expected(local, prefix=PREFIX, suffix=SUFFIX, order="spm", n=N, extra=(), middle="", rule=True, stop=(),
             penalties=OFF, min_indent=0):
    """What the server must answer, greedy: arrange + our plain generation, the whitespace
    before the cursor left to the model (`back_off`) and dropped from its output (`heal`)."""
    model, tok = local
    rule = SuffixStop.of(prefix + middle, suffix) if rule else None
    if middle:
        middle, heal = back_off(middle)
    else:
        prefix, heal = back_off(prefix)
    ids = arrange(tok.fim, tok.encode(prefix), tok.encode(middle), tok.encode(suffix), order)
    ids = [t for text in extra for t in (*tok.encode(text), tok.eod_id)] + ids
    fim = tok.fim
    params = SamplingParams(max_new_tokens=n, stop=stop, stop_ids=(fim.prefix, fim.middle, fim.suffix, fim.pad),
                            suffix_stop=rule, heal=heal, penalties=penalties, min_indent=min_indent)
    return generate(model, tok, [ids], params)[0][0]


# ---- the stop rule, on its own and in a Sequence ---------------------------------------------

def test_suffix_stop_rule():
    assert SuffixStop.of("x = 1", "") is None and SuffixStop.of("x = 1", "  \n\n") is None
    mid = SuffixStop.of("x = f(", ")\nprint(x)")
    assert mid.single_line and mid.cut("a, b\nc = 2", False) == 4 and mid.cut("a, b", True) is None
    assert mid.held_back("a, b") == 0
    block = SuffixStop.of("def f():\n    ", "\n\n  print(f())\n")
    assert not block.single_line and block.anchor == "print(f())" and block.first_line_counts
    assert block.cut("return 1\n\nprint(f())\n", False) == len("return 1")
    assert block.cut("return 1\n\nprint(f())", False) is None  # the line may go on
    assert block.cut("return 1\n\nprint(f())", True) == len("return 1")  # ... unless the sample ended
    assert block.cut("return 1\nprint(f()) + 1\n", False) is None  # a line must equal the anchor
    assert block.cut("print(f())\n", False) == 0  # the first line is a whole one after an indented prefix
    assert block.held_back("return 1\n\npri") == len("\n\npri")  # could become the anchor
    assert block.held_back("return 1\nx") == 0 and block.held_back("return 1\n  ") == 3
    glued = SuffixStop.of("y = 2", "\nprint(f())")  # the first generated line continues "y = 2"
    assert not glued.first_line_counts and glued.cut("print(f())\n", False) is None
    assert glued.cut("\nprint(f())\n", False) == 0


def test_at_the_start_of_a_line_of_code_whole_lines_go_in_above_it(code_tokenizer):
    """The cursor before a line's code (only indentation before it): the completion may be
    lines, ended before the model writes that code, the line break and the indentation the
    code keeps included (the suffix is the code itself)."""
    rule = SuffixStop.of("def f():\n    ", "return x\n")
    assert not rule.single_line and rule.line_start and rule.anchor == "return x" and rule.indent == "    "

    def filled(text: str, final: bool = True) -> str:
        at = rule.cut(text, final)
        return "def f():\n    " + (text if at is None else text[:at]) + "return x\n"

    assert filled("y = 1\n    z = 2\n    return x\n") == "def f():\n    y = 1\n    z = 2\n    return x\n"
    assert filled("y = 1\n    y = 1\n    y = 1\n") == "def f():\n    y = 1\n    return x\n"  # a loop
    assert filled("return x\n") == "def f():\n    return x\n"  # nothing to add
    assert filled("y = 1\n    ") == "def f():\n    y = 1\n    return x\n"  # ended by the model
    assert rule.cut("y = 1\n    return x", False) is None  # the line may go on
    assert rule.held_back("y = 1\n    ret") == len("ret") and rule.held_back("y = 1\n    ") == 0
    word = SuffixStop.of("\tif (x)\n\t\t", "turn x;\n")  # a line ending with the code after the cursor
    assert word.line_start and word.cut("return x;\n", False) == len("re")
    assert word.held_back("return x") == len("turn x") and word.held_back("y = 1;\n") == 0
    column_0 = SuffixStop.of("x = 0\n", "    return x\n")  # the suffix holds the indentation
    assert column_0.line_start and column_0.cut("    y = 1\n    return x\n", False) == len("    y = 1\n")
    # Ended by the model after a line break: the code after the cursor keeps its indentation.
    assert rule.ended("y = 1\n") == "    " and rule.ended("y = 1") == "" and column_0.ended("    y = 1\n") == ""
    tok = code_tokenizer.with_fim_tokens()
    s = Sequence([0], SamplingParams(max_new_tokens=50, suffix_stop=rule), tok, None)
    out = "".join(s.push(t) for t in tok.encode("y = 1\n")) + s.push(tok.eod_id)
    assert s.finish_reason == "eod" and out == s.text == "y = 1\n    "
    assert "def f():\n    " + out + "return x\n" == "def f():\n    y = 1\n    return x\n"


@pytest.mark.parametrize("prefix,rest,line,kept", [
    ("int x = ", ";", "0;", "0"),  # the editor's ; written again
    ("f(", ")", "a, b)", "a, b"),  # an auto-closed bracket
    ("if (x", ") {", " > 0) {", " > 0"),
    ("x = ", " + b;", "a +", "a "),
    ("y = ", "z;", "z", ""),  # all of it was there already
    ("print(", ")", "f(x)", "f(x)"),  # without its ) the line's brackets would be less balanced
    ("a = ma", "x)", "x", "x"),  # "max": the repeat would split a name
    ("a = ", "b + c;", "ab", "ab"),
    ("x = f(", ")", "a, b", "a, b"),  # nothing repeated
])
def test_mid_line_a_repeat_of_the_rest_of_the_line_goes(code_tokenizer, prefix, rest, line, kept):
    rule = SuffixStop.of(prefix, rest + "\nnext()\n")
    assert rule.single_line and rule.rest == rest.strip()
    for text, final in [(line + "\nmore", False), (line, True)]:
        at = rule.cut(text, final)
        assert (text if at is None else text[:at]) == kept
    assert rule.cut(line, False) is None  # the line may go on
    tok = code_tokenizer.with_fim_tokens()  # streamed: the part that may go is held back until the line ends
    s = Sequence([0], SamplingParams(max_new_tokens=100, suffix_stop=rule), tok, None)
    out = ""
    for t in tok.encode(line + "\nmore"):
        out += s.push(t)
        if s.done:
            break
    assert s.done and s.text == kept and out == kept


def test_n_indent_ends_the_answer_before_a_line_indented_less(code_tokenizer):
    """llama.cpp's n_indent: after the first line break, a line whose code is indented by
    fewer spaces or tabs ends the sample before that code, its indentation kept."""
    assert under_indented("x = 1\n    y = 2\nz = 3\n", 4) == len("x = 1\n    y = 2\n")
    assert under_indented("x = 1\n  y = 2\n", 4) == len("x = 1\n  ")
    assert under_indented("x = 1\n    y = 2\n\t\tz\n", 2) is None  # a tab counts one, as llama.cpp counts it
    assert under_indented("x\n\n   \n\r\n    y", 4) is None  # lines of whitespace alone are not judged
    assert under_indented("x = 1", 4) is None and under_indented("x\ny", 0) is None
    tok = code_tokenizer.with_fim_tokens()
    s = Sequence([0], SamplingParams(max_new_tokens=100, min_indent=4), tok, None)
    out = ""
    for t in tok.encode("if x:\n        y = 1\n    z = 2\nw = 3\n"):
        out += s.push(t)
        if s.done:
            break
    assert s.finish_reason == "length" and s.text == out == "if x:\n        y = 1\n    z = 2\n"  # llama.cpp: "limit"



    """A line written REPEATS (3) times in a row is a loop: the completion keeps its first copy.
    The first generated line is compared with its indentation, which the prefix holds."""
    assert REPEATS == 3
    rule = SuffixStop.of("def f():\n    ", "\n\nprint(f())\n")
    assert rule.indent == "    "
    assert rule.cut("a = b\n    a = b\n    a = b\n", False) == len("a = b")
    assert rule.cut("x = 1\na = b\na = b\n", False) is None  # two copies: code does that
    assert rule.cut("x = 1\na = b\na = b\na = b", False) is None  # the third may go on ...
    assert rule.cut("x = 1\na = b\na = b\na = b", True) == len("x = 1\na = b")  # ... unless the sample ended
    assert rule.cut("x = 1\na = b\n  a = b\na = b\n", False) is None  # not the same line: indented otherwise
    assert rule.cut("x\n\n\n\n\n", False) is None  # blank lines are no loop
    assert rule.cut("a = b\n    a = b\n    a = b\n\nprint(f())\n", False) == len("a = b")
    # Held back from a stream: copies after the first, and a last line that may become one.
    assert rule.held_back("x = 1\na = b\na = b\n") == len("\na = b\n")
    assert rule.held_back("x = 1\na = b\na = ") == len("\na = ")
    assert rule.held_back("x = 1\na = b\nc") == 0
    glued = SuffixStop.of("y = 2", "\nprint(f())")  # the first line continues "y = 2": not compared
    assert glued.indent == "" and glued.cut(" + 1\n + 1\n + 1\n", False) is None
    assert glued.cut(" + 1\nz\nz\nz\n", False) == len(" + 1\nz")
    assert SuffixStop.of("x = f(", ")\n").cut("a\n", False) == 1  # mid-line: one line, no loop to cut

    tok = code_tokenizer.with_fim_tokens()
    for text, kept in [("a = b\n    a = b\n    a = b\n    a = b\n", "a = b"),
                       ("a = b\n    a = b\n    c = d\n", "a = b\n    a = b\n    c = d\n")]:
        out, s = streamed(tok, rule, text)
        assert s.text == kept and out == kept  # what was streamed is what was kept


def streamed(tok, rule: SuffixStop, text: str) -> tuple[str, Sequence]:
    """What a Sequence under `rule` streams while the model writes `text`, ended by EOD."""
    s = Sequence([0], SamplingParams(max_new_tokens=100, suffix_stop=rule), tok, None)
    out = ""
    for t in tok.encode(text):
        out += s.push(t)
        if s.done:
            break
    return out + ("" if s.done else s.finish("eod")), s


def test_a_loop_within_a_line_ends_the_completion_after_its_first_copy(code_tokenizer):
    """A stretch of a line (2-40 characters) written COPIES (4) times in a row is a loop, in
    every mode of the rule: the completion keeps the first copy, as soon as the last is
    written; whitespace and one character repeated (indentation, `====` bars) are not loops;
    streamed and whole give the same text."""
    assert COPIES == 4
    mid = SuffixStop.of("int f(", ")\n")
    loop = "char *a, void *arg, void *arg, void *arg, void *arg, void"
    assert mid.cut(loop, False) == len("char *a, void *arg")  # the loop ", void *arg" completes first
    assert mid.cut("void *arg, void *arg, void *arg, void", False) is None  # three copies: code does that
    assert mid.cut("x_1_1_1_1", False) == len("x_1") and mid.cut("a, b, c", False) is None
    assert mid.cut("//" + "=" * 70, False) is None and mid.cut("x" + " " * 40 + "y", False) is None
    assert mid.cut("req_req_req_req_", False, checked=len("req_req_req_req")) == len("req_")  # ends after `checked`
    lines = SuffixStop.of("def f():\n    ", "\n\nprint(f())\n")
    assert lines.cut("x = 1\n    y = g(a, a, a, a, a", False) == len("x = 1\n    y = g(a, ")  # multi-line too
    assert lines.cut("x = 1\n    y = 2\n\nprint(f())\nab ab ab ab ", False) == len("x = 1\n    y = 2")  # ended before
    assert replace(mid, copies=0).cut(loop, False) is None  # off
    assert mid.held_back("f(a, a, a") == len("a, a") and mid.held_back("f(a, b") == 0  # "f(a, " is safe
    tok = code_tokenizer.with_fim_tokens()
    for rule, text in [(mid, loop + " *x)\n"), (lines, "x = 1\n    y = g(a, a, a, a, a, a)\n"),
                       (mid, "0x00, 0x00, 0x00, 0x01, 0x02\n")]:
        out, s = streamed(tok, rule, text)
        at = rule.cut(text, True)
        assert out == s.text == (text if at is None else text[:at])  # streamed as it is read whole


def test_t_max_predict_ms_ends_the_answer_at_a_line_break_once_the_time_is_up(code_tokenizer, server):
    """llama.cpp's t_max_predict_ms: past the limit since the first token, the next token that
    writes a line break ends the answer, that break kept; before it, lines go on."""
    def run(limit_ms: float) -> Sequence:
        s = Sequence([0], SamplingParams(max_new_tokens=100, max_predict_ms=limit_ms), code_tokenizer, None)
        for t in code_tokenizer.encode("a = 1\nb = 2\nc = 3\n"):
            time.sleep(0.002)  # 2 ms a token: the limit of 1 ms has passed at the first line break
            s.push(t)
            if s.done:
                break
        return s
    timed = run(1)
    assert timed.done and timed.finish_reason == "length" and timed.text == "a = 1\n"
    assert not run(60_000).done and not run(0).done  # the time not up, or off
    i = post(server, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 4, "t_max_predict_ms": 1000,
                      "n_indent": 4}, "/infill").json()
    assert i["generation_settings"]["t_max_predict_ms"] == 1000 and i["generation_settings"]["n_indent"] == 4
    off = post(server, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 4, "t_max_predict_ms": -1},
               "/infill").json()
    assert off["generation_settings"]["t_max_predict_ms"] == 0  # llama.cpp: 0 or less is off


def test_sequence_cuts_and_streams_what_it_keeps(code_tokenizer):
    tok = code_tokenizer.with_fim_tokens()
    rule = SuffixStop.of("def f():\n    ", "\n\nprint(f())\n")
    s = Sequence([0], SamplingParams(max_new_tokens=100, suffix_stop=rule), tok, None)
    ids = tok.encode("return 1\n\nprint(f())\nmore")
    out = ""
    for t in ids:
        out += s.push(t)
        if s.done:
            break
    assert s.finish_reason == "stop" and s.text == "return 1" and out == "return 1"
    s = Sequence([0], SamplingParams(max_new_tokens=100, stop_ids=(tok.fim.middle,)), tok, None)
    out = "".join(s.push(t) for t in tok.encode("x = 1"))
    out += s.push(tok.fim.middle)
    assert s.finish_reason == "eod" and out == s.text == "x = 1" and tok.fim.middle not in s.token_ids


def test_whitespace_before_the_cursor_is_left_to_the_model_and_dropped_from_its_output(code_tokenizer):
    assert back_off("def f():\n    ") == ("def f():", "\n    ")
    assert back_off("f(a, ") == ("f(a,", " ") and back_off("x") == ("x", "") and back_off("") == ("", "")
    assert back_off("a" + " " * 100) == ("a" + " " * 36, " " * 64)  # at most 64 characters

    def run(heal: str, output: str, stop=()) -> tuple[str, str]:
        seq = Sequence([1], SamplingParams(max_new_tokens=50, stop=stop, heal=heal), code_tokenizer, None)
        streamed = []
        for t in code_tokenizer.encode(output):
            if seq.done:
                break
            streamed.append(seq.push(t))
        if not seq.done:
            streamed.append(seq.finish("length"))
        assert "".join(streamed) == seq.text  # the stream never shows what is dropped
        return seq.text, seq.finish_reason

    # the newline (+ indentation) the prompt left out comes back first, and goes; the stop
    # string "\n" then ends the line the model wrote, not the newline it restored
    assert run("\n", "\n    return x\nfoo", stop=("\n",)) == ("    return x", "stop")
    assert run("\n    ", "\n    return x") == ("return x", "length")
    assert run("\n    ", "\n        deeper") == ("    deeper", "length")
    assert run(" ", " b)") == ("b)", "length")
    assert run(" ", "b)") == ("b)", "length")  # other whitespace (none here): the output is kept whole
    assert run("\n    ", "\n\n  y") == ("\n\n  y", "length")
    assert run("\n", "\n") == ("", "length")  # ended inside the whitespace: nothing of its own


# ---- what does not fit the context ------------------------------------------------------------

@pytest.mark.parametrize("n_prefix, n_suffix, room", [(10, 5, 40), (300, 5, 200), (5, 300, 200), (300, 300, 200),
                                                      (300, 30, 200), (150, 300, 200), (1, 1, 0), (50, 50, 7)])
def test_fit_cuts_away_from_the_cursor(n_prefix, n_suffix, room):
    prefix, suffix = list(range(n_prefix)), list(range(1000, 1000 + n_suffix))
    p, s = fit(prefix, suffix, room)
    assert len(p) + len(s) <= room and p == prefix[len(prefix) - len(p):] and s == suffix[: len(s)]
    if n_prefix + n_suffix <= room:
        assert (p, s) == (prefix, suffix)
    else:
        step = max(8, room // 32)
        assert len(s) == min(n_suffix, max(int(room * SUFFIX_SHARE), max(0, room - n_prefix) // step * step))
        assert len(p) + len(s) > room - 5 * step  # the prefix's anchor wastes less than 4 steps, the suffix's cut 1


def test_typing_leaves_a_cut_prefix_where_it_was():
    """Tokens typed at the cursor one by one: the prefix's kept start moves in steps, and so
    does the end of a suffix cut to what a shorter prefix leaves (in SPM the whole prefix
    follows it), so a prompt cache holds all but the typed end for many keystrokes."""
    room, starts, ends = 200, [], []
    step = max(8, room // 32)
    for typed in range(100):
        p, _ = fit(list(range(500 + typed)), list(range(1000, 1100)), room)
        starts.append(p[0])
        _, s = fit(list(range(20 + typed)), list(range(1000, 1300)), room)  # the suffix gets what the prefix leaves
        ends.append(len(s))
    # the prefix must lose 400 + typed tokens (the suffix keeps half); its start stays put
    # until that passes it, and moves about once a step
    least = [400 + typed for typed in range(100)]
    assert all(start >= need for start, need in zip(starts, least)) and starts == sorted(starts)
    assert all(now == before or before < need for before, now, need in zip(starts, starts[1:], least[1:]))
    assert len(set(starts)) <= 2 * -(-100 // step) + 1
    # repeated code (a run of one token) marks every position of its period as a cut point:
    # the cut still moves about once a step through it, not with every typed token
    run = next(t for t in range(1, 8000) if fim_marked([t] * 4, 3, step))
    code = list(range(3000, 3400)) + [run] * 120 + list(range(4000, 4050))
    cuts = [len(code) + k - len(fit(code + list(range(9000, 9000 + k)), list(range(1000, 1100)), room)[0])
            for k in range(160)]
    assert sum(a != b for a, b in zip(cuts, cuts[1:])) <= 2 * -(-160 // step) + 1, cuts
    assert len(set(ends)) <= -(-100 // step) + 1 and ends == sorted(ends, reverse=True)
    assert min(ends) >= int(room * SUFFIX_SHARE)
    text = "x = 1\n" * 5000
    cuts = {len(text + "y" * k) - len(around_cursor(text + "y" * k, "", room, 16)[0]) for k in range(200)}
    assert len(cuts) == 1 and cuts.pop() % CUT_BLOCK_CHARS == 0
    kept, tail = around_cursor(text, text, room, 16)
    assert text.endswith(kept) and len(kept) >= room * 16 and tail == text[: room * 16]
    assert around_cursor("short", "also short", room, 16) == ("short", "also short")


def test_a_prefix_cut_stays_on_its_code_when_the_window_moves():
    """llama.vscode takes its window again at each request, so a typed newline in a long file
    drops the window's first line: the prefix's cut falls on an anchor of its content, so
    the kept prefix is the same code as before."""
    code = [(i * 7919) % 8000 for i in range(3000)]  # ids of a long file
    for room in (200, 2000):
        kept, _ = fit(code[:2500], list(range(100)), room)
        for moved in (1, 9, 30, 200):
            assert fit(code[moved:2500], list(range(100)), room)[0] == kept, (room, moved)


def test_long_code_is_tokenized_near_the_cursor_only(local):
    """A long file is cut before tokenizing at a first guess of 8 characters a token, and
    again at the sure bound where the text is denser than that; either way the ids near the
    cursor are those of the whole text, more than the room is kept, and typing keeps the
    prefix's cut where it was."""
    _, tok = local
    room, line = 100, "value = compute(alpha, beta) + offset\n"
    prefix, suffix = line * 2000, line * 2000
    p, s, cut = encode_around_cursor(tok.encode, prefix, suffix, room, tok.max_token_bytes)
    assert cut and room < len(p) and room < len(s) and len(tok.decode(p)) < 8 * room + CUT_BLOCK_CHARS
    assert p[-room:] == tok.encode(prefix)[-room:] and s[:room] == tok.encode(suffix)[:room]
    dense = " " * (tok.max_token_bytes * room * 2)  # whitespace runs: tens of characters a token
    p, s, cut = encode_around_cursor(tok.encode, "x = 1\n" + dense, dense + "y = 2\n", room, tok.max_token_bytes)
    assert cut and room < len(p) and room < len(s) and len(tok.decode(p)) > 8 * room
    starts = {tuple(encode_around_cursor(tok.encode, prefix + "z" * k, "", room, tok.max_token_bytes)[0][:room])
              for k in range(0, 400, 7)}
    assert len(starts) == 1
    assert encode_around_cursor(tok.encode, "a = 1", "b = 2", room, 64) == (tok.encode("a = 1"), tok.encode("b = 2"), False)


def test_code_around_the_cursor_that_does_not_fit_is_cut_on_every_route(server, local):
    """An editor sends more code than a 256-token context holds (llama.vscode: 256 lines before the
    cursor, 64 after): every route cuts it away from the cursor as `fit` does, answers the same,
    and says so; the next keystroke reuses the cut prompt from the prompt cache."""
    openai = pytest.importorskip("openai")
    model, tok = local
    prefix = "".join(f"def f{i}(a, b):\n    return a + {i} * b\n\n\n" for i in range(200)) + "def g(a):\n    "
    suffix = "\n\n\n" + "".join(f"print(f{i}(1, 2))\n" for i in range(200))
    kept, heal = back_off(prefix)
    p_ids, s_ids, _ = encode_around_cursor(tok.encode, kept, suffix, 256 - N - 3, tok.max_token_bytes)
    p_ids, s_ids = fit(p_ids, s_ids, 256 - N - 3)
    ids = arrange(tok.fim, p_ids, [], s_ids, "spm")
    assert len(ids) <= 256 - N and len(s_ids) >= int((256 - N - 3) * SUFFIX_SHARE)
    fim = tok.fim
    want = generate(model, tok, [ids], SamplingParams(max_new_tokens=N, stop_ids=fim.all, heal=heal,
                                                      suffix_stop=SuffixStop.of(prefix, suffix)))[0][0]
    i = post(server, {"input_prefix": prefix, "input_suffix": suffix, "n_predict": N, "temperature": 0}, "/infill")
    assert i.status_code == 200 and i.json()["truncated"] is True and i.json()["tokens_evaluated"] == len(ids)
    assert i.json()["content"] == want.text and "X-Polycoder-Truncated" in i.headers
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    raw = client.completions.with_raw_response.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=N,
                                                      temperature=0)
    assert raw.parse().choices[0].text == want.text and "X-Polycoder-Truncated" in raw.headers
    r = post(server, {"model": "tiny", "prompt": prefix, "suffix": suffix, "stream": False,
                      "options": {"temperature": 0, "num_predict": N}}, "/api/generate")
    assert r.json()["response"] == want.text and r.json()["prompt_eval_count"] == len(ids)
    recomputed = 0
    for k in range(1, 9):  # keystrokes: the cut prefix moves at most once, in a step (an editor's n_predict stays)
        typed = post(server, {"input_prefix": prefix + "return a + b"[:k], "input_suffix": suffix, "n_predict": N,
                              "temperature": 0}, "/infill").json()
        assert typed["truncated"] is True
        recomputed += typed["timings"]["prompt_n"] > 4
    assert recomputed <= 1
    still_serves(server)


# ---- the three routes, FIM model -------------------------------------------------------------

def test_greedy_answer_is_the_same_on_every_route(server, local):
    openai = pytest.importorskip("openai")
    want = expected(local)
    r = post(server, {"model": "tiny", "prompt": PREFIX, "suffix": SUFFIX, "stream": False,
                      "options": {"temperature": 0, "num_predict": N}}, "/api/generate").json()
    assert r["response"] == want.text and r["done"] is True
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    c = client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=N, temperature=0)
    assert c.choices[0].text == want.text
    assert c.usage.prompt_tokens == len(local[1].encode(back_off(PREFIX)[0])) + len(local[1].encode(SUFFIX)) + 3
    i = post(server, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": N, "temperature": 0}, "/infill")
    assert i.status_code == 200 and i.json()["content"] == want.text and i.json()["stop"] is True
    assert i.json()["tokens_evaluated"] == c.usage.prompt_tokens
    # the cursor at the end of the document: an empty suffix is a cursor there on OpenAI's route too
    at_end = expected(local, suffix="")
    c = client.completions.create(model="tiny", prompt=PREFIX, suffix="", max_tokens=N, temperature=0)
    i = post(server, {"input_prefix": PREFIX, "input_suffix": "", "n_predict": N, "temperature": 0}, "/infill")
    assert c.choices[0].text == i.json()["content"] == at_end.text
    assert c.usage.prompt_tokens == len(expected_ids(local, suffix=""))


def test_repeat_penalty_at_the_cursor_is_the_same_on_llama_cpps_and_ollamas_routes(server, local):
    """Both count the last repeat_last_n tokens of the whole prompt (the FIM prompt, as
    llama.cpp's server does) and of the answer."""
    penalties = Penalties(repeat=1.6, presence=-2.0, last_n=24)  # a negative presence favours the window
    want = expected(local, penalties=penalties)
    assert want.token_ids != expected(local).token_ids, "the penalty changed nothing"
    i = post(server, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": N, "temperature": 0,
                      "repeat_penalty": 1.6, "presence_penalty": -2.0, "repeat_last_n": 24}, "/infill")
    assert i.status_code == 200 and i.json()["content"] == want.text
    r = post(server, {"model": "tiny", "prompt": PREFIX, "suffix": SUFFIX, "stream": False,
                      "options": {"temperature": 0, "num_predict": N, "repeat_penalty": 1.6, "presence_penalty": -2.0,
                                  "repeat_last_n": 24}}, "/api/generate").json()
    assert r["response"] == want.text


def test_the_ollama_package_generates_with_a_suffix(server, local):
    ollama = pytest.importorskip("ollama")
    want = expected(local)
    client = ollama.Client(host=server.url)
    r = client.generate(model="tiny", prompt=PREFIX, suffix=SUFFIX, options={"temperature": 0, "num_predict": N})
    assert r.response == want.text and r.done and r.prompt_eval_count == len(expected_ids(local))
    parts = list(client.generate(model="tiny", prompt=PREFIX, suffix=SUFFIX, stream=True,
                                 options={"temperature": 0, "num_predict": N}))
    assert "".join(p.response for p in parts) == want.text and parts[-1].done


def test_every_route_streams_the_same_text(server, local):
    openai = pytest.importorskip("openai")
    want = expected(local)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    chunks = list(client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=N, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": N, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/infill", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == want.text
    assert events[-1]["stop_type"] in ("eos", "limit", "word") and events[-1]["tokens_predicted"] >= 1


def test_continue_ollama_provider_request(server, local):
    """What Continue's Ollama provider does for autocomplete: /api/show (a `.Suffix` in the
    template means FIM), then a streamed /api/generate with prompt, suffix and options."""
    show = httpx.post(server.url + "/api/show", json={"name": "tiny"}, timeout=30).json()
    assert ".Suffix" in show["template"] and "insert" in show["capabilities"]
    stop = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>", "\n\n\n"]
    body = {"model": "tiny", "prompt": PREFIX, "suffix": SUFFIX, "keep_alive": 1800, "stream": True,
            "options": {"temperature": 0, "top_p": 0.95, "top_k": 40, "num_predict": N, "stop": stop, "num_ctx": 256}}
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and "".join(x["response"] for x in lines) == expected(local, stop=stop).text


def test_llama_vscode_infill_request(server, local):
    """llama.vscode's body: input_extra chunks with filename and time, its sampler settings, the
    cache-warming call with n_predict 0, and the answer fields it reads."""
    chunks = [{"text": "import math\n", "time": 1700000000, "filename": "util.py"},
              {"text": "def sub(a, b):\n    return a - b\n", "time": 1700000001, "filename": "ops.py"}]
    warm = post(server, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": chunks, "prompt": "",
                         "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500,
                         "t_max_predict_ms": 1}, "/infill")
    assert warm.status_code == 200 and warm.json()["content"] == "" and warm.json()["tokens_predicted"] == 0
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": chunks, "prompt": "re", "n_predict": N,
            "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000, "n_indent": 4}
    r = post(server, body, "/infill").json()
    for key in ("content", "stop", "tokens_predicted", "tokens_evaluated", "timings", "truncated", "stop_type"):
        assert key in r
    assert set(r["timings"]) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"}
    assert r["truncated"] is False and 1 <= r["tokens_predicted"] <= N
    greedy = post(server, {**body, "temperature": 0}, "/infill").json()
    want = expected(local, extra=[c["text"] for c in chunks], middle="re", min_indent=4)
    assert greedy["content"] == want.text
    deep = post(server, {**body, "temperature": 0, "n_predict": 40, "n_indent": 12}, "/infill").json()
    assert deep["content"] == expected(local, extra=[c["text"] for c in chunks], middle="re", n=40, min_indent=12).text


def test_llama_vim_infill_request(server, local):
    """llama.vim's body: `response_fields` picks the answer's fields, each under its path
    ("timings/prompt_n", which llama.vim reads for its status line); its ring-buffer call asks
    for [""] and gets an empty object."""
    fields = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
              "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
              "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"]
    chunks = [{"text": "import math\n", "time": [1700000000, 0], "filename": "util.py"}]
    body = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n\nprint(add(1, 2))\n", "input_extra": chunks,
            "prompt": "    ", "n_predict": N, "n_indent": 4, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1500, "response_fields": fields, "temperature": 0}
    r = post(server, body, "/infill")
    assert r.status_code == 200 and set(r.json()) == set(fields)
    whole = post(server, {k: v for k, v in body.items() if k != "response_fields"}, "/infill").json()
    assert r.json()["content"] == whole["content"] and r.json()["timings/prompt_n"] >= 0
    ring = post(server, {"input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "", "n_predict": 0,
                         "temperature": 0.0, "stream": False, "samplers": [], "cache_prompt": True,
                         "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}, "/infill")
    assert ring.status_code == 200 and ring.json() == {}
    bad = post(server, {**body, "response_fields": "content"}, "/infill")
    assert bad.status_code == 400 and "response_fields" in bad.json()["error"]["message"]


def test_extra_context_that_does_not_fit_is_cut_from_the_front(server, local):
    huge = [{"text": f"x{i} = {i}\n" * 40} for i in range(200)]  # far more than a 256-token context
    r = post(server, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": huge, "n_predict": 4,
                      "temperature": 0}, "/infill")
    assert r.status_code == 200 and r.json()["truncated"] is True
    # the context filled, no more, but for less than a step of the cut (what typing keeps in place)
    assert 256 - 4 - cut_step(256) < r.json()["tokens_evaluated"] <= 256 - 4
    too_many = post(server, {"input_prefix": "", "input_suffix": "", "input_extra": [{"text": "a"}] * 300}, "/infill")
    assert too_many.status_code == 400 and "at most 256" in too_many.json()["error"]["message"]


def test_stop_at_suffix_by_default_and_per_request(server, local):
    prefix, suffix = "total = add(", ")\nprint(total)\n"  # the cursor mid-line: a one-line answer
    on = post(server, {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 40, "temperature": 0}, "/infill")
    assert on.json()["content"] == expected(local, prefix, suffix, n=40).text and "\n" not in on.json()["content"]
    off = post(server, {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 40, "temperature": 0,
                        "stop_at_suffix": False}, "/infill")
    assert off.json()["content"] == expected(local, prefix, suffix, n=40, rule=False).text
    o = post(server, {"model": "tiny", "prompt": prefix, "suffix": suffix, "stream": False,
                      "options": {"temperature": 0, "num_predict": 40, "stop_at_suffix": False}}, "/api/generate")
    assert o.json()["response"] == off.json()["content"]
    c = post(server, {"prompt": prefix, "suffix": suffix, "max_tokens": 40, "temperature": 0})
    assert c.json()["choices"][0]["text"] == on.json()["content"]


def test_mid_line_rule_cuts_a_sampled_newline_on_every_route(server, local):
    """Seeded sampling (the same draws on the server as here) until a sample writes a newline:
    the server's answer ends just before it, on each route."""
    model, tok = local
    prefix, suffix = "total = add(", ")\nprint(total)\n"
    ids = arrange(tok.fim, tok.encode(prefix), [], tok.encode(suffix), "spm")
    fim = tok.fim
    for seed in range(40):
        free = SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed,
                              stop_ids=(fim.prefix, fim.middle, fim.suffix, fim.pad))
        if "\n" in generate(model, tok, [ids], free)[0][0].text:
            break
    else:
        pytest.fail("no seed in 40 samples a newline")
    rule = SamplingParams(**{**free.__dict__, "suffix_stop": SuffixStop.of(prefix, suffix)})
    want = generate(model, tok, [ids], rule)[0][0]
    assert want.finish_reason == "stop" and "\n" not in want.text
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": seed}
    i = post(server, {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 40, **sampling}, "/infill").json()
    assert (i["content"], i["stop_type"]) == (want.text, "word")
    c = post(server, {"prompt": prefix, "suffix": suffix, "max_tokens": 40, **sampling}).json()["choices"][0]
    assert (c["text"], c["finish_reason"]) == (want.text, "stop")
    o = post(server, {"model": "tiny", "prompt": prefix, "suffix": suffix, "stream": False,
                      "options": {"num_predict": 40, **sampling}}, "/api/generate").json()
    assert (o["response"], o["done_reason"]) == (want.text, "stop")


def test_disconnect_frees_the_row(server):
    for path, body in (("/infill", {"input_prefix": "while True:\n", "input_suffix": "\n", "n_predict": 200,
                                    "temperature": 0, "stream": True, "stop_at_suffix": False}),
                       ("/api/generate", {"model": "tiny", "prompt": "while True:\n", "suffix": "\n", "stream": True,
                                          "options": {"temperature": 0, "num_predict": 200, "stop_at_suffix": False}})):
        with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
        deadline = time.time() + 30
        while httpx.get(server.url + "/health", timeout=30).json()["active_rows"] and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.get(server.url + "/health", timeout=30).json()["active_rows"] == 0, path
    still_serves(server)


# ---- what the prompt cache supplied, per request ---------------------------------------------

CACHE_PREFIX = "def scale(values, k):\n    out = []\n    for v in values:\n        "
CACHE_SUFFIX = "\n    return out\n\n\nprint(scale([1, 2], 3))\n"


def test_infill_reports_tokens_cached_and_honours_cache_prompt_false(server):
    """An editor's next keystroke: the SPM prompt reuses all but its typed tail (tokens_cached,
    timings.prompt_n = what ran); `cache_prompt: false` runs every token and answers the same."""
    body = {"input_prefix": CACHE_PREFIX, "input_suffix": CACHE_SUFFIX, "n_predict": 4, "temperature": 0}
    first = post(server, body, "/infill").json()
    assert first["tokens_cached"] + first["timings"]["prompt_n"] == first["tokens_evaluated"]
    typed = {**body, "input_prefix": CACHE_PREFIX + "out.ap"}
    cached = post(server, typed, "/infill").json()
    n = cached["tokens_evaluated"]
    assert n > first["tokens_evaluated"] and cached["tokens_cached"] + cached["timings"]["prompt_n"] == n
    assert cached["tokens_cached"] >= first["tokens_evaluated"] - 2  # the prefix's last token or two may change
    cold = post(server, {**typed, "cache_prompt": False}, "/infill").json()
    assert cold["tokens_cached"] == 0 and cold["timings"]["prompt_n"] == cold["tokens_evaluated"] == n
    assert cold["content"] == cached["content"]
    with httpx.stream("POST", server.url + "/infill", json={**typed, "stream": True}, timeout=60) as r:
        last = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")][-1]
    assert last["stop"] is True and last["tokens_cached"] == n - 1  # the same prompt again: all but its last token
    assert last["timings"]["prompt_n"] == 1


def test_typing_above_a_long_suffix_keeps_the_cache(server):
    """A window larger than the context with the cursor near its top (llama.vscode sends 64
    lines after the cursor): the suffix is cut to what the prefix leaves, in steps, so the
    keystrokes reuse all but their typed tail; in SPM the whole prefix follows the suffix's
    cut end, and a cut moving with each typed token recomputed it every time."""
    prefix = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(6)) + "\n\ndef weighted(values):\n    "
    suffix = "".join(f"    total += values[{i}] * {i}\n" for i in range(200))
    ran = []
    for typed in ["t", "to", "tot", "tota", "total", "total ", "total =", "total = 0"]:
        r = post(server, {"input_prefix": prefix + typed, "input_suffix": suffix, "n_predict": 1, "temperature": 0},
                 "/infill").json()
        assert r["truncated"] is True and r["tokens_evaluated"] > 200
        ran.append(r["timings"]["prompt_n"])
    # at most one keystroke crosses a step of the cut; the others run their typed tail only
    assert sum(n > 4 for n in ran[1:]) <= 1, ran


def test_a_typed_newline_that_moves_the_window_keeps_the_cache(server):
    """llama.vscode's window is the 256 lines before the cursor's, taken again at each
    request: in a long file a typed newline drops its first line. The newlines themselves
    are the model's to write (the prompt leaves trailing whitespace out), so the prompt only
    lost its first line; the server's cut of the prefix stays on the same code, and nothing
    is recomputed but the last token."""
    lines = "".join(f"value_{i} = compute({i}, factor={i % 7})\n" for i in range(600)) + "total = 1"
    ran = []
    for typed in ["", "\n", "\n\n", "\n\n\n"]:
        window = (lines + typed).split("\n")  # the last is the cursor's line
        r = post(server, {"input_prefix": "\n".join(window[max(0, len(window) - 1 - 256):]), "input_suffix": SUFFIX,
                          "n_predict": 1, "temperature": 0}, "/infill").json()
        assert r["truncated"] is True
        ran.append(r["timings"]["prompt_n"])
    assert ran[0] > 200 and all(n <= 1 for n in ran[1:]), ran


def test_typing_with_extra_context_that_does_not_fit_keeps_the_cache(server):
    """llama.vscode's ring of other files' chunks is far more than the context holds, and what
    is kept of it is what the code around the cursor leaves. That share shrinks as the
    prefix grows; cut to the token, it moved the whole prompt at every keystroke. It is cut
    in steps, so the keystrokes reuse all but their typed tail."""
    ring = [{"text": "".join(f"v{i}_{j} = {j}\n" for j in range(30)), "filename": f"m{i}.py"} for i in range(16)]
    ran = []
    for typed in ["t", "to", "tot", "tota", "total", "total ", "total =", "total = 0"]:
        r = post(server, {"input_prefix": PREFIX + typed, "input_suffix": SUFFIX, "input_extra": ring,
                          "n_predict": 1, "temperature": 0}, "/infill").json()
        assert r["truncated"] is True and r["tokens_evaluated"] > 200
        ran.append(r["timings"]["prompt_n"])
    # at most one keystroke crosses a step of the cut; the others run their typed tail only
    assert sum(n > 4 for n in ran[1:]) <= 1, ran


def test_openai_usage_reports_cached_tokens(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    prompt = CACHE_PREFIX + "out.append("
    kw = {"model": "tiny", "prompt": prompt, "suffix": CACHE_SUFFIX, "max_tokens": 3, "temperature": 0}
    client.completions.create(**kw)
    again = client.completions.create(**kw).usage
    assert again.prompt_tokens_details.cached_tokens == again.prompt_tokens - 1
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.prompt_tokens - 1
    # n samples of one prompt: the prompt counted once, as prompt_tokens counts it
    plain = {"model": "tiny", "prompt": "import os\nimport sys\n\n\ndef main(", "max_tokens": 2, "n": 3}
    client.completions.create(**plain)
    u = client.completions.create(**plain).usage
    assert u.prompt_tokens_details.cached_tokens == u.prompt_tokens - 1


@pytest.mark.parametrize("path, body, field", [
    ("/infill", {"input_prefix": 3, "input_suffix": ""}, "input_prefix"),
    ("/infill", {"input_suffix": ""}, "input_prefix"),
    ("/infill", {"input_prefix": "", "input_suffix": "", "input_extra": "util.py"}, "input_extra"),
    ("/infill", {"input_prefix": "", "input_suffix": "", "input_extra": [{"filename": "a.py"}]}, "text"),
    ("/infill", {"input_prefix": "", "input_suffix": "", "input_extra": [{"text": "", "filename": 1}]}, "filename"),
    ("/infill", {"input_prefix": "", "input_suffix": "", "n_predict": "many"}, "n_predict"),
    ("/infill", {"input_prefix": "", "input_suffix": "", "repeat_penalty": -1}, "repeat_penalty"),
    ("/infill", {"input_prefix": "", "input_suffix": "", "repeat_last_n": 1.5}, "repeat_last_n"),
    ("/infill", {"input_prefix": "", "input_suffix": "", "t_max_predict_ms": "1s"}, "t_max_predict_ms"),
    ("/infill", {"input_prefix": "", "input_suffix": "", "n_predict": 10**6}, "n_predict"),
    ("/api/generate", {"model": "tiny", "prompt": "a", "suffix": "b", "options": {"num_predict": 10**6}}, "num_predict"),
    ("/infill", {"input_prefix": "", "input_suffix": "", "prompt": ["x"]}, "prompt"),
    ("/infill", b'{"input_prefix": "a", "input_suffix": "\\ud800"}', "input_suffix"),  # a lone surrogate
    ("/infill", {"input_prefix": "", "input_suffix": "", "prompt": "x = 1\n" * 300, "n_predict": 8}, "n_predict"),
    ("/v1/completions", {"prompt": "a", "suffix": 7}, "suffix"),
    ("/v1/completions", {"prompt": ["a", "b"], "suffix": "c"}, "suffix"),
    ("/v1/completions", {"prompt": "a", "suffix": "b", "echo": True}, "echo"),
    ("/api/generate", {"model": "tiny", "prompt": "a", "suffix": ["b"]}, "suffix"),
    # sentinels that spell no cursor are not cut at the start (where a sentinel may be)
    ("/api/generate", {"model": "tiny", "prompt": "<fim_prefix>" + "x = 1\n" * 300 + "<fim_middle>",
                       "options": {"num_predict": 8}}, "suffix"),
    ("/api/generate", {"model": "tiny", "prompt": "a", "suffix": "b", "options": {"stop_at_suffix": "yes"}},
     "stop_at_suffix"),
])
def test_hostile_bodies_get_a_clear_400(server, path, body, field):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    else:
        r = post(server, body, path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert field in message
    if path == "/infill":
        assert error["code"] == 400 and error["type"] == "invalid_request_error"
    still_serves(server)


# ---- PSM, and a model without FIM tokens -----------------------------------------------------

@pytest.mark.slow
def test_psm_order_is_honoured(fim_folder, local):
    s = Server(fim_folder, "--fim-order", "psm", "--max-batch-size", "2")
    try:
        want = expected(local, order="psm")
        assert want.text != expected(local, order="spm").text or want.token_ids  # both are real answers
        r = post(s, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": N, "temperature": 0}, "/infill")
        assert r.json()["content"] == want.text
        assert r.json()["prompt"].startswith("<fim_prefix>" + back_off(PREFIX)[0] + "<fim_suffix>")
        show = httpx.post(s.url + "/api/show", json={"model": "tiny"}, timeout=30).json()
        assert "<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}<fim_middle>" in show["template"]
    finally:
        s.stop()


@pytest.fixture(scope="module")
def plain_server(tiny_folder):
    s = Server(tiny_folder, "--max-batch-size", "2")
    yield s
    s.stop()


def test_a_model_without_fim_tokens_refuses_a_suffix(plain_server):
    r = post(plain_server, {"model": "tiny", "prompt": "a", "suffix": "b"}, "/api/generate")
    assert (r.status_code, r.json()) == (400, {"error": "tiny:latest does not support insert"})
    r = post(plain_server, {"input_prefix": "a", "input_suffix": "b"}, "/infill")
    assert r.status_code == 501
    assert r.json() == {"error": {"code": 501, "message": NOT_SUPPORTED, "type": "not_supported_error"}}
    r = post(plain_server, {"prompt": "a", "suffix": "b"})
    assert r.status_code == 400 and "polycoder finetune --fim" in r.json()["error"]["message"]
    assert "--suffix-fallback prefix-only" in r.json()["error"]["message"]
    show = httpx.post(plain_server.url + "/api/show", json={"model": "tiny"}, timeout=30).json()
    assert show["template"] == "{{ .Prompt }}" and show["capabilities"] == ["completion"]
    empty = post(plain_server, {"prompt": "a", "suffix": "", "max_tokens": 2, "temperature": 0})
    assert empty.status_code == 200  # without FIM tokens, an empty suffix is no suffix
    # a template that spells out a cursor is refused as a suffix is, on every route (not completed as text)
    templated = "<fim_prefix>a<fim_suffix>b<fim_middle>"
    r = post(plain_server, {"prompt": templated, "max_tokens": 2})
    assert r.status_code == 400 and "polycoder finetune --fim" in r.json()["error"]["message"]
    r = post(plain_server, {"model": "tiny", "prompt": templated, "stream": False}, "/api/generate")
    assert (r.status_code, r.json()) == (400, {"error": "tiny:latest does not support insert"})
    r = post(plain_server, {"prompt": templated}, "/completion")
    assert r.status_code == 501 and r.json()["error"]["message"] == NOT_SUPPORTED
    still_serves(plain_server)


@pytest.mark.slow
def test_prefix_only_fallback_says_the_suffix_was_ignored(tiny_folder):
    model, tok = load_model(tiny_folder)
    s = Server(tiny_folder, "--suffix-fallback", "prefix-only", "--max-batch-size", "2", log=tiny_folder.parent / "fb.log")
    try:
        kept, heal = back_off(PREFIX)
        want = generate(model, tok, [kept], SamplingParams(max_new_tokens=N, suffix_stop=SuffixStop.of(PREFIX, SUFFIX),
                                                            heal=heal))
        r = post(s, {"model": "tiny", "prompt": PREFIX, "suffix": SUFFIX, "stream": False,
                     "options": {"temperature": 0, "num_predict": N}}, "/api/generate")
        assert r.json()["response"] == want[0][0].text and "suffix was ignored" in r.json()["warning"]
        assert "suffix was ignored" in r.headers["x-polycoder-warning"]
        c = post(s, {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": N, "temperature": 0})
        assert c.json()["choices"][0]["text"] == want[0][0].text and "suffix was ignored" in c.json()["warning"]
        i = post(s, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": N, "temperature": 0}, "/infill")
        assert i.json()["content"] == want[0][0].text and "suffix was ignored" in i.json()["warning"]
        # a templated cursor falls back the same way
        t = post(s, {"prompt": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>", "n_predict": N,
                     "temperature": 0}, "/completion")
        assert t.json()["content"] == want[0][0].text and "suffix was ignored" in t.json()["warning"]
        assert "suffix was ignored" in s.logs()
        # the start says where editors connect, and that this model cannot fill in the middle
        assert f"llama.cpp {s.url}/infill and /completion" in s.logs() and "docs/editors.md" in s.logs()
        assert "no fill-in-the-middle tokens" in s.logs() and "completed from the prefix alone" in s.logs()
        long = "".join(f"x{i} = {i}\n" for i in range(400)) + "y = "  # far more than the 256-token context
        kept, heal = back_off(long)
        ids, _ = fit(tok.encode(kept), [], 256 - N)
        want = generate(model, tok, [ids], SamplingParams(max_new_tokens=N, suffix_stop=SuffixStop.of(long, SUFFIX),
                                                          heal=heal))
        cut = post(s, {"input_prefix": long, "input_suffix": SUFFIX, "n_predict": N, "temperature": 0}, "/infill")
        assert cut.json()["content"] == want[0][0].text and cut.json()["truncated"] is True
        assert cut.json()["tokens_evaluated"] == len(ids) and "x-polycoder-truncated" in cut.headers
    finally:
        s.stop()


def test_the_command_line_fills_the_middle_as_the_server_does(server, local, fim_folder, tiny_folder, tmp_path):
    """`polycoder generate --suffix` builds the server's at-cursor prompt and stop rules: the
    same greedy middle as /infill, the long code cut the same way (with --truncate, as the
    command line asks before cutting anything), and the clear refusals."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "polycoder", "generate", "--model", str(fim_folder),
                               "--max-new-tokens", str(N), *args], capture_output=True, text=True, timeout=300)

    assert cli("--prompt", PREFIX, "--suffix", SUFFIX).stdout == expected(local).text
    after = tmp_path / "after.py"
    after.write_text(SUFFIX)
    echoed = cli("--prompt", PREFIX, "--suffix-file", str(after), "--echo", "--fim-order", "psm", "--no-stop-at-suffix")
    assert echoed.stdout == PREFIX + expected(local, order="psm", rule=False).text + SUFFIX  # the whole file
    long = "".join(f"x{i} = {i}\n" for i in range(400)) + "y = "  # far more than the 256-token context
    refused = cli("--prompt", long, "--suffix", SUFFIX)
    assert refused.returncode == 2 and "--truncate" in refused.stderr and "Traceback" not in refused.stderr
    served = post(server, {"input_prefix": long, "input_suffix": SUFFIX, "n_predict": N, "temperature": 0}, "/infill")
    assert served.json()["truncated"] is True
    assert cli("--prompt", long, "--suffix", SUFFIX, "--truncate").stdout == served.json()["content"]
    no_fim = [sys.executable, "-m", "polycoder", "generate", "--model", str(tiny_folder), "--prompt", PREFIX, "--suffix",
              SUFFIX, "--max-new-tokens", str(N)]
    refused = subprocess.run(no_fim, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "polycoder finetune --fim" in refused.stderr and "Traceback" not in refused.stderr
    fell_back = subprocess.run([*no_fim, "--suffix-fallback", "prefix-only"], capture_output=True, text=True, timeout=300)
    model, tok = load_model(tiny_folder)  # the server's fallback: the prefix alone, the suffix's rule kept
    kept, heal = back_off(PREFIX)
    want = generate(model, tok, [kept], SamplingParams(max_new_tokens=N, suffix_stop=SuffixStop.of(PREFIX, SUFFIX),
                                                       heal=heal))[0][0].text
    assert fell_back.returncode == 0 and fell_back.stdout == want and "suffix was ignored" in fell_back.stderr


def test_an_editors_own_fim_template_is_read_as_its_cursor():
    assert read_template(f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>") == Cursor(PREFIX, SUFFIX)
    assert read_template(f"<fim_suffix>{SUFFIX}<fim_prefix>{PREFIX}<fim_middle>re") == Cursor(PREFIX, SUFFIX, "re")
    # StarCoder's SPM spelling: the text after <fim_middle> is the code before the cursor
    assert read_template(f"<fim_prefix><fim_suffix>{SUFFIX}<fim_middle>{PREFIX}") == Cursor(PREFIX, SUFFIX)
    # templates written for other models' sentinels (an editor's configuration carried over)
    assert read_template(f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>") == Cursor(PREFIX, SUFFIX)
    assert read_template(f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>") == Cursor(PREFIX, SUFFIX)
    assert read_template(f"<\uff5cfim\u2581begin\uff5c>{PREFIX}<\uff5cfim\u2581hole\uff5c>{SUFFIX}"
                         f"<\uff5cfim\u2581end\uff5c>") == Cursor(PREFIX, SUFFIX)
    # text before a template that ends the prompt is context (llama.vscode's OpenAI mode puts
    # other files there); before one that does not, the prompt is a file holding a template string
    context = "Context:\n\nimport math\n"
    assert read_template(f"{context}<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>") == Cursor(
        PREFIX, SUFFIX, "", context)
    assert read_template('T = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"\nprint(T') is None
    for text in ("def f():", f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}", "<PRE> <p>text</p> <PRE> <SUF>x <MID>",
                 f"<fim_prefix>{PREFIX}<fim_middle><fim_suffix>{SUFFIX}",
                 "<fim_prefix>a<fim_suffix>b<fim_middle>c<fim_prefix>", "<fim_prefix>a<fim_suffix>b<fim_middle><fim_pad>"):
        assert read_template(text) is None, text


def test_an_editors_own_fim_template_gets_the_suffix_routes_answer(server, local, code_tokenizer):
    """Continue (a template for a raw Ollama prompt) and Tabby (its HTTP completion backends:
    openai/completion, ollama/completion, llama.cpp/completion) spell StarCoder's sentinels out
    in the prompt: the server reads the cursor back out of it and builds the prompt as for a
    `suffix`, so on every route the answer is the suffix route's (its layout, healing, stop
    rule). Sentinels in a prompt that is no cursor template stay the sentinel tokens."""
    model, tok = local
    templated = f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    want = expected(local)
    r = post(server, {"prompt": templated, "max_tokens": N, "temperature": 0}).json()
    assert r["choices"][0]["text"] == want.text and r["usage"]["prompt_tokens"] == len(expected_ids(local))
    o = post(server, {"model": "tiny", "prompt": templated, "raw": True, "stream": False,
                      "options": {"temperature": 0, "num_predict": N}}, "/api/generate").json()
    assert o["response"] == want.text and o["prompt_eval_count"] == len(expected_ids(local))
    c = post(server, {"prompt": templated, "n_predict": N, "temperature": 0}, "/completion").json()
    assert c["content"] == want.text and c["tokens_evaluated"] == len(expected_ids(local))
    qwen = post(server, {"prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>", "n_predict": N,
                         "temperature": 0}, "/completion").json()
    assert qwen["content"] == want.text  # a template for another model's sentinels: the same cursor
    # llama.vscode's OpenAI mode: its chunks as text before the template, read as extra context
    context = "Context:\n\nimport math\n"
    vscode = post(server, {"prompt": f"{context}<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
                           "max_tokens": N, "temperature": 0}).json()
    i = post(server, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": [{"text": context}], "n_predict": N,
                      "temperature": 0}, "/infill").json()
    assert vscode["choices"][0]["text"] == i["content"] == expected(local, extra=[context]).text
    # a template longer than the context is cut as the suffix route cuts the code around the cursor
    long_prefix = "x = 1\n" * 300 + PREFIX
    suffixed = post(server, {"prompt": long_prefix, "suffix": SUFFIX, "max_tokens": N, "temperature": 0})
    cut = post(server, {"prompt": f"<fim_prefix>{long_prefix}<fim_suffix>{SUFFIX}<fim_middle>", "max_tokens": N,
                        "temperature": 0})
    assert cut.status_code == 200 and "X-Polycoder-Truncated" in cut.headers
    assert cut.json()["choices"][0]["text"] == suffixed.json()["choices"][0]["text"]
    # sentinels that spell no cursor: the tokens, as written, the middle ending at a sentinel
    odd = f"<fim_prefix>{PREFIX}<fim_middle>"
    ids = [tok.fim.prefix, *tok.encode(PREFIX), tok.fim.middle]
    assert tok.encode_with_sentinels(odd) == ids
    params = SamplingParams(max_new_tokens=N, stop_ids=tok.fim.all)
    r = post(server, {"prompt": odd, "max_tokens": N, "temperature": 0}).json()
    assert r["choices"][0]["text"] == generate(model, tok, [ids], params)[0][0].text
    # a prompt without sentinels, or a tokenizer without them, is text as before
    assert tok.encode_with_sentinels("a <fim_ b") == tok.encode("a <fim_ b")
    assert tok.encode_with_sentinels("<|endoftext|>") == tok.encode("<|endoftext|>")
    assert code_tokenizer.encode_with_sentinels(templated) == code_tokenizer.encode(templated)


def test_tabby_llama_cpp_completion_backend(server, local):
    """Tabby's `llama.cpp/completion` backend: POST /completion with its body (seed, the
    templated prompt, n_predict, temperature, stream, penalty_last_n, presence_penalty), read
    as Server-Sent Events of `content` until `stop`, as its client reads them."""
    body = {"seed": 0, "prompt": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>", "n_predict": N,
            "temperature": 0.0, "stream": True, "penalty_last_n": 0, "presence_penalty": 0.0}
    with httpx.stream("POST", server.url + "/completion", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert "".join(e["content"] for e in events) == expected(local).text
    assert events[-1]["stop_type"] in ("eos", "limit", "word")


def test_tabby_ollama_completion_backend(server, local):
    """Tabby's `ollama/completion` backend: /api/tags to find the model, then a streamed
    /api/generate with its templated prompt, `template: "{{ .Prompt }}"` and its options."""
    tags = httpx.get(server.url + "/api/tags", timeout=30).json()
    assert any(m["name"] == "tiny:latest" for m in tags["models"])
    body = {"model": "tiny:latest", "prompt": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>",
            "template": "{{ .Prompt }}", "options": {"num_ctx": 1536, "num_predict": N, "seed": 0, "repeat_last_n": 0,
                                                     "temperature": 0}}
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        parts = [json.loads(line) for line in r.iter_lines() if line]
    assert parts[-1]["done"] is True and "".join(p["response"] for p in parts) == expected(local).text


def test_continue_llama_cpp_provider_request(server, local):
    """Continue's `llama.cpp` provider for autocomplete: POST /completion with its StarCoder
    template, its stops and sampling fields (min_p and mirostat, which we ignore), streamed,
    reading `content` of each event."""
    stop = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>", "\n\n\n"]
    body = {"prompt": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>", "stream": True, "n_predict": N,
            "stop": stop, "top_k": 40, "top_p": 0.95, "temperature": 0, "min_p": 0.05, "mirostat": 0,
            "frequency_penalty": 0, "presence_penalty": 0}
    with httpx.stream("POST", server.url + "/completion", json=body, timeout=60,
                      headers={"Authorization": "Bearer undefined"}) as r:  # Continue's header without a key
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == expected(local, stop=stop).text


def test_llama_cpp_completion_of_a_plain_prompt(server, local):
    """/completion without a cursor: text, ids or both (llama.cpp's mixed form) give the local
    model's greedy answer for those ids; a prompt too long for the context loses its start
    (`truncated`); several prompts, or a prompt of another type, get a 400 in llama.cpp's form."""
    model, tok = local
    text = "def mul(a, b):\n    return"
    ids = tok.encode(text)

    def want(prompt_ids, n=N):
        return generate(model, tok, [prompt_ids], SamplingParams(max_new_tokens=n))[0][0].text

    head = tok.encode("def mul(a, b):")
    mixed_ids = head + tok.encode("\n    return")
    for (prompt, prompt_ids), path in zip(((text, ids), (ids, ids), ([*head, "\n    return"], mixed_ids)),
                                          ("/completion", "/completions", "/completion")):  # llama.cpp's alias too
        r = post(server, {"prompt": prompt, "n_predict": N, "temperature": 0}, path)
        assert r.status_code == 200 and r.json()["content"] == want(prompt_ids), prompt
        assert r.json()["tokens_evaluated"] == len(prompt_ids) and r.json()["truncated"] is False
    context = httpx.get(server.url + "/health", timeout=10).json()["context"]
    long = ids * (context // len(ids) + 2)
    r = post(server, {"prompt": long, "n_predict": N, "temperature": 0}, "/completion")
    kept = fit(long, [], context - N)[0]
    assert r.status_code == 200 and r.json()["truncated"] is True and r.json()["tokens_evaluated"] == len(kept)
    assert r.json()["content"] == want(kept)
    for prompt, words in ((["a", "b"], "one prompt a request"), ([[1, 2], [3]], "one prompt a request"),
                          ({"x": 1}, "must be a string"), ([1.5], "must be a string"), ([10 ** 9], "out of the vocabulary")):
        r = post(server, {"prompt": prompt, "n_predict": N}, "/completion")
        assert r.status_code == 400 and words in r.json()["error"]["message"], (prompt, r.text)
    still_serves(server)
