"""PolyCoder's tokenizer: training-time ids, exact round trips, saved folders."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
from gpt2_reference import ReferenceBPE
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoTokenizer, GPT2TokenizerFast

from polycoder.errors import PolycoderError
from polycoder.tokenizer import Tokenizer, read_merges

SNIPPETS = {
    "Go": 'package main\n\nimport "fmt"\n\nfunc main() {\n\tfor i := 0; i < 10; i++ {\n\t\tfmt.Println("héllo", i)\n\t}\n}\n',
    "Rust": "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{:?} → ok\", v);\n}\n",
    "JavaScript": "const f = async (x) => {\n  await fetch(`/api/${x}`);\n  return x ?? 'défaut';\n};\n",
    "Java": "public class A {\n    public static void main(String[] args) {\n        System.out.println(\"Grüße\");\n    }\n}\n",
    "Ruby": "def greet(name)\n  puts \"こんにちは, #{name}\"\nend\n",
    "C++": ("#include <vector>\ntemplate <typename T>\nT sum(const std::vector<T>& v) {\n"
            "\tT s{};\n\tfor (auto& x : v) s += x;\n\treturn s;\n}\n"),
    "PHP": "<?php\nfunction f($a) {\n        return array_map(fn($x) => $x * 2, $a);\n}\n",
    "Scala": "object Main extends App {\n  val xs = List(1, 2, 3)\n  println(xs.map(_ + 1))\n}\n",
    "TypeScript": "interface P { name: string; age?: number }\nexport const p: P = { name: \"Zoë\" };\n",
    "C#": "namespace N {\n    class C {\n        static void Main() => System.Console.WriteLine(\"ñ\");\n    }\n}\n",
    "spaces": "x" + " " * 17 + "y\n" + "\t" * 5 + "z  \n\n\n    \n",
}


def real_files() -> list[Path]:
    """Real source files every Python installation has: the standard library and its C headers."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    include = Path(sysconfig.get_paths()["include"])
    files = [stdlib / "inspect.py", stdlib / "json" / "decoder.py", stdlib / "textwrap.py"]
    files += [include / n for n in ("object.h", "Python.h", "pyport.h")]
    return [f for f in files if f.is_file()]


@pytest.fixture(params=["code", "polycoder"])
def any_tokenizer(request):
    """Each generic property is checked on a tokenizer of ours (the bundled code BPE, always)
    and on PolyCoder's released one (where ../shared has it)."""
    return request.getfixturevalue("code_tokenizer" if request.param == "code" else "polycoder_tokenizer")


@pytest.fixture(scope="module")
def reference(polycoder_tokenizer_files):
    return ReferenceBPE(*polycoder_tokenizer_files)


def test_ids_equal_training_time_reading_on_real_code(polycoder_tokenizer, reference):
    texts = [f.read_text(encoding="utf-8") for f in real_files()] + list(SNIPPETS.values())
    assert len(texts) >= 12
    for text in texts:
        text = text.replace("\r", "")  # PolyCoder's vocabulary has no carriage return (tested below)
        assert polycoder_tokenizer.encode(text) == reference.encode(text)


def test_first_merge_is_dropped_so_space_runs_are_one_token_a_space(polycoder_tokenizer, polycoder_tokenizer_files):
    vocab, merges = polycoder_tokenizer_files
    assert read_merges(merges)[0] == ("ĠĠ", "ĠĠ")  # the header-less file's first merge `Ġ Ġ` is gone
    snippet = "def f(x):\n        if x:\n            return x\n        return 0\n"
    ours = polycoder_tokenizer.encode(snippet)
    space = polycoder_tokenizer.encode(" ")[0]
    assert ours.count(space) >= 20  # every indenting space is its own token
    # `tokenizers` reading the same file keeps `Ġ Ġ` and gives different (fewer) ids.
    naive = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    naive.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert len(naive.encode(snippet).ids) < len(ours)


def test_decode_returns_the_text_exactly(any_tokenizer):
    for text in [f.read_text(encoding="utf-8") for f in real_files()] + list(SNIPPETS.values()):
        text = text.replace("\r", "")  # not in PolyCoder's vocabulary (tested below)
        assert any_tokenizer.decode(any_tokenizer.encode(text)) == text


def test_carriage_return_is_read_as_newline_not_dropped(polycoder_tokenizer):
    assert not polycoder_tokenizer.lossless
    assert polycoder_tokenizer.encode("a\r\nb\rc") == polycoder_tokenizer.encode("a\nb\nc")


def test_invalid_utf8_does_not_crash_and_keeps_valid_parts(any_tokenizer):
    data = b"int x = 1; /* \xff\xfe caf\xc3\xa9 \xc3 */\n"
    out = any_tokenizer.decode_bytes(any_tokenizer.encode(data))
    if any_tokenizer.lossless:
        assert out == data
    assert out.startswith(b"int x = 1; /* ") and b"caf\xc3\xa9" in out and out.endswith(b" */\n")


def test_lossless_vocabulary_round_trips_every_byte():
    tok = Tokenizer.byte_level()
    assert tok.lossless
    rng = random.Random(0)
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        assert tok.decode_bytes(tok.encode(data)) == data
    assert tok.decode_bytes(tok.encode(b"a\r\n\tb")) == b"a\r\n\tb"


def test_special_token_text_is_ordinary_text_unless_allowed(any_tokenizer):
    assert any_tokenizer.encode("<|endoftext|>", allow_special=True) == [0]
    ids = any_tokenizer.encode("<|endoftext|>")
    assert 0 not in ids and any_tokenizer.decode(ids) == "<|endoftext|>"


def test_stream_decoder_never_emits_half_a_character(any_tokenizer):
    text = "naïve → 日本語 🙂 done"
    ids = any_tokenizer.encode(text)
    dec = any_tokenizer.stream_decoder()
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_saved_folder_opens_in_transformers_with_the_same_ids(any_tokenizer, tmp_path):
    any_tokenizer.save(tmp_path)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version")
    again = Tokenizer.from_pretrained(tmp_path)
    text = SNIPPETS["spaces"] + SNIPPETS["Go"]
    assert again.encode(text) == any_tokenizer.encode(text)
    for cls in (AutoTokenizer, GPT2TokenizerFast):
        hf = cls.from_pretrained(tmp_path)
        assert hf(text)["input_ids"] == any_tokenizer.encode(text)
        assert hf.eos_token_id == 0
    if set(any_tokenizer.backend.get_added_tokens_decoder()) <= set(any_tokenizer.special_ids):
        # vocab.json + merges.txt alone (transformers 4.x style) give the same ids too; a
        # tokenizer with added whitespace tokens keeps them in tokenizer.json only (tokenizer.train)
        (tmp_path / "tokenizer.json").unlink()
        assert Tokenizer.from_pretrained(tmp_path).encode(text) == any_tokenizer.encode(text)


def test_missing_tokenizer_files_give_a_clear_error(tmp_path):
    with pytest.raises(PolycoderError, match="no tokenizer"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("a b\n")
    with pytest.raises(PolycoderError, match="not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
