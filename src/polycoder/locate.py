"""Where a model argument points: the bundled model, a folder, or a Hugging Face hub id.

`resolve(model)` gives the local folder behind what a user passed as `--model` (None: the
bundled default model; a folder with config.json; a hub id such as
`NinedayWang/PolyCoder-160M`, fetched once with `huggingface_hub` and cached by it), or
one error naming the fix (a preset without --random-init, a file, a missing folder,
offline). Loading what is there is `polycoder.checkpoint`'s job.
"""

from __future__ import annotations

import os
from pathlib import Path

from polycoder.config import PRESETS
from polycoder.errors import PolycoderError

BUNDLED_DIR = Path(__file__).parent / "assets" / "polycoder-tiny"
"""The bundled default model (`polycoder-tiny` weights, in the package)."""

HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
                "vocab.json", "merges.txt", "special_tokens_map.json"]
"""The files of a hub repository a model needs (not its other checkpoints or formats)."""


def resolve(model: str | Path | None) -> Path:
    """The local folder behind a model argument (downloading a hub id if needed)."""
    if model is None or str(model) == "":
        if (BUNDLED_DIR / "config.json").is_file():
            return BUNDLED_DIR
        raise PolycoderError("no bundled default model in this installation; pass --model FOLDER|HUB_ID")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PolycoderError(f"{path} has no config.json; a model folder holds config.json and the weights")
        return path
    if str(model) in PRESETS:
        raise PolycoderError(
            f"{model!r} is a preset (an architecture, no weights): add --random-init to run it with random weights"
        )
    if path.exists():
        raise PolycoderError(f"{path} is a file; --model takes a model folder, a preset name or a hub id")
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        return download(str(model))
    raise PolycoderError(f"model {model!r} not found: give a folder, a preset ({', '.join(PRESETS)}) or a hub id like "
                         "NinedayWang/PolyCoder-160M")


def download(repo_id: str) -> Path:
    """Fetch a hub repository's model files with huggingface_hub (cached), or explain why not."""
    from huggingface_hub import snapshot_download  # deferred: it imports requests and more, needed for hub ids only

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, network: all end the same way for a user
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise PolycoderError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({why}). On a machine with network, run "
            f"`huggingface-cli download {repo_id} --local-dir DIR` and pass --model DIR"
        ) from None
