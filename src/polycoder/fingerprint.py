"""What a model is, for keying caches of results: a digest of what determines its outputs.

The evaluations keep caches of work done (sampled completions, per-file log-likelihoods),
and a cache is only right if it is keyed by everything the result depends on. A model's
name is not that: a folder's weights change under the same name (`finetune --merge` into
it), and two runs may give one `--out`. So:

- `model_identity(options)`: a folder (or hub snapshot, or the bundled model) is the SHA-256
  of the bytes of the files a model needs (`locate.HUB_PATTERNS`: config.json, the
  weights, safetensors or `.bin`, sharded or not, and the tokenizer files), plus those of
  a `--tokenizer` given instead of the folder's own; `--random-init` is the architecture
  (the preset's fields, or the folder's config.json), the tokenizer and the seed of the
  random weights.
- `endpoint_identity(url, model, served)`: a server is its URL and the model it serves
  (the `model` field asked for, and what its /v1/models lists); its weights are out of
  sight, so a server that swaps weights under the same name and URL cannot be told apart.
- `digest(...)`: a short key of any JSON value (an identity plus the settings that change
  results), stored with every cached row.
- `short_names(names)`: column headers for reports (a folder's name, a hub id's last part,
  longer where two would be equal).

Hashing a multi-gigabyte model takes seconds, so each file's digest is remembered in a
small JSON memo in the user's cache folder (`$POLYCODER_CACHE`, else
`$XDG_CACHE_HOME/polycoder`, else `~/.cache/polycoder`), keyed by the file's real path,
size, inode, mtime and ctime (in ns). The memo lives there, not beside the results,
because one model is evaluated into many output folders and its digest belongs to the
file, not to a run; and not in the model folder, which may be read-only (a hub cache, a
shared disk). A rewrite (in place or by rename) changes the ctime, which no tool can set
back, so a stale digest is not reused; a memo that cannot be read or written only costs
a rehash.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from polycoder.config import PRESETS, ModelConfig
from polycoder.files import cache_root, write_text
from polycoder.locate import HUB_PATTERNS, adapter_base, is_adapter, resolve
from polycoder.options import ModelOptions

RANDOM_INIT_SEED = 0
"""The seed of `--random-init` weights (`checkpoint.build_model`'s default, which `load` uses)."""

CHUNK = 8 << 20
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "code-vocab.json", "code-merges.txt",
                   "tokenizer_config.json", "special_tokens_map.json")
"""What `Tokenizer.from_pretrained` may read in a folder (and the settings files beside them)."""
LOUD_BYTES = 1 << 30
"""Files at least this big are announced on stderr when hashed (it takes seconds)."""


def memo_path() -> Path:
    return cache_root() / "fingerprints.json"


def digest(value) -> str:
    """A 16-hex-digit key of a JSON value (keys sorted, so equal values give equal keys)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stat(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}"


class _Memo:
    """file -> SHA-256, remembered across runs (see the module docstring): {real path: [stat, digest]}."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = self._read()
        self.hashed: dict[str, list[str]] = {}

    def _read(self) -> dict[str, list[str]]:
        try:
            entries = json.loads(self.path.read_text())
            return entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            return {}

    def sha256(self, path: Path) -> str:
        path = path.resolve()  # a hub snapshot's files are links to its blobs
        stat = _stat(path)
        known = self.entries.get(str(path))
        if isinstance(known, list) and len(known) == 2 and known[0] == stat:
            return known[1]
        size = path.stat().st_size
        if size >= LOUD_BYTES:
            print(f"hashing {path} ({size / 1e9:.1f} GB) once, to key result caches by the weights", file=sys.stderr)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        self.entries[str(path)] = self.hashed[str(path)] = [stat, h.hexdigest()]
        return h.hexdigest()

    def save(self) -> None:
        if not self.hashed:
            return
        # Merged with what another process wrote meanwhile (a lost entry is only a rehash);
        # files that are gone are dropped, so the memo does not grow without end.
        merged = {**self._read(), **self.hashed}
        kept = {p: v for p, v in merged.items() if Path(p).exists()}
        try:
            write_text(self.path, json.dumps(kept, indent=0, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only cache folder: digests are recomputed next time


def _model_files(folder: Path) -> list[Path]:
    """The files of `folder` that make the model (locate.HUB_PATTERNS and the tokenizer's), by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name in TOKENIZER_FILES or any(fnmatch.fnmatch(p.name, pat) for pat in HUB_PATTERNS)))


def _files_digest(files: list[Path], memo: _Memo) -> dict[str, str]:
    return {p.name: memo.sha256(p) for p in files}


def _tokenizer_files(tokenizer: str) -> list[Path]:
    """The files a `--tokenizer` argument reads: a tokenizer.json, or a folder's (or hub id's) tokenizer files."""
    path = Path(tokenizer).expanduser()
    if path.is_file():
        return [path]
    return [p for p in _model_files(path if path.is_dir() else resolve(tokenizer)) if p.name in TOKENIZER_FILES]


def model_identity(options: ModelOptions) -> dict:
    """What the outputs of the model that `options` names depend on (see the module docstring).

    Settings that change results without changing the model (dtype, quantize, ...) are the
    caller's to add to its key. Raises PolycoderError for a model argument that names no
    model, before any work is done.
    """
    memo = _Memo(memo_path())
    try:
        identity: dict = {}
        if _is_preset(options):
            identity["architecture"] = {"preset": str(options.model),
                                        **asdict(ModelConfig.from_preset(str(options.model)))}
            identity["tokenizer"] = "byte-level"  # what checkpoint.load gives a preset
        else:
            folder = resolve(options.model)
            if options.random_init and is_adapter(folder):
                folder = adapter_base(folder)  # random weights in the base's architecture, as checkpoint loads them
            files = _model_files(folder)
            if options.random_init:
                identity["architecture"] = _files_digest([folder / "config.json"], memo)
                identity["tokenizer"] = _files_digest([p for p in files if p.name in TOKENIZER_FILES], memo)
            else:
                identity["files"] = _files_digest(files, memo)
                if is_adapter(folder):  # an adapter's outputs are those of its base with it merged in
                    identity["files"].update(_files_digest([folder / "adapter_config.json"], memo))
                    identity["base"] = model_identity(replace(options, model=str(adapter_base(folder)), tokenizer=None))
        if options.random_init:
            identity["random_init_seed"] = RANDOM_INIT_SEED
        if options.tokenizer:
            identity["tokenizer"] = _files_digest(_tokenizer_files(options.tokenizer), memo)
        return identity
    finally:
        memo.save()


def tokenizer_identity(tokenizer: str | None) -> dict | str:
    """A `--tokenizer` argument's files (digests), or "byte-level" for none (the plain byte-level tokenizer)."""
    if not tokenizer:
        return "byte-level"
    memo = _Memo(memo_path())
    try:
        return _files_digest(_tokenizer_files(tokenizer), memo)
    finally:
        memo.save()


def _is_preset(options: ModelOptions) -> bool:
    return options.random_init and options.model is not None and str(options.model) in PRESETS


def name_of(options: ModelOptions) -> str:
    """What a short name is cut from: the model argument, or the bundled model's folder (polycoder-tiny)."""
    return str(options.model) if options.model is not None else str(resolve(None))


def describe(options: ModelOptions) -> str:
    """A local model in full, for a report: a preset, or the folder the argument resolves to."""
    if _is_preset(options):
        return f"preset {options.model}, random weights"
    folder = resolve(options.model)
    what = str(options.model) if options.model is not None else "the bundled model"
    shown = what if str(folder) == what else f"{what}: {folder}"
    return shown + (", random weights" if options.random_init else "")


def endpoint_identity(url: str, model: str | None, served: list[str]) -> dict:
    """A server: its URL (normalised) and the model it serves: `model` asked for, and the ids its /v1/models lists."""
    base = url.rstrip("/").removesuffix("/completions").removesuffix("/v1")
    return {"endpoint": base, "model": model, "served": sorted(served)}


def short_names(names: list[str]) -> list[str]:
    """Short, distinct column headers: a folder's name or a hub id's last part, each with as
    many parent parts as it takes to tell it from the others (`a/final`, `b/final`), else numbered."""
    parts = [[p for p in str(n).rstrip("/").split("/") if p] or [str(n)] for n in names]

    def suffix(p: list[str], depth: int) -> str:
        return "/".join(p[-depth:])

    short = []
    for i, p in enumerate(parts):
        depth = 1
        while depth < len(p) and any(suffix(p, depth) == suffix(q, depth) for j, q in enumerate(parts) if j != i):
            depth += 1
        short.append(suffix(p, depth))
    # Suffixes of different depths differ in their count of "/", so only equal names are left equal.
    seen: dict[str, int] = {}
    out = []
    for s in short:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if short.count(s) == 1 else f"{s} #{seen[s]}")
    return out
