"""The vocabulary that verb functions share with the command line.

A verb is a typed Python function (`polycoder.cli` builds its parser from the signature).
What the two sides must agree on lives here, so that library modules never import the
command line:

- `POSITIONAL`: `Annotated[Path, POSITIONAL]` marks a parameter as a positional argument.
- `Alias`, `Spellings`: other names of an option, other spellings of its values; one
  vocabulary across verbs (`--dtype`, `--device auto`, `--model`, `--near-threshold`), the
  old spellings kept.
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
from typing import Annotated, Literal

POSITIONAL = "positional"


class Alias:
    """`Annotated[T, Alias("--old-name")]`: the command line also accepts these spellings of the
    option (kept when an option is renamed, so scripts that use the old name go on working)."""

    def __init__(self, *flags: str):
        self.flags = flags


class Spellings(dict):
    """`Annotated[Literal[...], Spellings(fp32="float32")]`: other accepted spellings of a choice's
    values, mapped to the one the function receives."""


DTYPE_SPELLINGS = Spellings(fp32="float32", f32="float32", bf16="bfloat16", fp16="float16", f16="float16", half="float16")
"""Training said fp32/bf16/fp16 and inference float32/bfloat16/float16: both are accepted everywhere."""

TrainDtype = Annotated[Literal["auto", "float32", "bfloat16", "float16"] | None, Alias("--precision"), DTYPE_SPELLINGS]
"""`train` and `finetune --dtype`: the precision of the forward pass (the weights stay fp32);
auto is bf16 (fp16 where bf16 is missing) on a CUDA GPU, fp32 on the CPU."""


def precision_of(dtype: str | None) -> str | None:
    """Training's own name of a dtype (`run.precision`: fp32, bf16, fp16, auto), any spelling."""
    if dtype is None:
        return None
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(DTYPE_SPELLINGS.get(dtype, dtype), dtype)


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
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "precision of the weights (fp32, bf16, fp16 are accepted too)", "spellings": DTYPE_SPELLINGS})
    device: str = field(default="auto", metadata={"help": (
        "auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:1, ...")})
    random_init: bool = field(default=False, metadata={"help": (
        "random weights in the model's architecture (for speed tests and smoke runs)")})
    tokenizer: str | None = field(default=None, metadata={"help": (
        "take the tokenizer from this folder (or tokenizer.json) instead of the model's own "
        "(for weights saved without one)")})
    quantize: Literal["int8", "int4"] | None = field(default=None, metadata={"help": (
        "weight-only quantization: int8 (a scale per output channel), the fastest CPU decoding, or int4 "
        "(groups of 32), half of int8's memory but slower than int8 (a memory option); benchmarks/decode.py "
        "measures their speed and cost")})
