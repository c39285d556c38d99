"""Line breaks at the cursor (`polycoder.line_breaks`): a document with CRLF is read by the
model with LF and completed with CRLF, on every route that completes at a cursor (the
server's three, `polycoder generate --suffix`, `eval infilling`), streamed and whole.

The server test runs the bundled model, which writes line breaks (a random one rarely does):
the answer for a CRLF document must be the LF document's answer with CRLF line breaks."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from polycoder.eval.infilling import _prompt_sha, _served
from polycoder.eval.infilling_tasks import Task, as_read, prompt_ids
from polycoder.generation import SamplingParams
from polycoder.generation.suffix_stop import SuffixStop
from polycoder.generation.text import Sequence
from polycoder.line_breaks import CRLF, LF, cursor_line_break, lf_around_cursor, to_lf, written
from polycoder.locate import BUNDLED_DIR

PREFIX = "function f(xs) {\n  let total = 0;\n  "
SUFFIX = "\n  return total;\n}\n"
N = 40


def crlf(text: str) -> str:
    return text.replace(LF, CRLF)


def test_the_line_break_at_the_cursor_is_that_of_the_cursors_line():
    assert cursor_line_break("a\r\nb", "c\r\nd") == CRLF and cursor_line_break("a\nb", "c\nd") == LF
    assert cursor_line_break("a\nb", "c\r\nd") == CRLF  # mixed: the cursor's line decides
    assert cursor_line_break("a\r\nb", "c\nd") == LF
    assert cursor_line_break("a\r\nb", "") == CRLF and cursor_line_break("a\r\n", "") == CRLF  # the last line
    assert cursor_line_break("x", "") == LF and cursor_line_break("", "") == LF  # no line break: LF
    assert cursor_line_break("a\r", "\nb") == CRLF  # a cursor between \r and \n
    assert cursor_line_break("", "\r\nb") == CRLF and cursor_line_break("", "\nb") == LF
    assert to_lf("a\r\nb\rc\n") == "a\nb\rc\n"  # a lone \r (classic Mac) stays
    assert written("a\nb\r\nc", CRLF) == "a\r\nb\r\nc" and written("a\r\nb\nc", LF) == "a\nb\nc"
    assert lf_around_cursor(crlf(PREFIX), crlf(SUFFIX)) == (PREFIX, SUFFIX, CRLF)


def stream(code_tokenizer, text: str, params: SamplingParams) -> tuple[str, Sequence]:
    """The pieces a Sequence emits for the model writing `text`, one token at a time."""
    seq = Sequence([0], params, code_tokenizer, None)
    out = ""
    for t in code_tokenizer.encode(text):
        out += seq.push(t)
        if seq.done:
            break
    if not seq.done:
        out += seq.finish("eod")
    return out, seq


def test_a_sequence_writes_the_documents_line_breaks_streamed_and_whole(code_tokenizer):
    text = "a = 1\n  b = 2\r\n\r\n    c\r"
    assert [code_tokenizer.decode([t]) for t in code_tokenizer.encode("x\r\ny")] == ["x", "\r", "\n", "y"]
    out, seq = stream(code_tokenizer, text, SamplingParams(max_new_tokens=50, eol=CRLF))
    assert out == seq.output == seq.completion().text == "a = 1\r\n  b = 2\r\n\r\n    c\r"
    assert seq.text == text  # the model's own text, which the stop rules read
    out, seq = stream(code_tokenizer, text, SamplingParams(max_new_tokens=50, eol=LF))  # a CRLF the model wrote
    assert out == seq.output == "a = 1\n  b = 2\n\n    c\r"
    out, seq = stream(code_tokenizer, text, SamplingParams(max_new_tokens=50))  # no cursor: the text as written
    assert out == seq.output == text


def test_a_split_crlf_is_held_back_until_the_next_piece(code_tokenizer):
    seq = Sequence([0], SamplingParams(max_new_tokens=50, eol=CRLF), code_tokenizer, None)
    x, cr, lf, y = code_tokenizer.encode("x\r\ny")
    assert seq.push(x) == "x" and seq.push(cr) == "" and seq.push(lf) == "\r\n" and seq.push(y) == "y"


def test_stop_strings_and_the_suffixs_rule_read_the_models_text(code_tokenizer):
    """A client's stop string with CRLF stops where its LF form is written (the output gets
    CRLF back); the suffix's rule was built from the code as the model reads it."""
    out, seq = stream(code_tokenizer, "a = 1\n\nb = 2\n", SamplingParams(max_new_tokens=50, stop=("\r\n\r\n",), eol=CRLF))
    assert seq.finish_reason == "stop" and out == seq.output == "a = 1"
    prefix, suffix, eol = lf_around_cursor(crlf("def f():\n    "), crlf("\n\nprint(f())\n"))
    params = SamplingParams(max_new_tokens=50, suffix_stop=SuffixStop.of(prefix, suffix), eol=eol)
    out, seq = stream(code_tokenizer, "x = 1\n    return x\n\nprint(f())\nmore", params)
    assert seq.finish_reason == "stop" and out == seq.output == "x = 1\r\n    return x"


def test_eval_infilling_asks_a_crlf_task_as_its_lf_twin(code_tokenizer):
    tok = code_tokenizer.with_fim_tokens()
    task = Task("lines", "Lines/JavaScript/f.js/L2", crlf(PREFIX), "return total;\r\n", crlf(SUFFIX), None, "JavaScript")
    twin = Task("lines", "Lines/JavaScript/f.js/L2", PREFIX, "return total;\n", SUFFIX, None, "JavaScript")
    assert as_read(task) == twin and as_read(twin) is twin
    for mode in ("fim", "prefix-only"):
        assert prompt_ids(tok, task, mode, "spm", 200) == prompt_ids(tok, twin, mode, "spm", 200)
        assert _prompt_sha(task, mode, "spm") != _prompt_sha(twin, mode, "spm")  # samples drawn before are redrawn
    # A FIM answer read by the server's rules: cut where the model's text meets the suffix, written with CRLF.
    assert _served(task, "total += 1;\n  total *= 2;\n  return total;\n}\n") == "total += 1;\r\n  total *= 2;"


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("fastapi")
    from serve_server import Server

    s = Server(BUNDLED_DIR)
    yield s
    s.stop()


def test_every_route_answers_a_crlf_document_as_its_lf_twin(server):
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")

    def infill(prefix: str, suffix: str, stream: bool = False) -> str:
        body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": N, "temperature": 0, "stream": stream}
        if not stream:
            return httpx.post(server.url + "/infill", json=body, timeout=120).json()["content"]
        with httpx.stream("POST", server.url + "/infill", json=body, timeout=120) as r:
            return "".join(json.loads(line[6:])["content"] for line in r.iter_lines() if line.startswith("data: "))

    lf_answer = infill(PREFIX, SUFFIX)
    assert LF in lf_answer, "the bundled model should write more than one line here"
    want = written(lf_answer, CRLF)
    assert infill(crlf(PREFIX), crlf(SUFFIX)) == want and infill(crlf(PREFIX), crlf(SUFFIX), stream=True) == want
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    c = client.completions.create(model="tiny", prompt=crlf(PREFIX), suffix=crlf(SUFFIX), max_tokens=N, temperature=0)
    assert c.choices[0].text == want
    # Its logprobs' tokens are written as the text is, their offsets follow them.
    lp = client.completions.create(model="tiny", prompt=crlf(PREFIX), suffix=crlf(SUFFIX), max_tokens=N, temperature=0,
                                   logprobs=2).choices[0].logprobs
    joined = "".join(lp.tokens)
    assert want in joined and joined == written(joined, CRLF)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(k == written(k, CRLF) for alts in lp.top_logprobs for k in alts)
    parts = ollama.Client(host=server.url).generate(model="tiny", prompt=crlf(PREFIX), suffix=crlf(SUFFIX), stream=True,
                                                   options={"temperature": 0, "num_predict": N})
    assert "".join(p.response for p in parts) == want
    # A plain prompt (llama.cpp's /completion without a cursor) is written as the model writes
    # it: a CRLF stop string stays CRLF, where at a cursor it is read as LF.
    plain = httpx.post(server.url + "/completion", json={"prompt": PREFIX, "n_predict": N, "temperature": 0},
                       timeout=120).json()["content"]
    assert LF in plain and CRLF not in plain
    kept = httpx.post(server.url + "/completion", json={"prompt": PREFIX, "n_predict": N, "temperature": 0,
                                                        "stop": [CRLF]}, timeout=120).json()["content"]
    assert kept == plain
    # The command line, the same: the completion with CRLF, and --echo the whole file as it was.
    cli = subprocess.run([sys.executable, "-m", "polycoder", "generate", "--prompt", crlf(PREFIX), "--suffix",
                          crlf(SUFFIX), "--max-new-tokens", str(N), "--echo"], capture_output=True, timeout=300)
    assert cli.returncode == 0 and cli.stdout.decode() == crlf(PREFIX) + want + crlf(SUFFIX)
