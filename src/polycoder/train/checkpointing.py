"""Training checkpoints that are never half-written: write aside, fsync, rename.

Layout of a run folder:
    RUN_DIR/checkpoints/step_00000500/      a Hugging Face-format folder (config.json,
        model.safetensors, tokenizer files) or, for LoRA, a peft adapter folder, plus
        training_state/state.json           step, tokens seen, data position, settings
        training_state/optimizer.pt         AdamW state (full, unsharded), scheduler state
        training_state/rng_rank{R}.pt       torch / CUDA / numpy / Python RNG states of rank R

Protocol (POSIX): everything is written into `.tmp-step_N/` next to the final folder (the
folder form of `polycoder.files.atomic_folder`, spread over ranks with barriers),
every file and the folder are fsync'ed, then the folder is renamed to `step_N` in one
`os.rename`, and the parent is fsync'ed. A crash before the rename leaves only a `.tmp-*`
folder, which readers ignore and the next save deletes; a crash after it leaves a complete
checkpoint. `state.json` is written last inside the folder, and `latest_checkpoint` also
requires it, so even a file system that reorders renames cannot hand out a partial one.
Older checkpoints beyond `keep_last` are deleted only after the new one is in place.

`export_final` gives a run's last checkpoint, without its training state, as
RUN_DIR/final/: the folder to load or hand on.

Limits: assumes all ranks see the same file system (rank 0 renames what every rank wrote).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polycoder.files import atomic_folder, fsync_dir, fsync_tree
from polycoder.locate import complete_checkpoints

STATE_DIR = "training_state"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, folder): the rule `--model RUN_DIR`
    follows too, so it lives with the rest of what a model argument means (polycoder.locate)."""
    return complete_checkpoints(run_dir)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    run_dir: str | Path,
    step: int,
    write_model: Callable[[Path], None] | None,
    optimizer_state: dict[str, Any] | None,
    state: dict[str, Any],
    keep_last: int,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically; every rank calls this, rank 0 does most of it.

    `write_model(folder)` writes the Hugging Face (or adapter) folder (rank 0 only: other
    ranks pass None); `optimizer_state` is the full optimizer + scheduler state (rank 0);
    `state` goes to state.json; `rank_state`, if given, is this rank's own part of the
    state (FSDP's optimizer shard). Returns the final folder.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    if final.exists():  # this step is already saved (e.g. SIGTERM right after a periodic save)
        return final
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by an interrupted save
            shutil.rmtree(stale, ignore_errors=True)
        if write_model is not None:
            write_model(tmp)  # first: it may create (or replace) the folder itself
        (tmp / STATE_DIR).mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / STATE_DIR / f"rng_rank{rank}.pt")
    if rank_state is not None:  # e.g. this rank's shard of the optimizer state (FSDP)
        torch.save(rank_state, tmp / STATE_DIR / f"optimizer_rank{rank}.pt")
    if rank == 0:
        torch.save(optimizer_state, tmp / STATE_DIR / "optimizer.pt")
        (tmp / STATE_DIR / "state.json").write_text(json.dumps(state, indent=2))
    barrier()
    if rank == 0:
        fsync_tree(tmp)
        os.rename(tmp, final)
        fsync_dir(root)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_training_state(folder: str | Path, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(state.json, optimizer + scheduler state, this rank's RNG states or None)."""
    sd = Path(folder) / STATE_DIR
    state = json.loads((sd / "state.json").read_text())
    optim = torch.load(sd / "optimizer.pt", map_location="cpu", weights_only=False)
    rng_path = sd / f"rng_rank{rank}.pt"
    rng = torch.load(rng_path, weights_only=False) if rng_path.exists() else None
    shard_path = sd / f"optimizer_rank{rank}.pt"
    if shard_path.exists():
        optim = dict(optim or {}, optimizer=torch.load(shard_path, map_location="cpu", weights_only=False))
    return state, optim, rng


def export_final(checkpoint: str | Path, final: str | Path) -> Path:
    """The model folder of `checkpoint` (all but training_state/) as `final`, replaced atomically.

    Files are hard links where the file system allows: the weights are not stored twice, and
    deleting the checkpoint later (keep_last) leaves final/ whole. Nothing writes a checkpoint's
    files in place (every save is a new folder), so the two names cannot drift apart.
    """
    with atomic_folder(final) as tmp:
        for p in sorted(Path(checkpoint).iterdir()):
            if p.name == STATE_DIR:
                continue
            if p.is_dir():
                shutil.copytree(p, tmp / p.name)
                continue
            try:
                os.link(p, tmp / p.name)
            except OSError:  # another file system, or one without hard links
                shutil.copy2(p, tmp / p.name)
        fsync_tree(tmp)
    return Path(final)
