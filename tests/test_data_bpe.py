"""`polycoder tokenizer train`: specials, byte tokens, whitespace runs, padding, and three loaders that agree."""

from __future__ import annotations

import json

import pytest
from test_data_fixtures import c_like, python_code

from polycoder.corpus import write_table
from polycoder.tokenizer import Tokenizer
from polycoder.tokenizer.train import WHITESPACE_TOKENS, train_tokenizer

SAMPLES = [
    "def f(x):\n    return x  +  1\n\n\tif a:\n\t\tpass  # héllo wörld ✓\r\n        \n",
    "package main\n\nfunc main() {\n\tfor i := 0; i < 10; i++ {\n\t\tfmt.Println(\"x\")\n\t}\n}\n",
    "class A {\n    void f() {\n        int x = 1;            // aligned\n    }\n}\n",
    "  \n \n\n\n\t \t x\u00a0y 😀 <|endoftext|>",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    rows = []
    for i in range(40):
        text = python_code(i) if i % 2 else c_like(i, "Go")
        rows.append({"repo": f"o/r{i}", "path": f"f{i}", "language": "Python" if i % 2 else "Go",
                     "size": len(text), "sha256": f"{i:064x}", "text": text, "source": "t", "licence": None})
    write_table(rows[:30], root / "split" / "train" / "corpus-00000.parquet")
    write_table(rows[30:], root / "split" / "heldout" / "corpus-00000.parquet")
    report = train_tokenizer(root / "split", root / "tok", vocab_size=1000, sample=1.0, seed=0)
    return root, report


def test_specials_bytes_and_padding(trained):
    root, report = trained
    tok = Tokenizer.from_pretrained(root / "tok")
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    assert [vocab["<|endoftext|>"], vocab["<|padding|>"], vocab["<|separator|>"]] == [0, 1, 2]
    assert tok.lossless and tok.eod_id == 0 and tok.pad_id == 1
    assert tok.vocab_size == report["vocab_size"] <= 1000  # a tiny corpus may run out of pairs to merge
    padded = report["padded_vocab_size"]
    assert padded % 64 == 0 and tok.vocab_size <= padded < tok.vocab_size + 64
    saved = json.loads((root / "tok" / "training.json").read_text())
    assert saved["padded_vocab_size"] == padded


def test_fim_sentinels_take_the_last_ids(trained):
    transformers = pytest.importorskip("transformers")
    root, report = trained
    tok = Tokenizer.from_pretrained(root / "tok")
    n = tok.vocab_size
    assert tok.fim is not None and [tok.fim.prefix, tok.fim.middle, tok.fim.suffix, tok.fim.pad] == list(range(n - 4, n))
    assert report["fim_tokens"] == {"<fim_prefix>": n - 4, "<fim_middle>": n - 3, "<fim_suffix>": n - 2,
                                    "<fim_pad>": n - 1}
    assert report["padded_vocab_size"] >= n  # the padding counts the sentinels
    assert tok.encode("<fim_prefix>") != [tok.fim.prefix]  # in data, the text is ordinary characters
    assert tok.encode("<fim_prefix>", allow_special=True) == [tok.fim.prefix]
    hf = transformers.AutoTokenizer.from_pretrained(root / "tok")
    assert hf.convert_tokens_to_ids(["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]) == list(range(n - 4, n))
    assert "<fim_suffix>" in hf.all_special_tokens


def test_whitespace_runs_are_single_tokens(trained):
    root, report = trained
    tok = Tokenizer.from_pretrained(root / "tok")
    for ws in WHITESPACE_TOKENS:
        assert len(tok.encode(ws)) == 1, repr(ws)
    # in code: "\n        return" is the run and the word, not "\n       " + " return" as with GPT-2's regex
    ids = tok.encode("x\n        return y")
    assert tok.decode([ids[1]]) == "\n        " and tok.decode([ids[2]]).startswith("return")
    assert all(n == 1 for name, n in report["whitespace_tokens"].items() if name != "2 newlines")


def test_round_trip_of_any_bytes(trained):
    root, _ = trained
    tok = Tokenizer.from_pretrained(root / "tok")
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    data = bytes(range(256)) * 2 + "é".encode()[:1]
    assert tok.decode_bytes(tok.encode(data)) == data


def test_transformers_loaders_give_our_ids(trained):
    transformers = pytest.importorskip("transformers")
    root, _ = trained
    ours = Tokenizer.from_pretrained(root / "tok")
    for loader in (transformers.AutoTokenizer, transformers.GPT2TokenizerFast):
        hf = loader.from_pretrained(root / "tok")
        for s in SAMPLES[:3]:  # (the last holds a literal special token, which HF encodes as the special)
            assert hf.encode(s, add_special_tokens=False) == ours.encode(s), (loader.__name__, s)
            assert hf.decode(hf.encode(s, add_special_tokens=False)) == s
        assert hf.eos_token_id == 0


def test_sample_is_seeded_and_reproducible(tmp_path, trained):
    root, _ = trained
    a = train_tokenizer(root / "split", tmp_path / "a", vocab_size=600, sample=0.5, seed=3)
    b = train_tokenizer(root / "split", tmp_path / "b", vocab_size=600, sample=0.5, seed=3)
    c = train_tokenizer(root / "split", tmp_path / "c", vocab_size=600, sample=0.5, seed=4)
    assert a["sampled_files"] == b["sampled_files"] and 5 < a["sampled_files"] < 25
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert c["sampled_files"] != a["sampled_files"] or \
        (tmp_path / "c" / "tokenizer.json").read_bytes() != (tmp_path / "a" / "tokenizer.json").read_bytes()


def test_bytes_per_token_report_against_polycoder(trained, tmp_path, polycoder_tokenizer_files):
    root, _ = trained
    report = train_tokenizer(root / "split", tmp_path / "t", vocab_size=1000, sample=1.0,
                             compare_with=polycoder_tokenizer_files[0].parent)
    ours, ref = report["bytes_per_token"], report["reference_bytes_per_token"]
    assert set(ours) == set(ref) == {"Go", "Python"}
    ref_tok = Tokenizer.from_files(*polycoder_tokenizer_files)
    from polycoder.corpus import iter_documents

    texts = [d["text"] for d in iter_documents(root / "split" / "heldout") if d["language"] == "Go"]
    assert ref["Go"]["tokens"] == sum(len(ref_tok.encode(t)) for t in texts)  # recomputed independently
    assert ref["Go"]["bytes"] == sum(len(t.encode()) for t in texts)
    assert report["reference_whitespace_tokens"]["8 spaces"] == 8  # PolyCoder's lost `Ġ Ġ` merge
    assert "| Go |" in (tmp_path / "t" / "training.md").read_text()
