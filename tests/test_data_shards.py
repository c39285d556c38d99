"""Token shards: the header read independently, refusal of damaged files, tokenize -> decode byte for byte."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from test_data_fixtures import c_like, python_code

from polycoder.corpus import iter_documents, write_table
from polycoder.data.tokenize import tokenize_corpus
from polycoder.errors import PolycoderError
from polycoder.token_shards import HEADER_BYTES, list_shards, read_shard, write_shard
from polycoder.tokenizer import Tokenizer


def test_header_layout_read_with_struct(tmp_path):
    docs = [[5, 6, 7], [9], []]
    path = write_shard(tmp_path / "s.bin", docs, vocab_size=50304)
    raw = path.read_bytes()
    magic, version, itemsize, n_tokens, n_docs, vocab = struct.unpack_from("<8s5q", raw, 0)
    assert (magic, version, itemsize, n_tokens, n_docs, vocab) == (b"PCTOKENS", 1, 2, 7, 3, 50304)
    assert raw[48:HEADER_BYTES] == b"\0" * (HEADER_BYTES - 48)
    tokens = struct.unpack_from("<7H", raw, HEADER_BYTES)
    assert tokens == (5, 6, 7, 0, 9, 0, 0)  # EOD after every document, the empty one included
    offsets = struct.unpack_from("<3q", raw, HEADER_BYTES + 14)
    assert offsets == (0, 4, 6)
    assert len(raw) == HEADER_BYTES + 14 + 24
    shard = read_shard(path)
    assert shard.tokens.dtype == np.uint16 and not shard.tokens.flags.writeable
    assert shard.doc_offsets.tolist() == [0, 4, 6] and shard.vocab_size == 50304
    assert shard.document(0).tolist() == [5, 6, 7, 0] and shard.document(2).tolist() == [0]


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    path = write_shard(tmp_path / "s.bin", [[70000, 1]], vocab_size=70001)
    assert struct.unpack_from("<q", path.read_bytes(), 16)[0] == 4
    shard = read_shard(path)
    assert shard.tokens.dtype == np.uint32 and shard.tokens.tolist() == [70000, 1, 0]


def test_out_of_range_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        write_shard(tmp_path / "s.bin", [[50304]], vocab_size=50304)
    assert not (tmp_path / "s.bin").exists()


@pytest.mark.parametrize("damage", ["truncate", "extend", "magic", "version", "itemsize", "short"])
def test_damaged_shards_are_refused_with_the_fix(tmp_path, damage):
    path = write_shard(tmp_path / "shard_00000.bin", [list(range(1, 100))] * 3, vocab_size=1000)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-5]
    elif damage == "extend":
        raw += b"\0\0"
    elif damage == "magic":
        raw[:8] = b"NOTTOKEN"
    elif damage == "version":
        raw[8:16] = struct.pack("<q", 2)
    elif damage == "itemsize":
        raw[16:24] = struct.pack("<q", 3)
    else:
        raw = raw[:100]
    path.write_bytes(bytes(raw))
    with pytest.raises(PolycoderError) as e:
        read_shard(path)
    assert str(path) in str(e.value)
    assert "polycoder data tokenize" in str(e.value) or "upgrade" in str(e.value)


def test_list_shards(tmp_path):
    with pytest.raises(PolycoderError, match="no token shards"):
        list_shards(tmp_path, "train")
    for i in (1, 0):
        write_shard(tmp_path / "train" / f"shard_{i:05d}.bin", [[1]], vocab_size=10)
    assert [p.name for p in list_shards(tmp_path, "train")] == ["shard_00000.bin", "shard_00001.bin"]


def _corpus(tmp_path: Path) -> Path:
    """A split corpus by hand: tabs, CRLF, non-ASCII, a literal <|endoftext|>, several shards."""
    texts = [python_code(i) for i in range(6)] + [c_like(i, "Go") for i in range(3)]
    texts += ["s = 'héllo wörld ✓ 😀'\r\nprint(s)  # <|endoftext|> stays text\r\n" * 5, "\t\tx\n\n\n   y   \n"]
    rows = [{"repo": f"o/r{i % 3}", "path": f"f{i}.py", "language": "Go" if "package" in t else "Python",
             "size": len(t.encode()), "sha256": str(i), "text": t, "source": "t", "licence": None}
            for i, t in enumerate(texts)]
    corpus = tmp_path / "split"
    write_table(rows[:5], corpus / "train" / "corpus-00000.parquet")
    write_table(rows[5:9], corpus / "train" / "corpus-00001.parquet")
    write_table(rows[9:], corpus / "test" / "corpus-00000.parquet")
    return corpus


@pytest.fixture(scope="module")
def lossless_tokenizer(tmp_path_factory) -> Path:
    from polycoder.corpus import write_table
    from polycoder.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    rows = [{"repo": "o/r", "path": f"f{i}.py", "language": "Python", "size": 1, "sha256": str(i),
             "text": python_code(i), "source": "t", "licence": None} for i in range(20)]
    write_table(rows, root / "c" / "corpus-00000.parquet")
    train_tokenizer(root / "c", root / "tok", vocab_size=700, sample=1.0)
    return root / "tok"


def test_tokenize_then_decode_gives_each_document_byte_for_byte(tmp_path, lossless_tokenizer):
    corpus = _corpus(tmp_path)
    meta = tokenize_corpus(corpus, lossless_tokenizer, tmp_path / "tokens", workers=1, shard_tokens=1000)
    tok = Tokenizer.from_pretrained(tmp_path / "tokens" / "tokenizer")
    assert tok.lossless
    for split in ("train", "test"):
        docs = [d["text"].encode("utf-8") for d in iter_documents(corpus, split)]
        got = []
        for path in list_shards(tmp_path / "tokens", split):
            shard = read_shard(path)
            for i in range(len(shard)):
                ids = shard.document(i).tolist()
                assert ids[-1] == tok.eod_id == 0 and 0 not in ids[:-1]
                got.append(tok.decode_bytes(ids[:-1]))
        assert got == docs
    assert meta["splits"]["train"]["documents"] == 9 and meta["splits"]["train"]["shards"] > 2
    assert meta["splits"]["train"]["languages"]["Go"]["documents"] == 3
    assert meta["vocab_size"] == tok.vocab_size and meta["eod_id"] == 0
    assert json.loads((tmp_path / "tokens" / "meta.json").read_text())["splits"]["test"]["documents"] == 2


def test_shards_are_identical_for_any_worker_count(tmp_path, lossless_tokenizer):
    corpus = _corpus(tmp_path)
    tokenize_corpus(corpus, lossless_tokenizer, tmp_path / "a", workers=1, shard_tokens=3000)
    tokenize_corpus(corpus, lossless_tokenizer, tmp_path / "b", workers=2, shard_tokens=3000)
    for split in ("train", "test"):
        a, b = list_shards(tmp_path / "a", split), list_shards(tmp_path / "b", split)
        assert [p.name for p in a] == [p.name for p in b]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_polycoder_tokenizer_shards(tmp_path, polycoder_tokenizer_files):
    corpus = _corpus(tmp_path)
    vocab, _ = polycoder_tokenizer_files
    meta = tokenize_corpus(corpus, vocab.parent, tmp_path / "t", workers=1)
    assert meta["vocab_size"] == 50257 and meta["format"]["itemsize"] == 2
    tok = Tokenizer.from_files(*polycoder_tokenizer_files)
    shard = read_shard(list_shards(tmp_path / "t", "train")[0])
    first = next(iter_documents(corpus, "train"))["text"]
    assert shard.document(0).tolist() == tok.encode(first) + [0]
