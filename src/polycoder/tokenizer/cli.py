"""`polycoder tokenize`: the token ids of a file or text as JSON, or with --decode the text of ids."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

from polycoder.errors import PolycoderError
from polycoder.options import Alias
from polycoder.tokenizer import Tokenizer, load_tokenizer


def cli_tokenize(
    model: str | None = None,
    text: str | None = None,
    text_file: Annotated[Path | None, Alias("--file")] = None,
    decode: bool = False,
    vocab_file: Path | None = None,
    merges_file: Path | None = None,
) -> None:
    """Print the token ids of a file or text as a JSON list (or, with --decode, the reverse).

    Args:
        model: checkpoint folder, preset name or hub id whose tokenizer to use (default: the bundled model).
        text: the input text itself.
        text_file: read the input from this file (bytes exactly as stored); `-` reads stdin (--file is its old name;
            generate's is --prompt-file).
        decode: the input is a JSON list of ids; print the text they decode to.
        vocab_file: a GPT-2 style vocab.json (with --merges-file) instead of a model's tokenizer.
        merges_file: a merges.txt; without a `#version` header its first line is dropped (PolyCoder's reading).
    """
    if vocab_file or merges_file:
        if not (vocab_file and merges_file):
            raise PolycoderError("--vocab-file and --merges-file go together; give both")
        tok = Tokenizer.from_files(vocab_file, merges_file)
    else:
        tok = load_tokenizer(model)
    if (text_file is None) == (text is None):
        if text_file is None and not sys.stdin.isatty():
            text_file = Path("-")
        else:
            raise PolycoderError("give exactly one of --text-file F or --text TEXT (or pipe the input on stdin)")
    if text_file is not None:
        data = sys.stdin.buffer.read() if str(text_file) == "-" else _read_bytes(text_file)
    else:
        data = text.encode("utf-8")
    if decode:
        try:
            ids = json.loads(data)
            if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
                raise ValueError
        except ValueError:  # json.JSONDecodeError is one
            raise PolycoderError("--decode expects a JSON list of integers, e.g. [563, 12, 4]") from None
        sys.stdout.buffer.write(tok.decode_bytes(ids))
        sys.stdout.flush()
    else:
        print(json.dumps(tok.encode(data)))


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PolycoderError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise PolycoderError(f"{path} is a folder; give a file") from None
