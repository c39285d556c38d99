r"""`polycoder tokenizer train`: a byte-level BPE for code, trained with `tokenizers` on a seeded sample.

As PolyCoder's tokenizer (GPT-2's byte-level BPE, Radford et al. 2019, retrained on code;
the original trained on a 5 % sample of its data), with three differences:
- Whitespace runs get tokens of their own. GPT-2's pre-tokenizer regex ends with
  `\s+(?!\S)|\s+`, which leaves the last space of a run to the next word (4 spaces of
  indentation before `return` become "   " + " return"), and PolyCoder's loaders lost the
  `Ġ Ġ` merge altogether (one token per space; see polycoder.tokenizer). A different
  pre-tokenizer regex would fix the first, but transformers 5's `GPT2Tokenizer(Fast)`
  always re-installs GPT-2's regex when it opens a folder, so its ids would silently differ
  from ours. Instead we keep GPT-2's pre-tokenizer and add `WHITESPACE_TOKENS` (2-32
  spaces, 2-8 tabs, a newline followed by 1-32 spaces or 1-8 tabs) as added tokens, which
  every loader of tokenizer.json matches before pre-tokenizing (leftmost-longest), and BPE
  is trained on the text between those runs (the same split). So "\n        return" is
  two tokens, "\n        " and "return", whichever loader reads the folder.
- The special tokens `<|endoftext|>`, `<|padding|>`, `<|separator|>` are ids 0, 1, 2, then
  all 256 byte tokens, so every byte string round-trips (`Tokenizer.lossless`).
- The four fill-in-the-middle sentinels (`polycoder.fim`: `<fim_prefix>`, `<fim_middle>`,
  `<fim_suffix>`, `<fim_pad>`, StarCoder's names) are special tokens of every tokenizer made
  here, added after training (`Tokenizer.with_fim_tokens`), so they take the last four ids:
  with a vocabulary that reaches `--vocab-size` N, ids N-4 .. N-1 in that order (after the
  BPE tokens and the whitespace-run tokens; a corpus too small to fill the vocabulary moves
  them down with the last id). `polycoder train` then trains with FIM by default
  (`polycoder.train.fim_transform`); the report names their ids (`fim_tokens`).
- The model's embedding size is the vocabulary padded to a multiple of 64 (as GPT-NeoX's
  `make-vocab-size-divisible-by`: 50257 -> 50304); it is recorded as `padded_vocab_size`
  (the FIM sentinels included).

Outputs in OUT: tokenizer.json, vocab.json, merges.txt (with a `#version` header),
tokenizer_config.json, special_tokens_map.json (polycoder.tokenizer.Tokenizer.save; opens
with `Tokenizer.from_pretrained`, transformers' `GPT2TokenizerFast` and `AutoTokenizer`),
and training.json / training.md: the sample, sizes, the whitespace check and bytes per
token on held-out files per language, side by side with a reference tokenizer
(PolyCoder's with `--compare-with`).

Limits: the whitespace tokens live in tokenizer.json (its `added_tokens`),
not in vocab.json / merges.txt: a reader of those two files alone
(`Tokenizer.from_files`, old slow GPT2Tokenizer) gets GPT-2's splitting without them.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from polycoder.corpus import iter_documents, stable_hash
from polycoder.errors import PolycoderError
from polycoder.fim import FIM_TOKENS
from polycoder.options import POSITIONAL
from polycoder.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer

# indentation and alignment runs that become one token each (added tokens, see above)
WHITESPACE_TOKENS = ([" " * k for k in range(2, 33)] + ["\t" * k for k in range(2, 9)]
                     + ["\n" + " " * k for k in range(1, 33)] + ["\n" + "\t" * k for k in range(1, 9)])
# the same runs as a regex, leftmost-longest like the added-token matcher (for the training split)
_WHITESPACE_RUN = re.compile(r"\n(?: {1,32}|\t{1,8})| {2,32}|\t{2,8}")

WHITESPACE_CHECKS = {
    "4 spaces": "    ", "8 spaces": " " * 8, "12 spaces": " " * 12, "16 spaces": " " * 16,
    "tab": "\t", "2 tabs": "\t\t", "3 tabs": "\t\t\t",
    "newline": "\n", "2 newlines": "\n\n",
    "newline + 4 spaces": "\n    ", "newline + 8 spaces": "\n" + " " * 8, "newline + 12 spaces": "\n" + " " * 12,
    "newline + tab": "\n\t", "newline + 2 tabs": "\n\t\t",
}


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    return int(math.ceil(n / multiple) * multiple)


def sample_documents(corpus: Path, fraction: float, seed: int) -> Iterator[str]:
    """Texts of the files whose seeded hash of their SHA-256 falls under `fraction` (order-free, reproducible)."""
    limit = fraction * 2.0**64
    for doc in iter_documents(corpus, columns=["sha256", "text"]):
        if fraction >= 1.0 or stable_hash(str(seed), doc["sha256"]) < limit:
            yield doc["text"]


def build_trainer_backend():
    """GPT-2's byte-level set-up, exactly as transformers' GPT2Tokenizer rebuilds it."""
    backend = HFTokenizer(models.BPE(fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def split_whitespace_runs(text: str) -> list[str]:
    """The pieces of `text` between whitespace-token runs (what BPE sees once they are matched)."""
    return [p for p in _WHITESPACE_RUN.split(text) if p]


def whitespace_report(tok) -> dict[str, int]:
    """Tokens each common whitespace run encodes to (alone, and between two words)."""
    out = {}
    for name, ws in WHITESPACE_CHECKS.items():
        alone = len(tok.encode(ws))
        in_code = len(tok.encode("x" + ws + "y")) - len(tok.encode("x")) - len(tok.encode("y"))
        out[name] = max(alone, in_code)
    return out


def bytes_per_token(tok, heldout: Path) -> dict[str, dict[str, float]]:
    """Per language: files, bytes, tokens and bytes/token of the held-out corpus."""
    by_lang: dict[str, list[str]] = {}
    for d in iter_documents(heldout, columns=["language", "text"]):
        by_lang.setdefault(d["language"], []).append(d["text"])
    out = {}
    for lang, texts in sorted(by_lang.items()):
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        ntok = sum(len(ids) for ids in tok.encode_batch(texts))
        out[lang] = {"files": len(texts), "bytes": nbytes, "tokens": ntok, "bytes_per_token": nbytes / max(ntok, 1)}
    return out


def _pick_corpus(corpus: Path, split_name: str) -> Path:
    return corpus / split_name if (corpus / split_name).is_dir() else corpus


def train_tokenizer(
    corpus: Annotated[Path, POSITIONAL],
    out: Path,
    vocab_size: int = 50257,
    sample: float = 0.05,
    seed: int = 0,
    min_frequency: int = 2,
    pad_multiple: int = 64,
    heldout: Path | None = None,
    compare_with: Path | None = None,
) -> dict:
    """Train a byte-level BPE code tokenizer on a seeded sample of a corpus.

    Args:
        corpus: a corpus folder, or a split corpus (its train/ is used).
        out: folder for the tokenizer and its training report.
        vocab_size: tokens in the vocabulary, the 3 special, 256 byte, 78 whitespace-run and 4 FIM tokens included
            (PolyCoder: 50257).
        sample: fraction of the files to train on, chosen by a seeded hash of their SHA-256 (PolyCoder: 0.05).
        seed: seed of the sample.
        min_frequency: a pair must occur this often to be merged.
        pad_multiple: the model's embedding size is the vocabulary rounded up to this (recorded, not added).
        heldout: corpus of held-out files for the bytes-per-token report (default: heldout/ or test/ of a split corpus).
        compare_with: a second tokenizer for the report (a folder; PolyCoder's code-vocab.json + code-merges.txt work).
    """
    t0 = time.time()
    corpus, out = Path(corpus), Path(out)
    if not 0.0 < sample <= 1.0:
        raise PolycoderError(f"--sample must be in (0, 1], got {sample}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise PolycoderError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (3 special + 256 byte tokens)")
    if pad_multiple < 1:
        raise PolycoderError("--pad-multiple must be at least 1")
    train_dir = _pick_corpus(corpus, "train")
    stats = {"files": 0, "bytes": 0}

    def texts() -> Iterator[list[str]]:
        for t in sample_documents(train_dir, sample, seed):
            stats["files"] += 1
            stats["bytes"] += len(t.encode("utf-8"))
            yield split_whitespace_runs(t)

    backend = build_trainer_backend()
    n_bpe = vocab_size - len(WHITESPACE_TOKENS) - len(FIM_TOKENS)
    if n_bpe < 256 + len(SPECIAL_TOKENS):
        raise PolycoderError(f"--vocab-size must be at least "
                             f"{256 + len(SPECIAL_TOKENS) + len(WHITESPACE_TOKENS) + len(FIM_TOKENS)} "
                             "(3 special, 256 byte, the whitespace-run and the 4 FIM tokens)")
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    backend.train_from_iterator(texts(), trainer=trainer)
    if stats["files"] == 0:
        raise PolycoderError(f"the {sample:.0%} sample of {train_dir} is empty; raise --sample")
    backend.add_tokens([AddedToken(w, special=False, normalized=False) for w in WHITESPACE_TOKENS
                        if backend.token_to_id(w) is None])
    tok = Tokenizer(backend).with_fim_tokens()
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2], "special tokens must be ids 0, 1, 2"
    if not tok.lossless:
        raise RuntimeError("trained vocabulary lacks byte tokens (the initial alphabet should prevent this)")
    tok.save(out)
    reloaded = Tokenizer.from_pretrained(out)
    report: dict = {
        "corpus": str(train_dir), "sample": sample, "seed": seed, "min_frequency": min_frequency,
        "sampled_files": stats["files"], "sampled_bytes": stats["bytes"],
        "vocab_size": reloaded.vocab_size, "requested_vocab_size": vocab_size,
        "padded_vocab_size": padded_vocab_size(reloaded.vocab_size, pad_multiple), "pad_multiple": pad_multiple,
        "special_tokens": {t: vocab[t] for t in SPECIAL_TOKENS}, "lossless": reloaded.lossless,
        "fim_tokens": {t: vocab[t] for t in FIM_TOKENS},
        "whitespace_added_tokens": len(WHITESPACE_TOKENS),
        "whitespace_tokens": whitespace_report(reloaded),
    }
    ref = Tokenizer.from_pretrained(compare_with) if compare_with is not None else None
    if ref is not None:
        report["reference"] = str(compare_with)
        report["reference_whitespace_tokens"] = whitespace_report(ref)
    if heldout is None:
        for name in ("heldout", "test"):
            if (corpus / name).is_dir() and any((corpus / name).glob("*.parquet")):
                heldout = corpus / name
                break
    if heldout is not None:
        report["heldout"] = str(heldout)
        report["bytes_per_token"] = bytes_per_token(reloaded, Path(heldout))
        if ref is not None:
            report["reference_bytes_per_token"] = bytes_per_token(ref, Path(heldout))
    report["seconds"] = round(time.time() - t0, 1)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    md = training_markdown(report)
    (out / "training.md").write_text(md)
    print(md)
    return report


def training_markdown(r: dict) -> str:
    lines = [f"# Tokenizer trained on {r['sampled_files']:,} files ({r['sampled_bytes'] / 1e6:,.1f} MB, "
             f"{r['sample']:.1%} sample of {r['corpus']}, seed {r['seed']})", "",
             f"vocabulary {r['vocab_size']:,} (padded for the model: {r['padded_vocab_size']:,}); "
             f"specials {r['special_tokens']}; fill-in-the-middle {r.get('fim_tokens')}; lossless: {r['lossless']}", ""]
    has_ref = "reference_whitespace_tokens" in r
    lines += ["| whitespace run | tokens (ours) |" + (" tokens (reference) |" if has_ref else ""),
              "|---|---:|" + ("---:|" if has_ref else "")]
    for name, n in r["whitespace_tokens"].items():
        lines.append(f"| {name} | {n} |" + (f" {r['reference_whitespace_tokens'][name]} |" if has_ref else ""))
    if "bytes_per_token" in r:
        ref = r.get("reference_bytes_per_token")
        lines += ["", f"Bytes per token on held-out files ({r['heldout']}):", "",
                  "| language | files | MB | bytes/token (ours) |"
                  + (" bytes/token (reference) | ours / reference |" if ref else ""),
                  "|---|---:|---:|---:|" + ("---:|---:|" if ref else "")]
        tot = [0, 0, 0]
        for lang, e in r["bytes_per_token"].items():
            row = f"| {lang} | {e['files']:,} | {e['bytes'] / 1e6:.2f} | {e['bytes_per_token']:.3f} |"
            tot[0] += e["bytes"]
            tot[1] += e["tokens"]
            if ref:
                rr = ref[lang]
                tot[2] += rr["tokens"]
                row += f" {rr['bytes_per_token']:.3f} | {e['bytes_per_token'] / rr['bytes_per_token']:.2f} |"
            lines.append(row)
        row = f"| **all** | | {tot[0] / 1e6:.2f} | {tot[0] / max(tot[1], 1):.3f} |"
        if ref:
            row += f" {tot[0] / max(tot[2], 1):.3f} | {tot[2] / max(tot[1], 1):.2f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"
