"""Perplexity: our windows are lm-eval's rolling windows (its own worked example, and an
independent re-implementation of get_rolling_token_windows + make_disjoint_window + the
input its Hugging Face backend builds); our pooled log-likelihood equals transformers'
GPTNeoXForCausalLM on those windows; Pygments token counts equal Pygments' own; the cache makes re-runs free; a held-out
tree (RAW/heldout/{Language}/{source}/...) is read as the language table claims its files,
`max_files` picks the same files in the order of their paths' SHA-256, and the loss in nats
per model token equals an independent cross-entropy sum and log(token perplexity)."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("polycoder.checkpoint")
transformers = pytest.importorskip("transformers")

import polycoder  # noqa: E402
from polycoder.checkpoint import build_model, load_model, save_checkpoint  # noqa: E402
from polycoder.config import ModelConfig  # noqa: E402
from polycoder.errors import PolycoderError  # noqa: E402
from polycoder.eval.perplexity import WINDOWING, perplexity, read_documents, rolling_windows  # noqa: E402
from polycoder.options import ModelOptions  # noqa: E402
from polycoder.tokenizer import Tokenizer  # noqa: E402

FILES = {
    "Python": {"a.py": "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n" * 6,
               "pkg/b.py": "import os\n\nclass K:\n    x = 1  # comment\n"},
    "C": {"m.c": "#include <stdio.h>\nint main(void) {\n\tprintf(\"hi\\n\");\n\treturn 0;\n}\n"},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    config = ModelConfig.from_preset("test-tiny").replace(block_size=32)
    save_checkpoint(build_model(config, seed=1), Tokenizer.byte_level(), folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    for lang, files in FILES.items():
        for name, text in files.items():
            path = root / lang / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return root


def lm_eval_requests(tokens: list[int], prefix: int, L: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling log-likelihood requests for `tokens`, and the model input its Hugging
    Face backend builds for each: (input ids, continuation scored on the last positions).
    Written from lm-eval's method: get_rolling_token_windows(context_len=1), then
    make_disjoint_window, then input = (context + continuation)[-(L + 1):][:-1]. The window
    loop follows lm-eval's the same way `rolling_windows` does, so comparing with this checks
    the disjoint-window and input slicing; the windows themselves are checked against
    lm-eval's own worked example (test_rolling_windows_are_lm_evals)."""
    windows, done = [], 0
    first = min(L, len(tokens))
    windows.append(([prefix] + tokens[: first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, L)  # max_seq_len - context_len + 1 new tokens a window
        end = done + n
        windows.append((tokens[end - L - 1 : end - 1], tokens[end - n : end]))
        done = end
    requests = []
    for a, b in windows:
        context = a[: len(a) - (len(b) - 1)]  # make_disjoint_window
        requests.append(((context + b)[-(L + 1):][:-1], b))
    return requests


def test_rolling_windows_are_lm_evals():
    # lm-eval's own worked example (its tests/test_utils.py): 34 tokens, L = 10.
    assert rolling_windows(list(range(34)), -100, 10) == [
        ([-100, 0, 1, 2, 3, 4, 5, 6, 7, 8], list(range(10))),
        (list(range(9, 19)), list(range(10, 20))),
        (list(range(19, 29)), list(range(20, 30))),
        (list(range(23, 33)), [30, 31, 32, 33]),
    ]
    for n in (1, 5, 31, 32, 33, 64, 65, 100, 129):
        tokens = list(range(1, n + 1))
        wins = rolling_windows(tokens, 0, 32)
        assert wins == lm_eval_requests(tokens, 0, 32), n
        assert [t for _, tgt in wins for t in tgt] == tokens  # every token scored exactly once
        assert all(len(i) <= 32 and len(t) <= len(i) for i, t in wins)
    assert rolling_windows([], 0, 32) == []


def test_pooled_loglik_equals_transformers(tiny, data, tmp_path):
    from pygments.lexers import get_lexer_by_name

    res = perplexity(data=data, out=tmp_path, model=[str(tiny)])[str(tiny)]
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()
    tok = Tokenizer.byte_level()
    lexers = {"Python": "python", "C": "c"}
    for lang, files in FILES.items():
        ll, n_tok, n_pyg, n_bytes = 0.0, 0, 0, 0
        for text in files.values():
            tokens = tok.encode(text)
            for inp, cont in lm_eval_requests(tokens, 0, 32):  # lm-eval's requests, transformers' logits
                with torch.no_grad():
                    logp = torch.log_softmax(hf(torch.tensor([inp])).logits.double(), -1)[0, -len(cont):]
                ll += logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
            n_tok += len(tokens)
            lexer = get_lexer_by_name(lexers[lang], stripnl=False, stripall=False, ensurenl=False)
            n_pyg += len(list(lexer.get_tokens(text)))
            n_bytes += len(text.encode())
        r = res[lang]
        assert r["files"] == len(files)
        assert r["model_tokens"] == n_tok and r["pygments_tokens"] == n_pyg
        assert r["loglik"] == pytest.approx(ll, rel=1e-5)
        assert r["pygments_perplexity"] == pytest.approx(math.exp(-ll / n_pyg), rel=1e-5)
        assert r["token_perplexity"] == pytest.approx(math.exp(-ll / n_tok), rel=1e-5)
        assert r["bits_per_byte"] == pytest.approx(-ll / (math.log(2) * n_bytes), rel=1e-5)
    saved = json.loads((tmp_path / "perplexity.json").read_text())
    assert set(saved[str(tiny)]["Python"]) >= {"files", "model_tokens", "pygments_tokens",
                                                "pygments_perplexity", "token_perplexity", "bits_per_byte"}
    assert saved[str(tiny)]["Python"]["windowing"] == WINDOWING and WINDOWING in (tmp_path / "perplexity.md").read_text()
    assert (tmp_path / "perplexity.md").is_file() and (tmp_path / "perplexity.png").is_file()


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another random model of tiny's architecture and tokenizer (other weights)."""
    folder = tmp_path_factory.mktemp("other") / "model"
    config = ModelConfig.from_preset("test-tiny").replace(block_size=32)
    save_checkpoint(build_model(config, seed=2), Tokenizer.byte_level(), folder)
    return folder


def test_cache_resumes_and_models_sit_side_by_side(tiny, other, data, tmp_path):
    first = perplexity(data=data, out=tmp_path, model=[str(tiny)])
    cache = next((tmp_path / "cache").glob("*.jsonl"))
    lines = cache.read_text()
    assert len(lines.splitlines()) == 3
    again = perplexity(data=data, out=tmp_path, model=[str(tiny), str(other)])
    assert cache.read_text() == lines  # nothing rescored
    assert again[str(tiny)] == first[str(tiny)]
    assert set(again) == {str(tiny), str(other)}
    assert again[str(other)]["Python"]["loglik"] != first[str(tiny)]["Python"]["loglik"]
    # The same folder with --random-init is other weights: its cached rows are not reused.
    rand = perplexity(data=data, out=tmp_path, model=[str(tiny)], model_options=ModelOptions(random_init=True))
    assert rand[str(tiny)]["Python"]["loglik"] != first[str(tiny)]["Python"]["loglik"]
    assert len(cache.read_text().splitlines()) == 6


# A held-out tree as `polycoder data fetch` writes it: RAW/heldout/{Language}/{source}/...
# Claimed files (by the language table) and files it does not claim, side by side.
TREE = {
    "Python/requests/src/api.py": b"def get(url, **kw):\n    return request('get', url, **kw)\n",
    "Python/requests/src/models.py": b"class Response:\n    status_code = 200\n" * 5,
    "Python/requests/setup.py": b"from setuptools import setup\nsetup(name='requests')\n",
    "Python/requests/README.md": b"# Requests\nHTTP for humans.\n",
    "Python/requests/Makefile": b"test:\n\tpytest\n",
    "Python/flask/app.py": b"from flask import Flask\napp = Flask(__name__)\n",
    "Python/flask/latin1.py": b"name = 'caf\xe9'\n",  # not UTF-8: read with replacement
    "Python/flask/cli.py": b"import click\n\n@click.command()\ndef main():\n    pass\n",
    "Go/cobra/command.go": b"package cobra\n\ntype Command struct {\n\tUse string\n}\n",
    "Go/cobra/LICENSE": b"Apache License 2.0\n",
    "C++/fmt/include/format.h": b"#pragma once\nnamespace fmt { int format(); }\n",  # .h: C or C++
    "C++/fmt/src/format.cc": b"#include \"format.h\"\nint fmt::format() { return 0; }\n",
    "Ruby/rake/README.md": b"# Rake\n",  # a language folder with nothing the table claims
}
CLAIMED = {"Python": ["requests/src/api.py", "requests/src/models.py", "requests/setup.py", "flask/app.py",
                      "flask/latin1.py", "flask/cli.py"],
           "Go": ["cobra/command.go"], "C++": ["fmt/include/format.h", "fmt/src/format.cc"]}


def _write_tree(root: Path, order: list[str]) -> Path:
    for rel in order:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(TREE[rel])
    # Skipped as heldout sets always skipped them: a symlink and a file over 1 MB.
    (root / "Python/flask/link.py").symlink_to(root / "Python/flask/app.py")
    (root / "Python/flask/huge.py").write_bytes(b"x = 1\n" * (1 << 18))
    return root


def _hash_order(language: str, max_files: int = 0) -> list[str]:
    """Expected names, computed here: SHA-256 of the path relative to the language folder."""
    rels = sorted(CLAIMED[language], key=lambda r: hashlib.sha256(r.encode()).hexdigest())
    return [f"{language}/{r}" for r in rels[: max_files or None]]


@pytest.fixture(scope="module")
def heldout_tree(tmp_path_factory):
    return _write_tree(tmp_path_factory.mktemp("raw") / "heldout", list(TREE))


@pytest.fixture(scope="module")
def bundled_like(tmp_path_factory):
    """A random model with the bundled model's tokenizer (8192 tokens), saved by us."""
    folder = tmp_path_factory.mktemp("bundled_like") / "model"
    tok = Tokenizer.from_pretrained(Path(polycoder.__file__).parent / "assets" / "polycoder-tiny")
    model = build_model(ModelConfig.from_preset("test-tiny").replace(vocab_size=8192, block_size=64), seed=1)
    save_checkpoint(model, tok, folder)
    return folder


def test_heldout_tree_reads_only_claimed_files(heldout_tree):
    docs = read_documents(heldout_tree)
    assert [d.name for d in docs] == _hash_order("C++") + _hash_order("Go") + _hash_order("Python")
    assert {d.language for d in docs} == {"C++", "Go", "Python"}  # Ruby/ holds only a README
    latin = next(d for d in docs if d.name.endswith("latin1.py"))
    assert latin.text == "name = 'caf\ufffd'\n"
    only_readme = heldout_tree.parent / "readme-only"
    (only_readme / "Python" / "src").mkdir(parents=True)
    (only_readme / "Python" / "src" / "README.md").write_text("# nothing to score\n")
    with pytest.raises(PolycoderError, match="language table claims"):
        read_documents(only_readme)


def test_max_files_picks_the_same_files_in_hash_order(heldout_tree, tmp_path):
    picked = [d.name for d in read_documents(heldout_tree, max_files=2)]
    assert picked == _hash_order("C++", 2) + _hash_order("Go", 2) + _hash_order("Python", 2)
    assert [d.name for d in read_documents(heldout_tree, max_files=2)] == picked
    # The same tree written in the opposite order (another directory order): the same files.
    again = _write_tree(tmp_path / "heldout", list(reversed(TREE)))
    assert [d.name for d in read_documents(again, max_files=2)] == picked
    assert [d.name for d in read_documents(heldout_tree, ["Python"], max_files=4)] == _hash_order("Python", 4)
    with pytest.raises(PolycoderError, match="max-files"):
        read_documents(heldout_tree, max_files=-1)


def test_loss_in_nats_per_token_is_log_token_perplexity(heldout_tree, bundled_like, tmp_path):
    res = perplexity(data=heldout_tree, out=tmp_path, model=[str(bundled_like)], max_files=3)[str(bundled_like)]
    assert set(res) == {"C++", "Go", "Python"}
    assert res["Python"]["files"] == 3 and res["Go"]["files"] == 1
    # Independent of the scorer: one window at a time, summed cross-entropy (nats).
    model, tok = load_model(bundled_like)
    for lang, r in res.items():
        nll, n = 0.0, 0
        for doc in read_documents(heldout_tree, [lang], max_files=3):
            for inp, cont in lm_eval_requests(tok.encode(doc.text), tok.eod_id, 64):
                with torch.no_grad():
                    logits = model(torch.tensor([inp]))[0, -len(cont):].float()
                nll += F.cross_entropy(logits, torch.tensor(cont), reduction="sum").item()
                n += len(cont)
        assert r["model_tokens"] == n
        assert r["loss"] == pytest.approx(nll / n, rel=1e-5)
        assert r["loss"] == pytest.approx(math.log(r["token_perplexity"]), rel=1e-12)
    saved = json.loads((tmp_path / "perplexity.json").read_text())[str(bundled_like)]
    assert saved["Python"]["loss"] == pytest.approx(res["Python"]["loss"])
    md = (tmp_path / "perplexity.md").read_text()
    assert "## Loss in nats per model token" in md and "loss (nats/token)" in md
    assert f"| {res['Python']['loss']:.3f} |" in md and f"| {res['Go']['loss']:.4f} |" in md
