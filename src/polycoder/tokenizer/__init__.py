"""Tokenizers: PolyCoder's byte-level BPE read exactly as at its training time, and training new ones.

- `bpe`: `Tokenizer` (encode / decode / save, lossless on any bytes where the vocabulary
  has all 256 byte tokens), `StreamDecoder`, PolyCoder's merges-file quirk;
- `train`: `polycoder tokenizer train`, a byte-level BPE for code trained on a corpus;
- `cli`: `polycoder tokenize`, token ids of a file or text (and back).

`load_tokenizer(model)` is the tokenizer of a model argument (a folder, a hub id, the
bundled model; a preset's is the plain byte-level one).
"""

from pathlib import Path

from polycoder.config import PRESETS
from polycoder.locate import resolve
from polycoder.tokenizer.bpe import (
    EOD_TOKEN,
    PAD_TOKEN,
    SEP_TOKEN,
    SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    bytes_to_unicode,
    read_merges,
)

__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer", "read_merges", "bytes_to_unicode",
           "EOD_TOKEN", "PAD_TOKEN", "SEP_TOKEN", "SPECIAL_TOKENS"]


def load_tokenizer(model: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a model folder, hub id or the bundled model; a preset's is byte-level."""
    if model is not None and str(model) in PRESETS:
        return Tokenizer.byte_level()
    return Tokenizer.from_pretrained(resolve(model))
