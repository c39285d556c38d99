"""`polycoder convert neox`: PolyCoder's original GPT-NeoX/DeepSpeed checkpoints to our folder.

The released checkpoints (Zenodo, `checkpoints-{160M,0-4B,2-7B}/global_step150000/`) are
DeepSpeed pipeline-module files, one per pipeline layer and model-parallel rank:
`layer_XX-model_YY-model_states.pt`, each a plain state dict of that layer's tensors:

| file (N transformer layers) | keys | our names |
|---|---|---|
| layer_00 | `word_embeddings.weight` | `gpt_neox.embed_in.weight` |
| layer_01 | (none: `_pre_transformer_block`, no parameters, no file) | |
| layer_02 .. layer_{N+1} | a transformer layer's keys (below) | `gpt_neox.layers.{i}.<same key>` (inv_freq dropped: recomputed) |
| layer_{N+2} | (none: `_post_transformer_block`) | |
| layer_{N+3} | `norm.weight`, `norm.bias` | `gpt_neox.final_layer_norm.*` |
| layer_{N+4} | `final_linear.weight` (absent with tied embeddings) | `embed_out.weight` |

A transformer layer's keys: `input_layernorm.*`, `attention.query_key_value.*`,
`attention.dense.*`, `post_attention_layernorm.*`, `mlp.dense_h_to_4h.*`,
`mlp.dense_4h_to_h.*`, `attention.rotary_emb.inv_freq`.

The key names inside a layer are already transformers' GPT-NeoX names, and the fused QKV
is already interleaved per head in both, so the conversion is a renaming: no reshape.
Model-parallel ranks (`model_00`, `model_01`, ...) are merged as Megatron split them:
column-parallel tensors (QKV, dense_h_to_4h, the vocabulary-parallel embedding and output
head) concatenated along the output rows (dim 0), row-parallel weights (attention.dense,
dense_4h_to_h) along the input columns (dim 1), LayerNorms averaged (they are replicas),
and the row-parallel biases summed, as EleutherAI's own converters do. With one rank (the
PolyCoder releases) every rule is the identity.

Sources (GPT-NeoX's code is not on this machine; layout and rules checked against):
EleutherAI/gpt-neox `tools/convert_to_hf.py` and `tools/merge20b.py` (2022: layer i at
pipeline index i + 2, final norm at N + 3, output head at N + 4, the merge rules above);
VHellendoorn/Code-LMs `Convert2HF/convert_neox_pt_to_huggingface_neox.py` (PolyCoder's
own conversion: `word_embeddings` -> `gpt_neox.embed_in`, layer keys prefixed as they are,
`norm.` -> `gpt_neox.final_layer_norm.`, `final_linear` -> `embed_out`).

`--config` is the GPT-NeoX YAML the model was trained with (`num-layers`, `hidden-size`,
`num-attention-heads`, `max-position-embeddings` / `seq-length`, `rotary-pct`,
`rotary-emb-base`, `pos-emb`, `norm`, `layernorm-epsilon`, `gpt-j-residual`,
`activation`; hyphens or underscores), or a Hugging Face config.json. The vocabulary size
and whether the output head is tied are read from the tensors themselves.

The tokenizer is PolyCoder's as read at training time (`Tokenizer.from_files`, whose
headerless merges file loses its first merge) and is saved with tokenizer.json.

Limits: rotary position embeddings and LayerNorm only (the other `pos-emb` / `norm`
choices of GPT-NeoX have no GPTNeoXForCausalLM equivalent); GPT-NeoX's `bias-gelu-fusion`
computed the tanh form of GELU in training while the released Hugging Face configs (and
so this conversion, by default) say "gelu" (erf): pass an HF config with another
`hidden_act` to choose. The row-parallel bias rule (sum) is EleutherAI's; it could not be
checked here against a real multi-rank PolyCoder checkpoint (the releases have one rank).

The verb's module: torch and our modules that import it are imported inside the
functions that run the model, so that `polycoder convert neox --help` reads the options without
importing torch (about 2 s); tests/test_structure.py allows this for the verb modules only.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from tqdm import tqdm

from polycoder.config import ModelConfig
from polycoder.errors import PolycoderError
from polycoder.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
FIRST_BLOCK = 2  # layer_00 embedding, layer_01 a parameter-free function

# How model-parallel shards of a tensor are merged, and split (the inverse, for tests).
COLUMN, ROW, REPLICA, ROW_BIAS = "column", "row", "replica", "row_bias"

# NeoX key inside a transformer-layer file -> (our key under gpt_neox.layers.{i}., merge rule)
LAYER_KEYS: dict[str, tuple[str, str]] = {
    "input_layernorm.weight": ("input_layernorm.weight", REPLICA),
    "input_layernorm.bias": ("input_layernorm.bias", REPLICA),
    "attention.query_key_value.weight": ("attention.query_key_value.weight", COLUMN),
    "attention.query_key_value.bias": ("attention.query_key_value.bias", COLUMN),
    "attention.dense.weight": ("attention.dense.weight", ROW),
    "attention.dense.bias": ("attention.dense.bias", ROW_BIAS),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", REPLICA),
    "post_attention_layernorm.bias": ("post_attention_layernorm.bias", REPLICA),
    "mlp.dense_h_to_4h.weight": ("mlp.dense_h_to_4h.weight", COLUMN),
    "mlp.dense_h_to_4h.bias": ("mlp.dense_h_to_4h.bias", COLUMN),
    "mlp.dense_4h_to_h.weight": ("mlp.dense_4h_to_h.weight", ROW),
    "mlp.dense_4h_to_h.bias": ("mlp.dense_4h_to_h.bias", ROW_BIAS),
}
# Buffers GPT-NeoX saved that we recompute.
IGNORED_KEYS = ("attention.rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
EMBEDDING = ("word_embeddings.weight", "gpt_neox.embed_in.weight", COLUMN)
FINAL_NORM = {
    "norm.weight": ("gpt_neox.final_layer_norm.weight", REPLICA),
    "norm.bias": ("gpt_neox.final_layer_norm.bias", REPLICA),
}
OUTPUT = ("final_linear.weight", "embed_out.weight", COLUMN)


def merge_shards(shards: list[torch.Tensor], rule: str, name: str) -> torch.Tensor:
    """One tensor from its model-parallel shards (rank order)."""
    import torch

    if len(shards) == 1:
        return shards[0]
    if rule == COLUMN:
        return torch.cat(shards, dim=0)
    if rule == ROW:
        return torch.cat(shards, dim=1)
    if rule == ROW_BIAS:
        return torch.stack(shards).sum(0)
    if any(s.shape != shards[0].shape for s in shards):
        raise PolycoderError(f"{name}: model-parallel replicas differ in shape")
    return torch.stack([s.float() for s in shards]).mean(0).to(shards[0].dtype)


def split_tensor(t: torch.Tensor, rule: str, ranks: int) -> list[torch.Tensor]:
    """The inverse of `merge_shards` (how Megatron/GPT-NeoX lays a tensor across ranks)."""
    if ranks == 1:
        return [t]
    if rule == COLUMN:
        return [c.clone() for c in t.chunk(ranks, dim=0)]
    if rule == ROW:
        return [c.clone() for c in t.chunk(ranks, dim=1)]
    if rule == ROW_BIAS:
        return [t / ranks for _ in range(ranks)]
    return [t.clone() for _ in range(ranks)]


# ---- the NeoX config --------------------------------------------------------------------


def _get(d: dict[str, Any], key: str, default: Any = None) -> Any:
    for k in (key, key.replace("-", "_"), key.replace("_", "-")):
        if k in d:
            return d[k]
    return default


def read_neox_config(path: str | Path) -> dict[str, Any]:
    """A GPT-NeoX YAML config (or several merged, later files win) or a Hugging Face config.json."""
    path = Path(path)
    if not path.is_file():
        raise PolycoderError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise PolycoderError(f"{path} is not valid JSON: {e}") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolycoderError(f"{path} is not valid YAML (a GPT-NeoX config): {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise PolycoderError(f"{path}: expected a mapping of GPT-NeoX settings")
    return d


def model_config_from_neox(d: dict[str, Any], vocab_size: int, tied: bool, has_rotary: bool) -> ModelConfig:
    """Our ModelConfig from a GPT-NeoX settings dict (or an HF config dict) and the tensors' facts."""
    if d.get("model_type") == "gpt_neox":
        cfg = ModelConfig.from_hf_dict(d)
        return cfg.replace(vocab_size=vocab_size, tie_word_embeddings=tied)
    required = ("num-layers", "hidden-size", "num-attention-heads")
    missing = [k for k in required if _get(d, k) is None]
    if missing:
        raise PolycoderError(f"GPT-NeoX config lacks {', '.join(missing)}; is this the model's YAML config?")
    pos_emb = _get(d, "pos-emb", "rotary" if has_rotary else "learned")
    if pos_emb != "rotary":
        raise PolycoderError(f"GPT-NeoX config: pos-emb {pos_emb!r} is not supported; only rotary embeddings (as PolyCoder)")
    norm = _get(d, "norm", "layernorm")
    if norm != "layernorm":
        raise PolycoderError(f"GPT-NeoX config: norm {norm!r} is not supported; only layernorm (as PolyCoder)")
    hidden = int(_get(d, "hidden-size"))
    block = _get(d, "max-position-embeddings") or _get(d, "seq-length") or 2048
    return ModelConfig(
        n_layer=int(_get(d, "num-layers")),
        n_embd=hidden,
        n_head=int(_get(d, "num-attention-heads")),
        # GPT-NeoX of 2022 fixed the MLP at 4 x hidden; later versions may say otherwise.
        intermediate_size=int(_get(d, "intermediate-size") or 4 * hidden),
        vocab_size=vocab_size,
        block_size=int(block),
        rotary_pct=float(_get(d, "rotary-pct", 1.0)),
        rope_base=float(_get(d, "rotary-emb-base", 10000)),
        parallel_residual=bool(_get(d, "gpt-j-residual", False)),
        layer_norm_eps=float(_get(d, "layernorm-epsilon", 1e-5)),
        tie_word_embeddings=tied,
        hidden_act=str(_get(d, "activation", "gelu")),
    )


# ---- reading the checkpoint -------------------------------------------------------------


def find_step_dir(checkpoint_dir: Path) -> Path:
    """The folder holding the layer files: DIR itself, DIR/<latest>, or DIR's only global_step*."""
    if not checkpoint_dir.is_dir():
        raise PolycoderError(f"checkpoint folder not found: {checkpoint_dir}")
    if any(LAYER_FILE.match(p.name) for p in checkpoint_dir.iterdir()):
        return checkpoint_dir
    latest = checkpoint_dir / "latest"
    if latest.is_file() and (checkpoint_dir / latest.read_text().strip()).is_dir():
        return find_step_dir(checkpoint_dir / latest.read_text().strip())
    steps = sorted(p for p in checkpoint_dir.glob("global_step*") if p.is_dir())
    if len(steps) == 1:
        return find_step_dir(steps[0])
    if steps:
        raise PolycoderError(f"{checkpoint_dir} holds several steps ({', '.join(p.name for p in steps[:4])}); pass one of them")
    raise PolycoderError(
        f"no GPT-NeoX layer files (layer_XX-model_YY-model_states.pt) in {checkpoint_dir}; "
        "pass the global_stepN folder of the original checkpoint"
    )


def _load(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PolycoderError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise PolycoderError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def layer_files(step_dir: Path) -> dict[int, list[Path]]:
    """Pipeline index -> its model-parallel files in rank order (all ranks present)."""
    files: dict[int, dict[int, Path]] = defaultdict(dict)
    for p in step_dir.iterdir():
        m = LAYER_FILE.match(p.name)
        if m:
            files[int(m.group(1))][int(m.group(2))] = p
    ranks = {len(r) for r in files.values()}
    if len(ranks) != 1 or any(sorted(r) != list(range(len(r))) for r in files.values()):
        raise PolycoderError(f"{step_dir}: model-parallel files are incomplete (every layer needs model_00..model_NN)")
    return {i: [r[k] for k in sorted(r)] for i, r in sorted(files.items())}


def read_neox_state(step_dir: Path, n_layer: int, progress: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """Our state dict from the layer files (ranks merged), and whether the rotary buffer was seen."""
    files = layer_files(step_dir)
    blocks = range(FIRST_BLOCK, FIRST_BLOCK + n_layer)
    missing = [i for i in [0, *blocks] if i not in files]
    if missing:
        raise PolycoderError(
            f"{step_dir}: layer file(s) {', '.join(f'layer_{i:02d}' for i in missing[:4])} missing for a "
            f"{n_layer}-layer model (transformer layers are layer_{FIRST_BLOCK:02d}..layer_{FIRST_BLOCK + n_layer - 1:02d}); "
            "does --config match the checkpoint?"
        )
    state: dict[str, torch.Tensor] = {}
    has_rotary = False

    def take(index: int) -> tuple[list[dict[str, torch.Tensor]], set[str]]:
        shards = [_load(p) for p in files[index]]
        return shards, set(shards[0])

    shards, keys = take(0)
    if EMBEDDING[0] not in keys:
        raise PolycoderError(f"{files[0][0].name} lacks {EMBEDDING[0]}; found {sorted(keys)[:4]}")
    if "position_embeddings.weight" in keys:
        raise PolycoderError("the checkpoint has learned position embeddings; only rotary GPT-NeoX models convert")
    state[EMBEDDING[1]] = merge_shards([s[EMBEDDING[0]] for s in shards], EMBEDDING[2], EMBEDDING[0])

    for layer, index in enumerate(tqdm(blocks, desc="layers", unit="layer", disable=not progress)):
        shards, keys = take(index)
        unknown = keys - set(LAYER_KEYS) - set(IGNORED_KEYS)
        lacking = set(LAYER_KEYS) - keys
        if unknown or lacking:
            raise PolycoderError(
                f"{files[index][0].name}: not a GPT-NeoX transformer layer "
                f"(unexpected {sorted(unknown)[:3]}, missing {sorted(lacking)[:3]})"
            )
        has_rotary |= "attention.rotary_emb.inv_freq" in keys
        for key, (ours, rule) in LAYER_KEYS.items():
            state[f"gpt_neox.layers.{layer}.{ours}"] = merge_shards([s[key] for s in shards], rule, key)

    # Final norm and output head: in the files after the last block (N+3 and N+4 in GPT-NeoX).
    for index in [i for i in files if i >= FIRST_BLOCK + n_layer]:
        shards, keys = take(index)
        for key, (ours, rule) in FINAL_NORM.items():
            if key in keys:
                state[ours] = merge_shards([s[key] for s in shards], rule, key)
        if OUTPUT[0] in keys:
            state[OUTPUT[1]] = merge_shards([s[OUTPUT[0]] for s in shards], OUTPUT[2], OUTPUT[0])
    for _, (ours, _) in FINAL_NORM.items():
        if ours not in state:
            raise PolycoderError(f"{step_dir}: no final norm (norm.weight / norm.bias) after the last transformer layer")
    return state, has_rotary


# ---- writing the NeoX layout (the other direction; used by the tests) -------------------


def write_neox_checkpoint(model, step_dir: str | Path, ranks: int = 1) -> Path:
    """Write `model` (our GPTNeoX) as GPT-NeoX pipeline layer files split over `ranks` model-parallel ranks."""
    import torch

    cfg = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    step_dir = Path(step_dir)
    step_dir.mkdir(parents=True, exist_ok=True)
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.rotary_dims, 2, dtype=torch.float32) / cfg.rotary_dims))

    def save(index: int, tensors: dict[str, tuple[torch.Tensor, str]]) -> None:
        for r in range(ranks):
            part = {k: split_tensor(t, rule, ranks)[r].contiguous() for k, (t, rule) in tensors.items()}
            torch.save(part, step_dir / f"layer_{index:02d}-model_{r:02d}-model_states.pt")

    save(0, {EMBEDDING[0]: (state[EMBEDDING[1]], EMBEDDING[2])})
    for layer in range(cfg.n_layer):
        tensors = {key: (state[f"gpt_neox.layers.{layer}.{ours}"], rule) for key, (ours, rule) in LAYER_KEYS.items()}
        tensors["attention.rotary_emb.inv_freq"] = (inv_freq, REPLICA)
        save(FIRST_BLOCK + layer, tensors)
    save(FIRST_BLOCK + cfg.n_layer + 1, {key: (state[ours], rule) for key, (ours, rule) in FINAL_NORM.items()})
    if not cfg.tie_word_embeddings:
        save(FIRST_BLOCK + cfg.n_layer + 2, {OUTPUT[0]: (state[OUTPUT[1]], OUTPUT[2])})
    return step_dir


def neox_yaml(config: ModelConfig, ranks: int = 1) -> str:
    """A GPT-NeoX YAML config for `config` (the keys `read_neox_config` reads, PolyCoder's style)."""
    d = {
        "num-layers": config.n_layer, "hidden-size": config.n_embd, "num-attention-heads": config.n_head,
        "seq-length": config.block_size, "max-position-embeddings": config.block_size,
        "pos-emb": "rotary", "rotary-pct": config.rotary_pct, "rotary-emb-base": config.rope_base,
        "norm": "layernorm", "layernorm-epsilon": config.layer_norm_eps,
        "gpt-j-residual": config.parallel_residual, "no-weight-tying": not config.tie_word_embeddings,
        "activation": config.hidden_act, "model-parallel-size": ranks, "pipe-parallel-size": 1,
        "make-vocab-size-divisible-by": 128,
    }
    # GPT-NeoX configs are written as YAML flow mappings with quoted keys, comments allowed.
    lines = ["# GPT-NeoX model settings", "{"] + [f'  "{k}": {json.dumps(v)},' for k, v in d.items()] + ["}"]
    return "\n".join(lines) + "\n"


# ---- the CLI verb ------------------------------------------------------------------------


def convert_neox(
    checkpoint_dir: Path,
    vocab_file: Path,
    merges_file: Path,
    config: Path,
    out: Path,
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
) -> dict:
    """Convert an original GPT-NeoX/DeepSpeed checkpoint (PolyCoder's Zenodo release) to a Hugging Face-format folder.

    Args:
        checkpoint_dir: the global_stepN folder with layer_XX-model_YY-model_states.pt files (or its parent).
        vocab_file: the tokenizer's vocab.json (PolyCoder: code-vocab.json).
        merges_file: the merges file (PolyCoder: code-merges.txt), read as at training time.
        config: the GPT-NeoX YAML config the model was trained with, or a Hugging Face config.json.
        out: the folder to write (config.json, model.safetensors, tokenizer files).
        dtype: weights' dtype in the folder; auto keeps the checkpoint's (fp16 for PolyCoder).
    """
    import torch

    from polycoder.checkpoint import save_checkpoint
    from polycoder.model import GPTNeoX

    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_files(vocab_file, merges_file)
    settings = read_neox_config(config)
    n_layer = settings.get("num_hidden_layers") if settings.get("model_type") == "gpt_neox" else _get(settings, "num-layers")
    if not n_layer:
        raise PolycoderError(f"{config}: no num-layers (GPT-NeoX YAML) or num_hidden_layers (config.json)")
    step_dir = find_step_dir(Path(checkpoint_dir))
    state, has_rotary = read_neox_state(step_dir, int(n_layer))
    tied = "embed_out.weight" not in state
    vocab_size = state["gpt_neox.embed_in.weight"].shape[0]
    cfg = model_config_from_neox(settings, vocab_size, tied, has_rotary)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise PolycoderError(f"the tokenizer has {tokenizer.vocab_size} tokens, "
                             f"the checkpoint's embedding only {cfg.vocab_size} rows")
    cfg = cfg.replace(bos_token_id=tokenizer.eod_id, eos_token_id=tokenizer.eod_id)
    if tied:
        state["embed_out.weight"] = state["gpt_neox.embed_in.weight"]
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(state[k].shape)} vs {s}" for k, s in expected.items() if k in state and tuple(state[k].shape) != s]
    if wrong:
        raise PolycoderError(f"checkpoint and --config disagree on shapes: {'; '.join(wrong[:3])}")
    model.load_state_dict(state, strict=True, assign=True)
    src_dtype = str(state["gpt_neox.embed_in.weight"].dtype).removeprefix("torch.")
    save_dtype = src_dtype if dtype == "auto" else dtype
    save_checkpoint(model, tokenizer, out, dtype=save_dtype)
    summary = {
        "out": str(out), "step_dir": str(step_dir), "layers": cfg.n_layer, "hidden": cfg.n_embd, "heads": cfg.n_head,
        "vocab_size": cfg.vocab_size, "tied": tied, "model_parallel_ranks": len(layer_files(step_dir)[0]),
        "parameters": sum(v.numel() for k, v in state.items() if not (tied and k == "embed_out.weight")),
        "dtype": save_dtype, "seconds": round(time.perf_counter() - t0, 2),
    }
    print(
        f"converted {step_dir} -> {out}: {cfg.n_layer} layers x {cfg.n_embd}, {cfg.n_head} heads, vocab {cfg.vocab_size}, "
        f"{summary['parameters'] / 1e6:.1f}M parameters, {summary['model_parallel_ranks']} model-parallel rank(s), "
        f"{save_dtype}, {summary['seconds']} s"
    )
    return summary
