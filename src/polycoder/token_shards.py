"""Token shards: the binary format that training reads and `polycoder data tokenize` writes.

One shard file (after llm.c's and nanoGPT's uint16 memmaps, with the boundaries the
original lacked):

    bytes 0..1023   header: b"PCTOKENS", then little-endian int64 fields
                    version (1), itemsize (2: uint16; 4: uint32 when vocab_size > 65535),
                    n_tokens, n_docs, vocab_size; the rest zero
    then            n_tokens token ids (uint16 or uint32, little-endian)
    then            n_docs int64 document start offsets (in tokens, ascending, first 0)

Every document ends with EOD (`<|endoftext|>`, id 0), so a model never runs from one file
into the next (PolyCoder's data had no separator). The reader checks magic, version,
itemsize and that the size is exactly header + tokens + offsets; anything else is refused
with an error naming the file and the fix.

A tokens folder: TOKENS_DIR/{train,valid,test}/shard_00000.bin ..., TOKENS_DIR/meta.json
(vocab size, EOD id, counts per split and language, the tokenizer it was made with) and a
copy of that tokenizer in TOKENS_DIR/tokenizer/.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polycoder.errors import PolycoderError
from polycoder.files import atomic_path

MAGIC = b"PCTOKENS"
VERSION = 1
HEADER_BYTES = 1024
EOD_ID = 0

def itemsize_for(vocab_size: int) -> int:
    """2 (uint16) unless the vocabulary has more than 65535 tokens, then 4 (uint32)."""
    return 4 if vocab_size > 65535 else 2


@dataclass
class TokenShard:
    """One shard, memory-mapped."""

    tokens: np.memmap
    """All token ids, a read-only 1-D memmap (uint16 or uint32)."""
    doc_offsets: np.ndarray
    """int64 start of each document in `tokens` (each document ends with EOD)."""
    vocab_size: int
    """Vocabulary size of the tokenizer that made it."""
    path: Path = field(default_factory=Path)
    """The shard file."""

    def __len__(self) -> int:
        return len(self.doc_offsets)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i, its trailing EOD included."""
        end = self.doc_offsets[i + 1] if i + 1 < len(self.doc_offsets) else len(self.tokens)
        return self.tokens[self.doc_offsets[i] : end]


def _fail(path: Path, what: str) -> PolycoderError:
    return PolycoderError(f"{path}: {what}; the shard is truncated or corrupt: delete it and rerun `polycoder data tokenize`")


def read_shard(path: str | Path) -> TokenShard:
    """Open and check one shard (see the module docstring for the format)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise PolycoderError(f"token shard not found: {path}; make shards with `polycoder data tokenize`") from None
    if len(header) < HEADER_BYTES:
        raise _fail(path, f"{size} bytes, shorter than the {HEADER_BYTES}-byte header")
    if header[:8] != MAGIC:
        raise PolycoderError(f"{path} is not a polycoder token shard (magic {header[:8]!r}, expected {MAGIC!r}); "
                             "make shards with `polycoder data tokenize`")
    version, itemsize, n_tokens, n_docs, vocab_size = np.frombuffer(header, dtype="<i8", count=5, offset=8).tolist()
    if version != VERSION:
        raise PolycoderError(f"{path}: shard format version {version}, this polycoder reads version {VERSION}; "
                             "re-tokenize with this version or upgrade polycoder")
    if itemsize not in (2, 4):
        raise _fail(path, f"itemsize {itemsize} in the header (expected 2 or 4)")
    if n_tokens < 0 or n_docs < 0 or vocab_size <= 0:
        raise _fail(path, f"impossible header (n_tokens={n_tokens}, n_docs={n_docs}, vocab_size={vocab_size})")
    expected = HEADER_BYTES + n_tokens * itemsize + n_docs * 8
    if size != expected:
        raise _fail(path, f"{size} bytes, but its header promises {expected} ({n_tokens} tokens x {itemsize} + {n_docs} offsets)")
    dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    tokens = (np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,)) if n_tokens
              else np.zeros(0, dtype=dtype))
    offsets = np.fromfile(path, dtype="<i8", count=n_docs, offset=HEADER_BYTES + n_tokens * itemsize)
    if n_docs and (offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] >= n_tokens):
        raise _fail(path, "document offsets are not ascending from 0 within the tokens")
    return TokenShard(tokens, offsets.astype(np.int64), vocab_size, path)


def write_shard(path: str | Path, token_arrays: Iterable[Sequence[int] | np.ndarray], vocab_size: int,
                append_eod: bool = True) -> Path:
    """Write documents to one shard, atomically (`polycoder.files.atomic_path`).

    `append_eod=True` (the default) adds EOD (id 0) after each document; pass False when
    the arrays already end with it (the shard invariant: every document ends with EOD).
    """
    path = Path(path)
    itemsize = itemsize_for(vocab_size)
    dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    offsets = []
    n_tokens = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"\0" * HEADER_BYTES)
        for arr in token_arrays:
            a = np.asarray(arr)
            if a.size and (a.min() < 0 or a.max() >= vocab_size):
                raise ValueError(f"token id out of range [0, {vocab_size}) in document {len(offsets)}")
            a = a.astype(dtype)
            if append_eod:
                a = np.append(a, np.array([EOD_ID], dtype=dtype))
            elif not a.size or a[-1] != EOD_ID:
                raise ValueError(f"document {len(offsets)} does not end with EOD ({EOD_ID}); use append_eod=True")
            offsets.append(n_tokens)
            n_tokens += len(a)
            f.write(a.tobytes())
        f.write(np.asarray(offsets, dtype="<i8").tobytes())
        header = MAGIC + np.array([VERSION, itemsize, n_tokens, len(offsets), vocab_size], dtype="<i8").tobytes()
        f.seek(0)
        f.write(header.ljust(HEADER_BYTES, b"\0"))
    return path


def list_shards(tokens_dir: str | Path, split: str) -> list[Path]:
    """The shards of one split, sorted; an error naming the fix when there are none."""
    folder = Path(tokens_dir) / split
    paths = sorted(folder.glob("shard_*.bin"))
    if not paths:
        raise PolycoderError(f"no token shards in {folder}; make them with "
                             f"`polycoder data tokenize CORPUS --tokenizer DIR --out {tokens_dir}`")
    return paths
