"""`polycoder data tokenize`: a corpus to token shards (`polycoder.token_shards`), EOD after every file.

`tokenize_corpus` runs one datatrove task per input Parquet shard (so the shard
boundaries and contents depend only on the input, never on `--workers`), each writing
part files that the last step renames, in input order, to shard_NNNNN.bin. A killed run
resumes with the tasks it had not finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import numpy as np

from polycoder.corpus import SPLITS, shard_paths
from polycoder.data import engine
from polycoder.errors import PolycoderError
from polycoder.files import write_text
from polycoder.options import POSITIONAL
from polycoder.token_shards import HEADER_BYTES, MAGIC, VERSION, itemsize_for, write_shard
from polycoder.tokenizer import Tokenizer


@lru_cache(maxsize=4)
def _cached_tokenizer(path: str) -> Tokenizer:
    """One load per process: the parent loads it before the executor forks, so workers inherit it."""
    return Tokenizer.from_pretrained(path)


class TokenizeStep(engine.TaskStep):
    """One tokenize task: one input Parquet shard -> part shards of at most `shard_tokens` tokens."""

    name = "polycoder tokenize"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        # Deferred: the data extra's Parquet library, needed only where shards are read or written
        import pyarrow.parquet as pq

        work = Path(self.work_dir)
        plan = self.plan()
        split, src = plan["inputs"][rank]
        tok = _cached_tokenizer(plan["tokenizer"])
        for old in work.glob(f"part-{rank:05d}-*.bin"):
            old.unlink()
        docs: list[np.ndarray] = []
        n_in_part, k = 0, 0
        counts: dict[str, list[int]] = {}
        dtype = np.uint16 if itemsize_for(tok.vocab_size) == 2 else np.uint32

        def flush() -> None:
            nonlocal docs, n_in_part, k
            if docs:
                write_shard(work / f"part-{rank:05d}-{k:05d}.bin", docs, tok.vocab_size, append_eod=True)
                k += 1
            docs, n_in_part = [], 0

        for batch in pq.ParquetFile(src).iter_batches(batch_size=256, columns=["text", "language"]):
            texts = batch.column("text").to_pylist()
            langs = batch.column("language").to_pylist()
            # several worker processes: one thread each (rayon threads on top would oversubscribe the CPUs)
            encoded = tok.encode_batch(texts) if plan["batch_encode"] else [tok.encode(t) for t in texts]
            for ids, lang in zip(encoded, langs):
                a = np.asarray(ids, dtype=dtype)
                c = counts.setdefault(lang, [0, 0])
                c[0] += 1
                c[1] += len(a) + 1
                if n_in_part and n_in_part + len(a) + 1 > plan["shard_tokens"]:
                    flush()
                docs.append(a)
                n_in_part += len(a) + 1
                self.stat_update("documents")
        flush()
        write_text(work / f"counts-{rank:05d}.json", json.dumps({"split": split, "parts": k, "languages": counts}))
        return iter(())


def tokenize_corpus(
    corpus: Annotated[Path, POSITIONAL],
    tokenizer: Path,
    out: Path,
    workers: int = 0,
    shard_tokens: int = 100_000_000,
    resume: bool = True,
) -> dict:
    """Tokenize a corpus into token shards (EOD after every file) for training.

    Args:
        corpus: a split corpus (train/, valid/, test/ from `polycoder data split`) or one corpus folder (all of it becomes train).
        tokenizer: tokenizer folder (tokenizer.json; vocab.json + merges.txt; or PolyCoder's code-vocab.json + code-merges.txt).
        out: tokens folder to write ({train,valid,test}/shard_NNNNN.bin, meta.json, tokenizer/).
        workers: processes (0: all CPUs); the shards do not depend on it.
        shard_tokens: start a new shard when one would exceed this many tokens (documents are never cut).
        resume: keep the tasks a killed run with the same inputs already finished.
    """
    t0 = time.time()
    corpus, out = Path(corpus), Path(out)
    if shard_tokens < 1:
        raise PolycoderError(f"--shard-tokens must be positive, got {shard_tokens}")
    tok = _cached_tokenizer(str(Path(tokenizer).resolve()))
    if not tok.lossless:
        print(f"note: {tokenizer} lacks some of the 256 byte tokens; such bytes are encoded as U+FFFD "
              "(PolyCoder's vocabulary has no carriage return)")
    is_split = any((corpus / s).is_dir() for s in SPLITS)
    inputs: list[tuple[str, str]] = []
    if is_split:
        for s in SPLITS:
            if (corpus / s).is_dir():
                inputs += [(s, str(p)) for p in sorted((corpus / s).glob("*.parquet"))]
    else:
        inputs = [("train", str(p)) for p in shard_paths(corpus)]
        print(f"note: {corpus} is not split (no train/ valid/ test/): all of it goes to train; "
              "use `polycoder data split` for held-out data")
    if not inputs:
        raise PolycoderError(f"no *.parquet shards in {corpus} or its train/ valid/ test/ folders")
    work = out / ".work"
    n_workers = min(workers or engine.cpu_count(), len(inputs))
    plan = {"inputs": inputs, "tokenizer": str(Path(tokenizer).resolve()), "shard_tokens": shard_tokens,
            "batch_encode": n_workers == 1,
            "input_sizes": [os.path.getsize(p) for _, p in inputs]}
    old = json.loads((work / "plan.json").read_text()) if (work / "plan.json").is_file() else None
    if not resume or old != plan:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_text(work / "plan.json", json.dumps(plan))
    engine.run_tasks(TokenizeStep(str(work)), len(inputs), workers, work / "logs", resume=resume, desc="tokenize")
    # rename parts, in input order, to shard_NNNNN.bin of each split
    counts: dict[str, dict] = {s: {"documents": 0, "tokens": 0, "shards": 0, "languages": {}} for s in SPLITS}
    for s in SPLITS:
        shutil.rmtree(out / s, ignore_errors=True)
    for rank in range(len(inputs)):
        c = json.loads((work / f"counts-{rank:05d}.json").read_text())
        s = c["split"]
        for k in range(c["parts"]):
            dest = out / s / f"shard_{counts[s]['shards']:05d}.bin"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(work / f"part-{rank:05d}-{k:05d}.bin", dest)
            counts[s]["shards"] += 1
        for lang, (nd, nt) in c["languages"].items():
            e = counts[s]["languages"].setdefault(lang, {"documents": 0, "tokens": 0})
            e["documents"] += nd
            e["tokens"] += nt
            counts[s]["documents"] += nd
            counts[s]["tokens"] += nt
    tok.save(out / "tokenizer")
    meta = {
        "format": {"magic": MAGIC.decode(), "version": VERSION, "header_bytes": HEADER_BYTES,
                   "itemsize": itemsize_for(tok.vocab_size)},
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "tokenizer": str(Path(tokenizer).resolve()),
        "tokenizer_copy": "tokenizer",
        "corpus": str(corpus.resolve()),
        "splits": counts,
        "seconds": round(time.time() - t0, 2),
    }
    write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # parts are renamed; a rerun starts afresh
    for s in SPLITS:
        if counts[s]["documents"]:
            print(f"{s}: {counts[s]['documents']:,} documents, {counts[s]['tokens']:,} tokens, {counts[s]['shards']} shards")
    print(f"wrote {out}/meta.json ({meta['seconds']} s)")
    return meta
