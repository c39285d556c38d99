"""The vocabulary that verb functions share with the command line.

A verb is a typed Python function (`polycoder.cli` builds its parser from the signature).
What the two sides must agree on lives here, so that library modules never import the
command line:

- `POSITIONAL`: `Annotated[Path, POSITIONAL]` marks a parameter as a positional argument.
- `ModelOptions`: which model to load and how, the options of every verb that runs a
  model. A verb takes it as one parameter (`load: ModelOptions = ModelOptions()`); the
  command line shows its fields as options of their own (`--model`, `--dtype`, ...) with
  the help written once, here. A verb that takes several models declares its own `model`
  parameter, which replaces the field of the same name; one that needs only some of the
  fields says which with `Annotated[ModelOptions | None, Fields("model", ...)]`.
  `polycoder.checkpoint.load(options)` loads what it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

POSITIONAL = "positional"


class Fields:
    """`Annotated[SomeOptions, Fields("a", "b")]`: the command line shows only these fields."""

    def __init__(self, *names: str):
        self.names = names


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load, and how."""

    model: str | None = field(default=None, metadata={"help": (
        "a model folder, a Hugging Face hub id, or a preset (polycoder-160m, ...) with --random-init "
        "(default: the bundled model)")})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": (
        "precision of the weights")})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    random_init: bool = field(default=False, metadata={"help": (
        "random weights in the model's architecture (for speed tests and smoke runs)")})
    tokenizer: str | None = field(default=None, metadata={"help": (
        "take the tokenizer from this folder (or tokenizer.json) instead of the model's own "
        "(for weights saved without one)")})
    quantize: Literal["int8", "int4"] | None = field(default=None, metadata={"help": (
        "weight-only quantization for faster CPU decoding: int8 (a scale per output channel) or int4 "
        "(groups of 32); benchmarks/decode.py measures their speed and cost")})
