"""Load and save models as Hugging Face-format folders.

`load_model(M)` accepts a folder, a preset name (with `random_init=True`, for speed tests),
a hub id such as `NinedayWang/PolyCoder-160M` (fetched with `huggingface_hub` when online;
a clear error when offline), a run folder, a LoRA adapter folder, or nothing: the bundled
default model (`polycoder.locate` finds the folder). `load(options)` does the same from a
verb's `ModelOptions`. An adapter folder loads its base model and merges the adapter into
the weights (`polycoder.lora`, said on stderr), so every verb runs it as a plain model.

Loading writes each weight once: the model's parameters are allocated on the target
device and dtype without initialisation (`empty_model`), then each tensor is read from the
memory-mapped safetensors / `pytorch_model.bin` file and copied into its parameter, one at
a time, so peak memory is about one copy of the weights. Buffers that old transformers
versions saved (`attention.bias`, `attention.masked_bias`, `rotary_emb.inv_freq`) are
ignored: the model computes them.

`save_checkpoint` writes config.json, model.safetensors (sharded with an index past
`max_shard_bytes`), generation_config.json and the tokenizer files (always including
tokenizer.json: transformers 5 cannot open vocab.json + merges.txt alone). The folder is
written under a temporary name and renamed into place (`polycoder.files.atomic_folder`),
so an interrupted save never leaves a half-written folder where a good one was.

`grow_vocabulary` gives a model rows for tokens added to its tokenizer (`finetune --fim`'s
sentinels): new rows start as the mean of the existing tokens' rows, and the embedding stays
padded to a multiple of 64 (GPT-NeoX's `make-vocab-size-divisible-by`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from polycoder.config import PRESETS, ModelConfig
from polycoder.errors import PolycoderError
from polycoder.files import atomic_folder, fsync_tree
from polycoder.locate import adapter_base, is_adapter, resolve
from polycoder.lora import merged
from polycoder.model import GPTNeoX
from polycoder.options import DTYPE_SPELLINGS, ModelOptions
from polycoder.quantize import quantize as quantize_model
from polycoder.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Saved by transformers 4.x as buffers; recomputed here.
IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")
# transformers 5 names the head `lm_head` in memory (it writes `embed_out` to disk).
RENAMED = {"lm_head.weight": "embed_out.weight"}


def torch_dtype(name: str) -> torch.dtype:
    name = DTYPE_SPELLINGS.get(name, name)
    if name not in DTYPES:
        raise PolycoderError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def device_of(name: str) -> str:
    """The device `--device` names: `auto` is the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ---- loading -----------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise PolycoderError(f"{folder}: shard(s) named in {index_name} are missing: {', '.join(missing[:3])}")
            return [folder / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise PolycoderError(f"{folder} has no weights (model.safetensors, sharded safetensors with an index, or pytorch_model.bin)")


def _iter_tensors(path: Path):
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise PolycoderError(f"cannot read {path}: {e}") from None
        yield from state.items()


def load_state_into(model: GPTNeoX, folder: Path) -> None:
    """Copy a folder's weight files into `model`'s parameters in place, one tensor at a time
    (each converted to its parameter's dtype and device); every parameter must be found."""
    expected = dict(model.named_parameters())  # a tied head is the embedding: named once
    seen: set[str] = set()
    for path in _weight_files(folder):
        for name, tensor in _iter_tensors(path):
            if name.endswith(IGNORED_SUFFIXES):
                continue
            name = RENAMED.get(name, name)
            if name not in expected:
                raise PolycoderError(f"{path.name}: unexpected tensor {name!r}; is this a GPT-NeoX checkpoint?")
            param = expected[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise PolycoderError(f"{path.name}: {name} has shape {tuple(tensor.shape)}, "
                                     f"config.json implies {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise PolycoderError(f"{folder}: weights missing for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")


def load_weights(model: GPTNeoX, folder: str | Path) -> None:
    """Copy a checkpoint folder's weights into `model` (exactly, in the model's dtype)."""
    load_state_into(model, Path(folder))


class _EmptyParameters(torch.overrides.TorchFunctionMode):
    """While modules are built: parameters come out of `torch.empty` in `dtype`, and
    `torch.nn.init`'s fills (normal_, kaiming_uniform_, ...) are skipped.

    Their values are written once afterwards, from a checkpoint or by `init_weights`.
    PyTorch's own initialisation was thrown away each time; built on the meta device it
    also cost 2.5-3 s, as `normal_` and `arange` on meta tensors run Python decompositions
    that import torch._dynamo. Factory and init functions dispatch through torch-function
    modes (as `torch.device(...)` does), so this takes them over without patching torch.
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("dtype") is None:
            kwargs["dtype"] = self.dtype  # nn.Linear, nn.Embedding, nn.LayerNorm make their weights so
        elif getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def empty_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> GPTNeoX:
    """The model with its parameters allocated on `device` in `dtype` but not initialised
    (they hold whatever the memory held): fill them with `load_state_into` or `init_weights`.
    The rotary tables are computed (float32), on the device."""
    with torch.device(device), _EmptyParameters(dtype):
        return GPTNeoX(config)


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int | None = 0) -> GPTNeoX:
    """A randomly initialised model (seeded), for training from scratch and speed tests."""
    model = empty_model(config, dtype, device)
    model.init_weights(seed)
    return model.eval()


def load_model(
    model: str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    random_init: bool = False,
    tokenizer: str | Path | None = None,
    quantize: str | None = None,
    base: str | Path | None = None,
) -> tuple[GPTNeoX, Tokenizer]:
    """The model and tokenizer behind a folder, preset (with random_init) or hub id.

    `tokenizer` names a folder (or tokenizer.json) to take the tokenizer from instead of
    the model's own folder, for weights saved without one. `quantize` ("int8", "int4")
    swaps the linear layers for weight-only quantized ones (polycoder.quantize; for
    inference only). `base`, for an adapter folder, is the model to apply it to instead
    of the base its adapter_config.json names.
    """
    net, tok = _load_model(model, dtype, device_of(device), random_init, tokenizer, base)
    if quantize:
        quantize_model(net, quantize)
    return net, tok


def load(options: ModelOptions) -> tuple[GPTNeoX, Tokenizer]:
    """The model and tokenizer a verb's `ModelOptions` name."""
    return load_model(**asdict(options))


def _load_model(model, dtype, device, random_init, tokenizer, base=None) -> tuple[GPTNeoX, Tokenizer]:
    dt = torch_dtype(dtype)
    if random_init and model is not None and str(model) in PRESETS:
        net = build_model(ModelConfig.from_preset(str(model)), dt, device)
        return net, Tokenizer.from_pretrained(tokenizer) if tokenizer else Tokenizer.byte_level()
    folder = resolve(model)
    if is_adapter(folder) and not random_init:
        return _load_adapter(folder, base, dt, device, tokenizer)
    if is_adapter(folder):  # random weights in the architecture of the adapter's base
        folder = adapter_base(folder, base)
    config = ModelConfig.from_json_file(folder / "config.json")
    tok = Tokenizer.from_pretrained(tokenizer or folder)
    if random_init:
        return build_model(config, dt, device), tok
    net = empty_model(config, dt, device)
    load_state_into(net, folder)
    return net.requires_grad_(False).eval(), tok


def _load_adapter(adapter: Path, base, dt: torch.dtype, device, tokenizer) -> tuple[GPTNeoX, Tokenizer]:
    """An adapter's base with the adapter merged in: merged in float32, then cast, so that a
    bf16 or fp16 model gets one rounding, as a merged folder saved in that dtype would."""
    base_folder = adapter_base(adapter, base)
    has_tokenizer = (adapter / "tokenizer.json").is_file() or (adapter / "vocab.json").is_file()
    net, tok = _load_model(base_folder, "float32", device, False, tokenizer or (adapter if has_tokenizer else None))
    if tok.fim is not None:  # the sentinels may be tokens the fine-tuning added (--fim): rows in the adapter
        try:
            base_tokens = Tokenizer.from_pretrained(base_folder).vocab_size
        except PolycoderError:  # a base saved without a tokenizer: it has the adapter's
            base_tokens = tok.vocab_size
        if tok.vocab_size > base_tokens:
            net = grow_vocabulary(net, base_tokens, tok.vocab_size)
    print(f"{adapter}: a LoRA adapter over {base_folder}; merged into the weights on load", file=sys.stderr)
    net = merged(net, adapter)
    for p in net.parameters():  # the weights only: the rotary tables stay float32, as load_model makes them
        p.data = p.data.to(dt)
    return net.eval(), tok


# ---- growing the vocabulary ---------------------------------------------------------------

VOCAB_PAD_MULTIPLE = 64


def grown_vocab_size(rows: int, n_tokens: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Embedding rows for `n_tokens` tokens: the current `rows` if they hold them, else
    `n_tokens` padded to `multiple` (so tokens added to PolyCoder's 50257 land in the padded
    tail of its 50304 rows, as StarCoder's did in GPT-2's)."""
    return max(rows, -(-n_tokens // multiple) * multiple)


@torch.no_grad()
def grow_vocabulary(model: GPTNeoX, old_tokens: int, new_tokens: int, multiple: int = VOCAB_PAD_MULTIPLE) -> GPTNeoX:
    """`model` with rows for tokens old_tokens..new_tokens-1 in its input embedding and output
    head: each such row, and each row added beyond the old padded size, is the mean of the
    rows of the `old_tokens` existing tokens (the padded tail already there is kept as it
    is). A new model in the same dtype and device; its config's vocab_size is the new size.

    Mean initialisation (as transformers' `resize_token_embeddings`, less its noise) starts a
    new token where an average token is, so the first steps' loss does not jump (Hewitt, 2021,
    "Initializing new word embeddings for pretrained language models")."""
    cfg = model.config
    if not 0 < old_tokens <= new_tokens:
        raise PolycoderError(f"cannot grow a vocabulary of {old_tokens} tokens to {new_tokens}")
    if old_tokens > cfg.vocab_size:
        raise PolycoderError(f"the tokenizer has {old_tokens} tokens but the model only {cfg.vocab_size} rows; "
                             "is this the model's own tokenizer?")
    rows = grown_vocab_size(cfg.vocab_size, new_tokens, multiple)
    state = dict(model.state_dict())
    for name in ("gpt_neox.embed_in.weight", "embed_out.weight"):
        w = state[name]
        mean = w[:old_tokens].float().mean(0).to(w.dtype)
        grown = mean.expand(rows, w.shape[1]).clone()  # [rows, C]
        grown[:cfg.vocab_size] = w
        grown[old_tokens:new_tokens] = mean
        state[name] = grown
    p = model.gpt_neox.embed_in.weight
    out = empty_model(cfg.replace(vocab_size=rows), p.dtype, p.device)
    out.load_state_dict(state)
    return out.train(model.training)


# ---- saving ------------------------------------------------------------------------------


def save_checkpoint(
    model: GPTNeoX,
    tokenizer: Tokenizer | None,
    folder: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Write a Hugging Face-format folder atomically; returns its path."""
    folder = Path(folder)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(IGNORED_SUFFIXES)}
    if model.config.tie_word_embeddings:
        state.pop("embed_out.weight", None)  # safetensors refuses shared tensors
    if dtype is not None:
        state = {k: v.to(torch_dtype(dtype)) for k, v in state.items()}
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    saved_dtype = dtype or str(next(iter(state.values())).dtype).removeprefix("torch.")
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(saved_dtype), indent=2) + "\n")
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in state.items():
            n = v.numel() * v.element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += n
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for p in tmp.iterdir():  # safetensors writes its files private; a checkpoint is shared like any file we write
            os.chmod(p, 0o666 & ~_umask())
        fsync_tree(tmp)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
