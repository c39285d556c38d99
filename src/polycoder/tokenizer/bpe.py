"""PolyCoder's byte-level BPE tokenizer, on the `tokenizers` library.

PolyCoder's merges file (`code-merges.txt`) has no `#version` header. Every loader used at
training time (Megatron's GPT2Tokenizer, transformers 4.x's GPT2Tokenizer) skips the first
line of a merges file regardless, so the first merge, `Ġ Ġ`, was never applied: a run of N
spaces is N tokens. `tokenizers` reading the same file keeps that merge and gives other ids.
`Tokenizer.from_files` reproduces the training-time reading; `save` then writes the merges
*with* a `#version` header, so that every loader reads the same merges from our folders.

Text is never normalised: tabs, CRLF and runs of spaces are part of the program. Bytes
that are not valid UTF-8 are encoded as their single-byte tokens, so with a vocabulary that
has all 256 byte tokens (every tokenizer `polycoder tokenizer train` makes)
`decode_bytes(encode(data)) == data` for any `data` (`Tokenizer.lossless`).

Limit of PolyCoder's released vocabulary: it has no token for `\r` (byte 13) nor for the
bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF); the model never saw a carriage
return. `tokenizers` would silently drop such characters; we instead read CR LF and a lone
CR as LF, and a missing invalid byte as U+FFFD, so nothing vanishes without a trace.

Reference: Radford et al., GPT-2 `encoder.py` (byte-to-unicode map, BPE by merge rank).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from polycoder.errors import PolycoderError
from polycoder.fim import FIM_TOKENS, FimIds

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
SEP_TOKEN = "<|separator|>"
SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN, SEP_TOKEN)

_SURROGATES = re.compile("[\udc80-\udcff]+")
_SENTINELS = re.compile("|".join(map(re.escape, FIM_TOKENS)))


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """Merges as training-time loaders read them: the first line is always dropped.

    With a `#version` header that line is the header; without one (PolyCoder's file) it is
    the first merge, which Megatron and transformers 4.x both lost.
    """
    lines = Path(path).read_text(encoding="utf-8").split("\n")[1:]
    merges = []
    for i, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise PolycoderError(f"{path}:{i}: a merge must be two symbols separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class Tokenizer:
    """Encode code to token ids and back, exactly, with PolyCoder's training-time ids."""

    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eod_id = vocab.get(EOD_TOKEN, 0)
        self.pad_id = vocab.get(PAD_TOKEN, self.eod_id)
        self.special_ids = {vocab[t] for t in (*SPECIAL_TOKENS, *FIM_TOKENS) if t in vocab}
        self.fim = FimIds.of(vocab)
        """The fill-in-the-middle sentinels' ids (polycoder.fim), or None for a left-to-right tokenizer."""
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        table: list[bytes] = [b""] * self.vocab_size
        for token, i in vocab.items():
            if i in self.special_ids:
                table[i] = token.encode("utf-8")
            else:
                table[i] = bytes(byte_decoder[c] for c in token) if all(c in byte_decoder for c in token) else token.encode()
        self._id_to_bytes = table
        self.max_token_bytes = max(len(b) for b in table)
        encoder = bytes_to_unicode()
        self._byte_ids: list[int | None] = [vocab.get(encoder[b]) for b in range(256)]
        self.lossless = all(i is not None for i in self._byte_ids)
        self._cr_missing = self._byte_ids[13] is None
        self._agreeing: dict[bytes, list[int]] = {}

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_file: str | Path, merges_file: str | Path) -> Tokenizer:
        """GPT-2 style `vocab.json` + `merges.txt`, read as at PolyCoder's training time."""
        for f in (vocab_file, merges_file):
            if not Path(f).is_file():
                raise PolycoderError(f"tokenizer file not found: {f}")
        try:
            vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PolycoderError(f"{vocab_file} is not valid JSON ({e}); expected a GPT-2 style vocab.json") from e
        merges = read_merges(merges_file)
        return cls.from_vocab_and_merges(vocab, merges)

    @classmethod
    def from_vocab_and_merges(cls, vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        specials = [t for t in SPECIAL_TOKENS if t in vocab]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return cls(backend)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """A folder (tokenizer.json, vocab.json + merges.txt, or PolyCoder's released
        code-vocab.json + code-merges.txt) or a tokenizer.json file."""
        path = Path(path)
        if path.is_file():
            try:
                return cls(HFTokenizer.from_file(str(path)))
            except Exception:  # a vocab.json, or any other file: one message for all
                raise PolycoderError(f"{path} is not a tokenizer.json; give the tokenizer's folder (tokenizer.json, "
                                     "vocab.json + merges.txt, or code-vocab.json + code-merges.txt)") from None
        if (path / "tokenizer.json").is_file():
            return cls(HFTokenizer.from_file(str(path / "tokenizer.json")))
        for vocab, merges in (("vocab.json", "merges.txt"), ("code-vocab.json", "code-merges.txt")):
            if (path / vocab).is_file() and (path / merges).is_file():
                return cls.from_files(path / vocab, path / merges)
        raise PolycoderError(
            f"no tokenizer in {path}: expected tokenizer.json, or vocab.json and merges.txt "
            "(or point --tokenizer at a folder that has them)"
        )

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """A plain byte-level tokenizer (3 special tokens + 256 bytes, no merges), for
        randomly initialised presets: the same ids in every installation."""
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        for _, ch in sorted(bytes_to_unicode().items()):
            vocab[ch] = len(vocab)
        return cls.from_vocab_and_merges(vocab, [])

    def with_fim_tokens(self) -> Tokenizer:
        """This tokenizer with the four FIM sentinels added as special tokens after its
        last id (a tokenizer that has them already is returned as it is); every existing
        id keeps its meaning, so a model's embeddings only grow."""
        if self.fim is not None:
            return self
        backend = HFTokenizer.from_str(self.backend.to_str())
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FIM_TOKENS])
        return Tokenizer(backend)

    # ---- encoding -----------------------------------------------------------------------

    def encode(self, text: str | bytes, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, without any added BOS/EOS.

        `allow_special=False` (the default, as at training time) encodes a literal
        `<|endoftext|>` in the text as ordinary characters; True maps it to its id.
        Bytes that are not valid UTF-8 become single-byte tokens.
        """
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="surrogateescape")
        if not _SURROGATES.search(text):
            return self._encode_str(text, allow_special)
        ids: list[int] = []
        pos = 0
        for m in _SURROGATES.finditer(text):
            if m.start() > pos:
                ids += self._encode_str(text[pos : m.start()], allow_special)
            for c in m.group():
                i = self._byte_ids[ord(c) - 0xDC00]
                ids += [i] if i is not None else self._encode_str("\ufffd", False)
            pos = m.end()
        if pos < len(text):
            ids += self._encode_str(text[pos:], allow_special)
        return ids

    def encode_with_sentinels(self, text: str) -> list[int]:
        """Token ids of a prompt that may spell out the fill-in-the-middle sentinels (an
        editor's own StarCoder template, `<fim_prefix>...<fim_suffix>...<fim_middle>`): each
        sentinel becomes its id and the text between them is encoded on its own, as training
        tokenized the parts. Other special tokens stay text; a tokenizer without the
        sentinels encodes the whole text as text."""
        if self.fim is None or "<fim_" not in text:
            return self.encode(text)
        ids: list[int] = []
        pos = 0
        for m in _SENTINELS.finditer(text):
            ids += self.encode(text[pos: m.start()]) + [self.backend.token_to_id(m.group())]
            pos = m.end()
        return ids + self.encode(text[pos:])

    def _encode_str(self, text: str, allow_special: bool) -> list[int]:
        if self._cr_missing and "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        self.backend.encode_special_tokens = not allow_special
        return self.backend.encode(text, add_special_tokens=False).ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on `len(self.encode(text))`, without tokenizing: every character is at
        least one byte and no token covers more than `max_token_bytes` bytes (a carriage
        return may vanish into the newline after it, so it is not counted)."""
        return -(-(len(text) - text.count("\r")) // self.max_token_bytes)

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (the `tokenizers` thread pool)."""
        if self._cr_missing or any(_SURROGATES.search(t) for t in texts):
            return [self.encode(t, allow_special) for t in texts]
        self.backend.encode_special_tokens = not allow_special
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    # ---- decoding -----------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """The exact bytes behind `ids`; ids of the padded vocabulary tail decode to nothing."""
        table, n = self._id_to_bytes, self.vocab_size
        if skip_special:
            return b"".join(table[i] for i in ids if 0 <= i < n and i not in self.special_ids)
        return b"".join(table[i] for i in ids if 0 <= i < n)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def token_bytes(self, i: int) -> bytes:
        return self._id_to_bytes[i] if 0 <= i < self.vocab_size else b""

    def tokens_agreeing(self, text: bytes) -> list[int]:
        """The ids of the ordinary tokens whose bytes could start a continuation that begins
        with `text`: a token that is a prefix of `text`, or that `text` is a prefix of
        (token healing: `polycoder.generation.text`). Cached, since a cursor's whitespace
        takes few forms."""
        found = self._agreeing.get(text)
        if found is None:
            found = [i for i, b in enumerate(self._id_to_bytes)
                     if b and i not in self.special_ids and (text.startswith(b) or b.startswith(text))]
            if len(self._agreeing) >= 256:
                self._agreeing.clear()
            self._agreeing[text] = found
        return found

    # ---- saving -------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json, vocab.json, merges.txt (with header) and tokenizer_config.json.

        transformers 5 opens such a folder from tokenizer.json; transformers 4.x and other
        GPT-2 readers get the same merges because merges.txt carries a `#version` header.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.encode_special_tokens = False
        self.backend.save(str(folder / "tokenizer.json"))
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec["model"]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        eod = EOD_TOKEN
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": eod,
            "eos_token": eod,
            "unk_token": eod,
            "pad_token": PAD_TOKEN if PAD_TOKEN in spec["model"]["vocab"] else eod,
            "add_prefix_space": False,
            "model_max_length": 2048,
            "clean_up_tokenization_spaces": False,
        }
        if self.fim is not None:
            config["additional_special_tokens"] = list(FIM_TOKENS)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(
            json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token",
                                               "additional_special_tokens") if k in config}, indent=2) + "\n",
            encoding="utf-8",
        )


class StreamDecoder:
    """Turns ids into text as they arrive, never emitting half a UTF-8 character.

    The concatenation of everything `push` and `flush` return equals `Tokenizer.decode` of
    all ids at once (both replace invalid sequences with U+FFFD the same way).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Iterable[int]) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
