"""Shared helpers of the training tests (no tests here): tiny token folders, the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_token_dir(root: Path, n_train: int = 20_000, n_valid: int = 2_000, vocab: int = 300, seed: int = 0) -> Path:
    """A token folder made by the real tokenizing step's shard writer, from a learnable
    synthetic corpus: "documents" that are noisy repetitions of a few token patterns."""
    from polycoder.token_shards import write_shard
    from polycoder.tokenizer import Tokenizer

    rng = np.random.default_rng(seed)
    patterns = [rng.integers(3, vocab, size=rng.integers(8, 24)) for _ in range(6)]

    def docs(n_tokens: int) -> list[np.ndarray]:
        out, total = [], 0
        while total < n_tokens:
            body = np.concatenate([patterns[i] for i in rng.integers(0, len(patterns), size=rng.integers(3, 12))])
            out.append(body)  # write_shard appends EOD
            total += len(body) + 1
        return out

    for split, n in (("train", n_train), ("valid", n_valid)):
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        write_shard(d / "shard_00000.bin", docs(n), vocab)
    (root / "meta.json").write_text(json.dumps({"vocab_size": vocab}))
    Tokenizer.byte_level().save(root / "tokenizer")  # 259 byte-level tokens, inside the 300
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def polycoder_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "polycoder", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(polycoder_cmd(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"polycoder {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}"
    return p


def losses(run_dir: Path) -> dict[int, float]:
    from polycoder.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def one_and_two_processes(tmp_path: Path, common: list[str]) -> tuple[dict[int, float], dict[int, float]]:
    """The per-step losses of `polycoder train ARGS` run in one process and under torchrun in
    two CPU processes (gloo), into tmp_path/one and tmp_path/two."""
    run_cli("train", "--out", str(tmp_path / "one"), *common)
    cmd = [polycoder_cmd()[0], "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "polycoder", "train", "--out", str(tmp_path / "two"), *common]
    p = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return losses(tmp_path / "one"), losses(tmp_path / "two")
