"""Training settings: small typed dataclasses, from a preset, a YAML file and overrides.

Three groups, each validated where it is built:
- `OptimSettings`: AdamW, the cosine schedule with linear warm-up, clipping.
- `DataSettings`: window length, batch sizes, how windows are drawn, the seed.
- `RunSettings`: steps, precision, checkpoints, evaluation, logging, parallelism.

Precedence, lowest first: the dataclass defaults, the recipe of the preset
(`recipe_for`), the YAML file (`optim:`, `data:`, `run:` sections), then overrides such as
`optim.lr=3e-4` from the command line. Each value is written once, here.

The original PolyCoder recipe (docs/design.md; Xu et al. 2022, Code-LMs' GPT-NeoX configs) is
the default for the `polycoder-*` presets: Adam, lr 1.6e-4 with cosine decay, 1 % warm-up,
no weight decay, clipping at 1.0, 128 sequences x 2048 tokens a step, 150K steps, fp16 on
GPUs. Limits: the betas and the floor of the cosine (min_lr) are not in the paper (docs/design.md); we use
torch's Adam betas (0.9, 0.999) and GPT-NeoX's usual floor of lr/10.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml

from polycoder.errors import PolycoderError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Sampling = Literal["random", "sequential"]
Parallel = Literal["ddp", "fsdp"]


@dataclass
class OptimSettings:
    """AdamW with a cosine learning-rate schedule and gradient clipping."""

    lr: float = 6e-4
    """Peak learning rate, reached at the end of warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last step."""
    warmup: float = 0.01
    """Warm-up length: a fraction of max_steps if < 1, else a number of steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (never on biases, LayerNorms or embeddings)."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.999
    """Adam's second-moment decay."""
    eps: float = 1e-8
    """Adam's epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: bool = True
    """Use torch's fused AdamW kernel where the device supports it (one pass over the state)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise PolycoderError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise PolycoderError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup < 0:
            raise PolycoderError(f"optim.warmup must be >= 0, got {self.warmup}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise PolycoderError("optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise PolycoderError(f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")


@dataclass
class DataSettings:
    """Which windows of the token shards make up each batch."""

    seq_len: int = 0
    """Tokens a window; 0 means the model's context length (block_size)."""
    batch_size: int = 8
    """Global batch, in windows a step (over all processes and accumulation steps)."""
    micro_batch: int = 0
    """Windows a forward pass on one process; 0 means batch_size / world_size (no
    accumulation). Accumulation steps = batch_size / (micro_batch * world_size)."""
    sampling: Sampling = "random"
    """`random`: each step draws batch_size window starts uniformly over all training tokens
    (with replacement). `sequential`: the disjoint windows of the shards, shuffled once an
    epoch, taken in order. Both are pure functions of (seed, step)."""
    seed: int = 1234
    """Seed of the window order, of the FIM draws and of the model's random initialisation."""
    fim_rate: float | None = None
    """Share of the document pieces of a window rearranged for fill-in-the-middle
    (`polycoder.train.fim_transform`). None (the default): 0.5 where the tokenizer has the
    FIM sentinels (StarCoder's rate), 0 where it has none, so left-to-right tokenizers and
    existing configs train as before. A rate > 0 with a tokenizer without the sentinels is an
    error (add them with `polycoder finetune --fim`)."""
    fim_spm_rate: float = 0.5
    """Share of the FIM samples laid out in SPM order rather than PSM (StarCoder: 0.5)."""
    fim_line_rate: float = 0.0
    """Share of the FIM samples whose middle is cut at lines (1-3 lines, or the rest of a line
    and up to 2 more) rather than at two uniform characters: the middles editors ask for
    (`polycoder.train.fim_transform`). 0 (the default): uniform cuts only, as Bavarian et al."""

    def __post_init__(self) -> None:
        if self.seq_len < 0 or self.batch_size < 1 or self.micro_batch < 0:
            raise PolycoderError("data.seq_len must be >= 0, data.batch_size >= 1 and data.micro_batch >= 0")
        if self.fim_rate is not None:
            if isinstance(self.fim_rate, bool) or not isinstance(self.fim_rate, (int, float)):
                raise PolycoderError(f"data.fim_rate must be a number in [0, 1] or null (auto), got {self.fim_rate!r}")
            self.fim_rate = float(self.fim_rate)
        for name in ("fim_rate", "fim_spm_rate", "fim_line_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise PolycoderError(f"data.{name} must be in [0, 1], got {value}")

    def grad_accum(self, world_size: int) -> int:
        """Accumulation steps for `world_size` processes; raises if the batch does not divide."""
        micro = self.micro_batch or max(1, self.batch_size // world_size)
        if self.batch_size % (micro * world_size):
            raise PolycoderError(
                f"data.batch_size {self.batch_size} is not a multiple of data.micro_batch {micro} x "
                f"{world_size} processes; choose sizes that divide")
        return self.batch_size // (micro * world_size)

    def micro(self, world_size: int) -> int:
        return self.batch_size // (world_size * self.grad_accum(world_size))


@dataclass
class RunSettings:
    """How long to train, at which precision, and what to write along the way."""

    max_steps: int = 1000
    """Optimizer steps in the whole run (the schedule's length)."""
    precision: Precision = "auto"
    """`fp32`; `bf16` (autocast, fp32 master weights; CPU or GPU); `fp16` (autocast with
    loss scaling; GPU only); `auto`: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on
    the CPU."""
    compile: bool = False
    """Compile the model with torch.compile (first steps are slow)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (less memory, ~30 % slower)."""
    save_every: int = 500
    """Write a checkpoint every N steps (and always at the end); 0 means only at the end."""
    keep_last: int = 3
    """Checkpoints to keep; older ones are deleted after a newer one is complete."""
    eval_every: int = 200
    """Validation loss every N steps (and at the end); 0 disables periodic validation."""
    eval_batches: int = 8
    """Batches of the validation split scored each time (the same windows each time)."""
    log_every: int = 1
    """Write a metrics record every N steps."""
    parallel: Parallel = "ddp"
    """Under torchrun: DDP (replicated model) or FSDP (sharded parameters and optimizer)."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default)."""
    tensorboard: bool = True
    """Also write TensorBoard event files (needs the `tensorboard` package)."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise PolycoderError(f"run.max_steps must be >= 1, got {self.max_steps}")
        for name in ("save_every", "keep_last", "eval_every", "eval_batches", "threads"):
            if getattr(self, name) < 0:
                raise PolycoderError(f"run.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise PolycoderError("run.keep_last must be >= 1 (the latest checkpoint is always kept)")
        if self.log_every < 1:
            raise PolycoderError("run.log_every must be >= 1")


@dataclass
class TrainSettings:
    """Everything a training run needs besides the model and the data folder."""

    optim: OptimSettings = field(default_factory=OptimSettings)
    """Optimizer and schedule."""
    data: DataSettings = field(default_factory=DataSettings)
    """Batches."""
    run: RunSettings = field(default_factory=RunSettings)
    """Run length, precision, checkpoints, logging."""
    model: dict[str, Any] = field(default_factory=dict)
    """Changes to the preset's architecture (`ModelConfig` fields, checked there), or a
    whole architecture for a name that is not a preset (n_layer, n_embd, n_head,
    intermediate_size at least). Only for training from scratch."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSettings:
        unknown = set(d) - {"optim", "data", "run", "model"}
        if unknown:
            raise PolycoderError(f"unknown settings section(s) {sorted(unknown)}; use optim, data, run, model")
        return cls(optim=_build(OptimSettings, d.get("optim", {}), "optim"),
                   data=_build(DataSettings, d.get("data", {}), "data"),
                   run=_build(RunSettings, d.get("run", {}), "run"),
                   model=dict(d.get("model", {})))


# The recipe of each preset: where its numbers come from is said above each.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # Xu et al. 2022 / docs/design.md: Adam lr 1.6e-4, cosine, 1 % warm-up, no decay, clip 1.0,
    # 128 x 2048 tokens a step, 150K steps, fp16 on 8 GPUs.
    "polycoder": {
        "optim": {"lr": 1.6e-4, "min_lr_ratio": 0.1, "warmup": 0.01, "weight_decay": 0.0, "grad_clip": 1.0},
        "data": {"seq_len": 2048, "batch_size": 128},
        "run": {"max_steps": 150_000, "save_every": 1000, "eval_every": 1000},
    },
    # The bundled model (scripts/train_bundled.sh): a small model trained on 2 CPU cores
    # for about half an hour; a higher rate suits its size (nanoGPT's small-model choice).
    "polycoder-tiny": {
        "optim": {"lr": 2e-3, "min_lr_ratio": 0.1, "warmup": 0.03, "weight_decay": 0.1, "beta2": 0.99},
        "data": {"seq_len": 512, "batch_size": 4},
        "run": {"max_steps": 250, "save_every": 50, "eval_every": 50, "eval_batches": 4, "precision": "fp32"},
    },
}


def recipe_for(preset: str | None) -> dict[str, dict[str, Any]]:
    """The training recipe of a model preset ({} for presets without one)."""
    if preset is None:
        return {}
    if preset in RECIPES:
        return RECIPES[preset]
    if preset.startswith("polycoder-") and preset[len("polycoder-"):] in ("160m", "0.4b", "2.7b"):
        return RECIPES["polycoder"]
    return {}


def load_settings(preset: str | None = None, config_file: str | Path | None = None,
                  overrides: list[str] | dict[str, Any] | None = None) -> TrainSettings:
    """Settings from the preset's recipe, then a YAML file, then `section.key=value` overrides."""
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in recipe_for(preset).items()}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise PolycoderError(f"settings file {path} not found; pass an existing YAML file to --config")
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise PolycoderError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(doc, dict):
            raise PolycoderError(f"{path} must hold a mapping with sections optim, data, run")
        for section, values in doc.items():
            if section == "preset":
                continue  # read by the caller
            if not isinstance(values, dict):
                raise PolycoderError(f"{path}: section {section!r} must be a mapping")
            merged.setdefault(section, {}).update(values)
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []]
    for key, value in items:
        section, _, name = key.partition(".")
        if not name:
            raise PolycoderError(f"override {key!r} must be section.key=value, e.g. optim.lr=3e-4")
        merged.setdefault(section, {})[name] = value
    return TrainSettings.from_dict(merged)


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise PolycoderError(f"override {text!r} must be section.key=value, e.g. optim.lr=3e-4")
    return key.strip(), yaml.safe_load(value)  # YAML typing: 3e-4 -> float, true -> bool


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise PolycoderError(f"unknown setting(s) {', '.join(f'{section}.{u}' for u in sorted(unknown))}; "
                             f"known: {', '.join(sorted(names))}")
    out = {}
    for k, v in values.items():
        tp = hints[k]
        choices = get_args(tp) if getattr(tp, "__origin__", None) is Literal else None
        try:
            if choices is not None:
                if v not in choices:
                    raise ValueError(f"choose one of {choices}")
            elif tp is bool:
                if not isinstance(v, bool):
                    raise ValueError("expected true or false")
            elif tp is int:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError("expected an integer")
                v = int(v)
            elif tp is float:
                v = float(v)
        except (TypeError, ValueError) as e:
            raise PolycoderError(f"setting {section}.{k}={v!r}: {e}") from None
        out[k] = v
    return cls(**out)
