"""Perplexity per language, the paper's way (Xu et al. 2022, sec. 4.1 and Figure 6).

What it implements, as docs/design.md states the paper's method:
- each held-out file is scored on its own, `<|endoftext|>` prepended;
- windows of the model's full context L, exactly as the paper's lm-eval fork made them
  (`get_rolling_token_windows(tokens, prefix=<|endoftext|>, max_seq_len=L, context_len=1)`
  with `make_disjoint_window`; `rolling_windows` here): the first window is
  [EOD] + t[0:L-1] predicting t[0:L]; each next one predicts up to L new tokens from the L
  tokens that end just before its last predicted one, so the middle windows are disjoint
  (one token of carried context) and the final, partial window is right-aligned with a
  full L-token context, scoring only its remaining tokens. Every token is scored exactly
  once. The report names this windowing;
- the log-likelihood LL (natural log) is pooled over all files of a language and divided by
  the number of Pygments lexer tokens of those files (whitespace tokens included, counted by
  `polycoder.data.languages.pygments_token_count`), so models with different tokenizers
  compare fairly: pygments_perplexity = exp(-LL / pygments_tokens);
- also the loss in nats per model token, loss = -LL / model_tokens (what training reports),
  its perplexity token_perplexity = exp(loss), and bits per byte -LL / (ln 2 * utf-8 bytes).

Inputs: DIR with one sub-folder a language (C, C#, C++, Go, Java, JavaScript, PHP, Python,
Ruby, Rust, Scala, TypeScript), files found recursively below it, so the held-out tree of
`polycoder data fetch` (RAW/heldout/{Language}/{source}/...) is read as it is; or a corpus
folder of Parquet shards (`polycoder.corpus`; a split corpus's `test` split is used).
In a language folder only the files that the language table claims for that language are
scored (`folder in polycoder.data.languages.language_candidates(name)`, so a `.h` file counts
in C/ and in C++/; a README or Makefile in Python/ is not Python, and its Pygments count
would be meaningless: the held-out tree holds whole repositories), regular files of at
most 1 MB, symlinks skipped. A language's files are taken in the order of the SHA-256 of
their path (relative to the language folder; `repo/path` in a corpus), and `max_files`
keeps the first N of that order: the same files every time, whatever the file system's order.
Models: local ones (`--model`, several side by side) and/or an OpenAI-compatible endpoint
scored through echo + logprobs + max_tokens=0 on the same token-id windows.

Outputs: OUT/perplexity.json, OUT/perplexity.md, OUT/perplexity.png (written by
`polycoder.eval.perplexity_report`: bits per byte beside the paper's figure, a log axis,
unreliable languages marked) and OUT/cache/<model>.jsonl, one line a scored file, so an
interrupted run resumes where it stopped. A row is reused only for the same file (its
text's SHA-256) and the same key: the model's identity (`polycoder.fingerprint`: the
digest of its weights, config and tokenizer files, so weights rewritten in the same folder
are scored again; for an endpoint its URL, model and tokenizer) and the settings that
change the numbers (windowing, context length, dtype, quantization). Device and batch size
change only rounding and are not in the key.

Limits: endpoint windows are one token shorter than the context (see EndpointScorer), so
endpoint and local figures of the same model differ very slightly; files that are not valid
UTF-8 are read with replacement characters (U+FFFD) and scored as the UTF-8 bytes of that
decoded text, not skipped; `.h` files count as C (the language table's rule), so a C++
folder's headers are not scored; the endpoint must tokenize like `--tokenizer` (ids are
sent, not text).

The verb's module: torch and our modules that import it are imported inside the
functions that run the model, so that `polycoder eval perplexity --help` reads the options without
importing torch (about 2 s); tests/test_structure.py allows this for the verb modules only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

from tqdm import tqdm

from polycoder.corpus import iter_documents
from polycoder.data.languages import MAX_FILE_BYTES, POLYCODER_LANGUAGES, language_candidates, pygments_token_count
from polycoder.errors import PolycoderError
from polycoder.eval.endpoint import Endpoint
from polycoder.eval.perplexity_report import unreliable, write_report
from polycoder.files import end_cut_line
from polycoder.fingerprint import describe, digest, endpoint_identity, model_identity, name_of, short_names, tokenizer_identity
from polycoder.options import Fields, ModelOptions
from polycoder.tokenizer import Tokenizer, load_tokenizer

LANGUAGES = tuple(POLYCODER_LANGUAGES)
"""The language folders read (the paper's 12 languages)."""


@dataclass
class Document:
    """One held-out file."""

    language: str
    """Language name of the language table."""
    name: str
    """Where it came from (relative path, or repo/path of a corpus row)."""
    text: str
    """The file's text."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _hash_order(relative_path: str) -> str:
    return hashlib.sha256(relative_path.encode("utf-8", errors="surrogateescape")).hexdigest()


def language_files(folder: Path, language: str) -> list[Path]:
    """The files of one language folder that are scored, in hash order.

    Regular files (not symlinks) of at most 1 MB that the language table claims for
    `language` (among others, for an ambiguous name such as `.h`), sorted by the SHA-256 of
    their path relative to `folder`.
    """
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
             and p.stat().st_size <= MAX_FILE_BYTES and language in language_candidates(p.name)]
    return sorted(files, key=lambda p: _hash_order(p.relative_to(folder).as_posix()))


def _folder_documents(data: Path, wanted: set[str] | None, max_files: int) -> list[Document]:
    folders = [d for d in sorted(data.iterdir()) if d.is_dir() and d.name in LANGUAGES]
    if not folders:
        raise PolycoderError(f"{data} has no language sub-folders ({', '.join(LANGUAGES)}) "
                             "and no *.parquet corpus shards")
    docs = []
    for folder in folders:
        if wanted and folder.name not in wanted:
            continue
        for path in language_files(folder, folder.name)[: max_files or None]:
            text = path.read_bytes().decode("utf-8", errors="replace")
            docs.append(Document(folder.name, path.relative_to(data).as_posix(), text))
    return docs


def _corpus_documents(data: Path, split: str | None, wanted: set[str] | None, max_files: int) -> list[Document]:
    by_language: dict[str, list[Document]] = {}
    for row in iter_documents(data, split=split, columns=["repo", "path", "language", "text"], languages=wanted):
        doc = Document(row["language"], f"{row['repo']}/{row['path']}", row["text"])
        by_language.setdefault(doc.language, []).append(doc)
    docs = []
    for language in sorted(by_language):
        docs += sorted(by_language[language], key=lambda d: _hash_order(d.name))[: max_files or None]
    return docs


def read_documents(data: Path, languages: list[str] | None = None, max_files: int = 0) -> list[Document]:
    """Held-out files of DIR: one sub-folder a language, or a corpus (Parquet) folder.

    A language's files come in hash order, at most `max_files` of them (0 = all); see the
    module docstring for which files of a language folder are read.
    """
    data = Path(data)
    if not data.is_dir():
        raise PolycoderError(f"data folder not found: {data}; give a folder with one sub-folder a "
                             f"language ({', '.join(LANGUAGES)}) or a corpus folder")
    if max_files < 0:
        raise PolycoderError(f"--max-files must be 0 (all files) or a positive number, got {max_files}")
    wanted = set(languages) if languages else None
    if list(data.glob("*.parquet")):
        docs = _corpus_documents(data, None, wanted, max_files)
    elif list((data / "test").glob("*.parquet")):
        docs = _corpus_documents(data, "test", wanted, max_files)
    else:
        docs = _folder_documents(data, wanted, max_files)
    if not docs:
        raise PolycoderError(f"no files to score in {data} (a language folder's files count only if the "
                             "language table claims them for that language and they are at most 1 MB)")
    return docs


WINDOWING = "lm-eval rolling windows, context_len=1 (the final window right-aligned with a full context)"
"""How files are cut into windows; rows of the cache carry it, and the report names it."""


def rolling_windows(tokens: list[int], prefix: int, L: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows over `tokens` with `prefix` before the first, as lm-eval's
    get_rolling_token_windows(context_len=1): `targets` are what the last len(targets)
    positions of `inputs` predict. Every token is a target exactly once."""
    if not tokens:
        return []
    first = min(L, len(tokens))
    out = [([prefix] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):  # the first window was full (done = L), so a full context precedes
        end = min(len(tokens), done + L)
        out.append((tokens[end - L - 1 : end - 1], tokens[done:end]))
        done = end
    return out


class LocalScorer:
    """Log-likelihoods from a model loaded with polycoder.checkpoint.load."""

    def __init__(self, options: ModelOptions, batch_size: int):
        from polycoder.checkpoint import load

        self.name = options.model
        self.model, self.tokenizer = load(options)
        self.block_size = self.model.config.block_size
        self.device = next(self.model.parameters()).device  # where --device (auto: a GPU if any) put it
        self.batch_size = batch_size

    def loglik(self, tokens: list[int], prefix: int) -> float:
        import torch

        total = 0.0
        # Windows with equal input and target lengths go through the model together.
        groups: dict[tuple[int, int], list] = {}
        for inp, tgt in rolling_windows(tokens, prefix, self.block_size):
            groups.setdefault((len(inp), len(tgt)), []).append((inp, tgt))
        with torch.inference_mode():
            for (_, n), group in groups.items():
                for i in range(0, len(group), self.batch_size):
                    chunk = group[i: i + self.batch_size]
                    x = torch.tensor([c[0] for c in chunk], device=self.device)  # [B, T]
                    y = torch.tensor([c[1] for c in chunk], device=self.device)  # [B, n]
                    logp = torch.log_softmax(self.model(x)[:, -n:].float(), dim=-1)  # [B, n, V]
                    total += logp.gather(-1, y[..., None]).sum().item()
        return total


class EndpointScorer:
    """Log-likelihoods from an OpenAI-compatible server (echo + logprobs + max_tokens=0)."""

    def __init__(self, url: str, endpoint_model: str | None, tokenizer: str | None, block_size: int):
        self.name = url
        self.client = Endpoint(url, model=endpoint_model)
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else Tokenizer.byte_level()
        # A server echoes log-probabilities only of a prompt that fits its context, and a
        # window of L inputs is a prompt of L + 1 tokens: windows are one token shorter here.
        self.block_size = block_size - 1

    def loglik(self, tokens: list[int], prefix: int) -> float:
        total = 0.0
        for inp, tgt in rolling_windows(tokens, prefix, self.block_size):
            total += sum(self.client.score(inp + tgt[-1:])[-len(tgt):])  # what the last positions predict
        return total


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:120] or "model"


def score_documents(scorer, docs: list[Document], cache_path: Path, key: str) -> dict[str, dict]:
    """Per-language pooled figures of one model; per-file results cached in cache_path.

    Every cached row carries `key` (the model's identity and the settings that change its
    numbers): rows of another key (other weights, another dtype, an older windowing) stay in
    the file but are not used, and the reuse is said on stderr.
    """
    cache: dict[str, dict] = {}
    others = 0
    if cache_path.is_file():
        for line in cache_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run (its file is scored again)
            if row.get("key") == key:
                cache[row["sha256"] + "|" + row["language"]] = row
            else:
                others += 1
    wanted = {doc.sha256 + "|" + doc.language for doc in docs}
    reused = len(wanted & set(cache))
    if reused:
        print(f"reusing {reused} of {len(wanted)} scored files from {cache_path} (same model, same settings)",
              file=sys.stderr)
    if others:
        print(f"{cache_path}: {others} scored files of other weights or settings are not used", file=sys.stderr)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    eod = scorer.tokenizer.eod_id
    end_cut_line(cache_path)
    with open(cache_path, "a", encoding="utf-8") as f:
        for doc in tqdm(docs, desc=f"scoring {scorer.name}", unit="file", file=sys.stderr):
            row_key = doc.sha256 + "|" + doc.language
            if row_key in cache:
                continue
            tokens = scorer.tokenizer.encode(doc.text)
            row = {"sha256": doc.sha256, "language": doc.language, "name": doc.name, "key": key,
                   "loglik": scorer.loglik(tokens, eod) if tokens else 0.0,
                   "model_tokens": len(tokens),
                   "pygments_tokens": pygments_token_count(doc.text, doc.language),
                   "bytes": len(doc.text.encode("utf-8", errors="surrogatepass"))}
            cache[row_key] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
    per_language: dict[str, dict] = {}
    for doc in docs:
        row = cache[doc.sha256 + "|" + doc.language]
        agg = per_language.setdefault(doc.language, {"files": 0, "model_tokens": 0, "pygments_tokens": 0,
                                                     "bytes": 0, "loglik": 0.0})
        agg["files"] += 1
        for field in ("model_tokens", "pygments_tokens", "bytes", "loglik"):
            agg[field] += row[field]
    for agg in per_language.values():
        agg["windowing"] = WINDOWING
        ll = agg["loglik"]
        agg["loss"] = -ll / agg["model_tokens"] if agg["model_tokens"] else None
        agg["pygments_perplexity"] = math.exp(-ll / agg["pygments_tokens"]) if agg["pygments_tokens"] else None
        agg["token_perplexity"] = math.exp(agg["loss"]) if agg["loss"] is not None else None
        agg["bits_per_byte"] = -ll / (math.log(2) * agg["bytes"]) if agg["bytes"] else None
        agg["unreliable"] = unreliable(agg)
    return dict(sorted(per_language.items()))


def perplexity(
    data: Path,
    out: Path,
    model: list[str] | None = None,
    endpoint: str | None = None,
    endpoint_model: str | None = None,
    tokenizer: str | None = None,
    block_size: int = 2048,
    language: list[str] | None = None,
    max_files: int = 0,
    batch_size: int = 4,
    model_options: Annotated[ModelOptions | None, Fields("dtype", "device", "random_init", "quantize")] = None,
) -> dict:
    """Perplexity per language: per Pygments token (the paper's), loss and perplexity per model token, bits per byte.

    Args:
        data: folder with one sub-folder a language (C, C#, ..., TypeScript; deeper folders
            such as RAW/heldout/{Language}/{source}/ are read recursively) or a corpus folder.
            In a language folder only files the language table claims for that language are
            scored (no README, Makefile), at most 1 MB; files not valid UTF-8 are read with
            replacement characters.
        out: output folder (perplexity.json, perplexity.md, perplexity.png, cache/).
        model: local models (folders, presets or hub ids), several side by side; none and no
            endpoint means the bundled default model.
        endpoint: an OpenAI-compatible server scored with echo + logprobs + max_tokens=0.
        endpoint_model: the `model` field sent to the endpoint, if it needs one.
        tokenizer: the endpoint model's tokenizer (folder or model); default the plain byte-level one.
        block_size: the endpoint model's context length (its windows are one token shorter).
        language: only these languages.
        max_files: at most this many files a language (0 = all), the first in the order of the
            SHA-256 of their path, so the same files every time.
        batch_size: windows a forward pass.
        model_options: how to load the local models (--dtype, --device, --random-init, --quantize).
    """
    out = Path(out)
    docs = read_documents(Path(data), list(language) if language else None, max_files)
    names = list(dict.fromkeys(model or []))  # a model named twice is scored once
    if not names and endpoint is None:
        names = [None]  # type: ignore[list-item]
    # Every model is identified (resolved, its files hashed) before any is scored, so a
    # wrong argument fails at once, not after the others were scored.
    local = []
    for name in names:
        options = replace(model_options or ModelOptions(), model=name)
        local.append((str(name) if name is not None else "default", options, model_identity(options)))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    described: dict[str, str] = {}
    for label, options, identity in local:
        scorer = LocalScorer(options, batch_size)
        scorer.name = label
        key = digest({"model": identity, "windowing": WINDOWING, "context": scorer.block_size,
                      "dtype": options.dtype, "quantize": options.quantize})
        results[label] = score_documents(scorer, docs, out / "cache" / f"{_slug(label)}.jsonl", key)
        described[label] = f"{describe(options)} (key {key})"
        del scorer
    if endpoint is not None:
        scorer = EndpointScorer(endpoint, endpoint_model, tokenizer, block_size)
        try:
            identity = endpoint_identity(endpoint, endpoint_model, scorer.client.served_models())
            key = digest({"model": identity, "tokenizer": tokenizer_identity(tokenizer), "windowing": WINDOWING,
                          "context": scorer.block_size})
            results[endpoint] = score_documents(scorer, docs, out / "cache" / f"{_slug(endpoint)}.jsonl", key)
        finally:
            scorer.client.close()
        described[endpoint] = f"{endpoint}{f' model {endpoint_model}' if endpoint_model else ''} (key {key})"
    full = [name_of(options) for _, options, _ in local] + ([endpoint] if endpoint is not None else [])
    labels = dict(zip(results, short_names(full)))
    write_report(results, out, labels, described, WINDOWING)
    print((out / "perplexity.md").read_text().split("## Details")[0])
    return results

