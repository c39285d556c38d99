"""Where a model argument points: the bundled model, a folder, a run, an adapter, or a hub id.

`resolve(model)` gives the local folder behind what a user passed as `--model`:
- None, or `polycoder-tiny` (the bundled model's name): the bundled model in the package
  (a folder of that name is `./polycoder-tiny`). With --random-init the same name means the
  preset architecture instead; that case never reaches here (`polycoder.checkpoint` builds
  presets itself).
- a model folder (config.json and the weights), or a LoRA adapter folder
  (adapter_config.json; `adapter_base` finds the model it was trained on);
- a run folder of `train` / `finetune` (RUN/final, else RUN/checkpoints/step_N): its
  `final/` if there, else its newest complete checkpoint, named on stderr;
- a hub id such as `NinedayWang/PolyCoder-160M`, fetched once with `huggingface_hub` and
  cached by it;
or one error naming the fix (a preset without --random-init, a file, a missing folder,
offline). Loading what is there is `polycoder.checkpoint`'s job. `resolve` does no other
work, so a verb that takes several models can check them all before it starts.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from polycoder.config import PRESETS
from polycoder.errors import PolycoderError

BUNDLED_NAME = "polycoder-tiny"
"""The bundled model's name as a model argument (the preset of its architecture has it too)."""
BUNDLED_DIR = Path(__file__).parent / "assets" / BUNDLED_NAME
"""The bundled default model (`polycoder-tiny` weights, in the package)."""

HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
                "vocab.json", "merges.txt", "special_tokens_map.json"]
"""The files of a hub repository a model needs (not its other checkpoints or formats)."""

ADAPTER_CONFIG = "adapter_config.json"
"""What makes a folder a (peft) adapter folder."""

# The run folder's layout (polycoder.train.checkpointing writes it): a checkpoint is
# complete once its training_state/state.json is there, which is written last.
STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = Path("training_state") / "state.json"


def resolve(model: str | Path | None) -> Path:
    """The local folder behind a model argument (downloading a hub id if needed)."""
    if model is None or str(model) in ("", BUNDLED_NAME):  # the name wins over a folder of that name: ./polycoder-tiny
        if (BUNDLED_DIR / "config.json").is_file():
            return BUNDLED_DIR
        raise PolycoderError("no bundled default model in this installation; pass --model FOLDER|HUB_ID")
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or is_adapter(path):
            return path
        if (path / "checkpoints").is_dir() or (path / "final").is_dir():
            return run_model(path)
        raise PolycoderError(f"{path} has no config.json; a model folder holds config.json and the weights (a LoRA "
                             "adapter folder adapter_config.json, a run folder final/ or checkpoints/)")
    if str(model) in PRESETS:
        raise PolycoderError(
            f"{model!r} is a preset (an architecture, no weights): add --random-init to run it with random weights"
        )
    if path.exists():
        raise PolycoderError(f"{path} is a file; --model takes a model folder, a preset name or a hub id")
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        return download(str(model))
    raise PolycoderError(f"model {model!r} not found: give a folder, {BUNDLED_NAME!r} (the bundled model), a preset "
                         f"with --random-init ({', '.join(PRESETS)}) or a hub id like NinedayWang/PolyCoder-160M")


def resolve_all(models: list[str | Path | None], random_init: bool = False) -> list[str | Path]:
    """Every model argument's folder (a preset itself, with random_init), or the first one's
    error: for verbs that take several models, to check them all before loading any. Pass
    the results on as the models, so a run folder is announced and a hub id fetched once."""
    return [m if random_init and m is not None and str(m) in PRESETS else resolve(m) for m in models]


def display_name(model: str | Path | None) -> str:
    """A short name for a model argument (the bundled model's name, a folder's or hub id's last part)."""
    if model is None or str(model) == "":
        return BUNDLED_NAME
    return Path(str(model).rstrip("/")).name or str(model)


# ---- run folders ----------------------------------------------------------------------------


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """A run's complete step checkpoints, oldest first, as (step, folder)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def run_model(run_dir: Path) -> Path:
    """The model a run folder holds: final/ if the run finished, else its newest complete checkpoint."""
    final = run_dir / "final"
    if (final / "config.json").is_file() or is_adapter(final):
        chosen = final
    else:
        steps = complete_checkpoints(run_dir)
        if not steps:
            raise PolycoderError(f"{run_dir} is a run folder without a complete checkpoint yet (no final/, no "
                                 "checkpoints/step_N with training_state/state.json); wait for the run's first save "
                                 "or pass a model folder")
        chosen = steps[-1][1]
    print(f"{run_dir} is a run folder: using {chosen}", file=sys.stderr)
    return chosen


# ---- adapter folders ------------------------------------------------------------------------


def is_adapter(folder: Path) -> bool:
    """Whether `folder` holds a (peft) adapter rather than a whole model."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PolycoderError(f"cannot read {path} ({e}); an adapter folder holds peft's adapter_config.json") from None
    if not isinstance(cfg, dict):
        raise PolycoderError(f"{path} is not a JSON object; an adapter folder holds peft's adapter_config.json")
    return cfg


def base_reference(model: str | Path | None, folder: Path) -> str:
    """What an adapter records as its base (`base_model_name_or_path`): a reference that
    resolves from any working directory, which is what peft and transformers need too.

    `model` is the argument the user gave, `folder` what it resolved to: a hub id stays
    the hub id, a local folder (the bundled one included) becomes its absolute path.
    """
    if model is not None and str(model).count("/") == 1 and not Path(str(model)).expanduser().exists() \
            and not str(model).startswith((".", "/", "~")):
        return str(model)
    return str(folder.resolve())


def adapter_base(folder: Path, base: str | Path | None = None) -> Path:
    """The folder of the model an adapter folder was trained on (or of `base`, if given).

    Adapters written before bases were recorded as absolute paths hold a path relative to
    the directory `finetune` ran in; when it does not resolve from here, the folders above
    the adapter (the usual place of that directory) are tried before giving up.
    """
    if base is not None:
        return resolve(base)
    recorded = adapter_config(folder).get("base_model_name_or_path")
    if not recorded or not isinstance(recorded, str):
        raise PolycoderError(f"{folder / ADAPTER_CONFIG} names no base model (base_model_name_or_path); set it to "
                             "the base model's folder or hub id")
    path = Path(recorded).expanduser()
    if not path.is_absolute() and not path.is_dir():
        for above in folder.resolve().parents:
            if (above / path).is_dir():
                return resolve(above / path)
    if path.is_absolute() and not path.exists():
        raise PolycoderError(f"the base model of adapter {folder}, {recorded}, is not there any more; set "
                             f"base_model_name_or_path in {folder / ADAPTER_CONFIG} to its new folder or hub id")
    try:
        return resolve(recorded)
    except PolycoderError as e:
        raise PolycoderError(f"the base model of adapter {folder} ({recorded!r}, from its {ADAPTER_CONFIG}) "
                             f"does not resolve: {e}") from None


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
