"""Corpus shards: Parquet files of source files, the published-format index, and readers.

A corpus folder holds `*.parquet` shards (read in name order), `index.tsv`, `stats.json`
and `stats.md`. Each row is one source file with the columns of `SCHEMA`:

    repo      "org/project" (a folder's parent and name, an archive's folder and stem,
              or a git URL's owner and name)
    path      the file's path inside its repository, '/'-separated
              (repo and path as `escape_name` writes them: any name, whatever its bytes)
    language  a name of the language table (polycoder.data.languages)
    size      bytes of the file as stored
    sha256    hex SHA-256 of those bytes (PolyCoder's exact-dedup key)
    text      the file decoded as UTF-8 (strictly, unless the collector was told otherwise)
    source    the source argument the file came from (folder, archive or URL)
    licence   SPDX-like guess from the repository's LICENSE/COPYING file, or null

`index.tsv` uses the format of the index PolyCoder published for contamination checks:
one line `{language}__{org}__{project}__{path}<TAB>{sha256}` per file.

File names are bytes on Linux and need not be UTF-8, and may hold newlines or tabs.
`escape_name` turns any name into UTF-8 text that keeps every byte and holds no control
character: a backslash becomes two, a control character or a byte that is not UTF-8
becomes a backslash, x and two hex digits; `unescape_name` reverses it. Names without any
of these (nearly all) are stored as they are.

A split corpus (`polycoder data split`) is a folder with `train/`, `valid/`, `test/` (and
`heldout/`) corpus folders; `iter_documents` reads either kind (`split=` picks one).

`stable_hash` is the seeded hash behind every deterministic choice over a corpus (which
repository goes to which split, which files a tokenizer trains on).

The format is shared by the data pipeline (`polycoder.data`, which writes it), tokenizer
training (`polycoder.tokenizer.train`) and the evaluation (`polycoder.eval`), which read it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from polycoder.errors import PolycoderError
from polycoder.files import atomic_path

COLUMNS = ("repo", "path", "language", "size", "sha256", "text", "source", "licence")
SPLITS = ("train", "valid", "test")


def schema():
    # Deferred: the data extra's Parquet library, needed only where shards are read or written
    import pyarrow as pa

    return pa.schema([
        ("repo", pa.string()), ("path", pa.string()), ("language", pa.string()), ("size", pa.int64()),
        ("sha256", pa.string()), ("text", pa.large_string()), ("source", pa.string()), ("licence", pa.string()),
    ])


def write_table(rows: list[dict] | pa.Table, path: Path) -> None:  # noqa: F821
    """Write rows (dicts with COLUMNS) to one Parquet shard, atomically (temp file, then rename)."""
    # Deferred: the data extra's Parquet library, needed only where shards are read or written
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(
        [{c: r.get(c) for c in COLUMNS} for r in rows], schema=schema())
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=2048)


def shard_paths(corpus_dir: str | Path, split: str | None = None) -> list[Path]:
    """The Parquet shards of a corpus folder (or of one split of a split corpus), in name order."""
    corpus_dir = Path(corpus_dir)
    if split is not None:
        corpus_dir = corpus_dir / split
    if not corpus_dir.is_dir():
        raise PolycoderError(f"corpus folder not found: {corpus_dir}; make one with `polycoder data collect SOURCE --out DIR`"
                             + (" and `polycoder data split`" if split else ""))
    paths = sorted(p for p in corpus_dir.glob("*.parquet"))
    if not paths:
        hint = ""
        if all((corpus_dir / s).is_dir() for s in SPLITS):
            hint = f" (it is a split corpus: pass split='train' or the folder {corpus_dir / 'train'})"
        raise PolycoderError(f"no *.parquet shards in {corpus_dir}{hint}; make a corpus with `polycoder data collect`")
    return paths


def iter_documents(corpus_dir: str | Path, split: str | None = None,
                   columns: Iterable[str] | None = None, languages: Iterable[str] | None = None) -> Iterator[dict]:
    """Yield one dict per file (keys: `columns`, default all) in shard order, then row order.

    `languages` keeps only those languages (e.g. the held-out files of Python).
    """
    # Deferred: the data extra's Parquet library, needed only where shards are read or written
    import pyarrow.parquet as pq

    cols = list(columns) if columns is not None else None
    keep = set(languages) if languages is not None else None
    read_cols = cols if cols is None or keep is None or "language" in cols else cols + ["language"]
    for path in shard_paths(corpus_dir, split):
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=512, columns=read_cols):
            for row in batch.to_pylist():
                if keep is not None and row["language"] not in keep:
                    continue
                if cols is not None and read_cols is not cols:
                    row = {c: row[c] for c in cols}
                yield row


def count_documents(corpus_dir: str | Path, split: str | None = None) -> int:
    # Deferred: the data extra's Parquet library, needed only where shards are read or written
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(corpus_dir, split))


_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f\ud800-\udfff]")
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})")


def escape_name(name: str) -> str:
    """A file or folder name (as os.walk gives it: bytes that are not UTF-8 as surrogates)
    as UTF-8 text without control characters, losslessly; see the module."""
    def sub(m: re.Match) -> str:
        c = ord(m.group())
        if c == 0x5C:
            return "\\\\"
        if 0xDC80 <= c <= 0xDCFF:  # os.fsdecode's surrogateescape: the byte c - 0xDC00
            return f"\\x{c - 0xDC00:02x}"
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    return _UNSAFE.sub(sub, name)


def unescape_name(text: str) -> str:
    """The name `escape_name` wrote `text` for (os.fsencode gives back its exact bytes)."""
    def sub(m: re.Match) -> str:
        e = m.group(1)
        if e == "\\":
            return "\\"
        c = int(e[1:], 16)
        return chr(0xDC00 + c) if e[0] == "x" and c >= 0x80 else chr(c)
    return _ESCAPE.sub(sub, text)


def index_key(language: str, repo: str, path: str) -> str:
    """`{language}__{org}__{project}__{path}` (the published index's first column)."""
    org, _, project = repo.partition("/")
    if not project:
        org, project = "local", org
    return f"{language}__{org}__{project}__{path}"


def write_index(rows: Iterable[dict], path: Path) -> int:
    """Write index.tsv lines for rows with language, repo, path, sha256; returns the count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            key = index_key(r["language"], r["repo"], r["path"])  # names are escaped: no tab or newline
            f.write(f"{key}\t{r['sha256']}\n")
            n += 1
    return n


def read_index(path: str | Path) -> dict[str, str]:
    """sha256 -> first key of an index.tsv (ours or PolyCoder's published one)."""
    path = Path(path)
    if not path.is_file():
        raise PolycoderError(f"index not found: {path}; `polycoder data collect` writes DIR/index.tsv")
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            key, sep, sha = line.rpartition("\t")
            if not sep or len(sha) != 64:
                raise PolycoderError(f"{path}:{i}: expected `NAME<TAB>sha256`, got {line[:80]!r}")
            out.setdefault(sha.lower(), key)
    return out


def stable_hash(*parts: str | bytes) -> int:
    """A 64-bit hash that is the same in every process and run (Python's hash() is salted)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape") if isinstance(p, str) else p)
        h.update(b"\0")
    return int.from_bytes(h.digest(), "little")
