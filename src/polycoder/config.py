"""Model configuration: named presets and the Hugging Face `config.json` in both forms.

A `ModelConfig` holds the architecture of a GPT-NeoX decoder. Derived sizes (head size,
rotary dimensions, padded vocabulary) are properties computed here and nowhere else.

`config.json` is met in two forms in practice, and both are read:
- transformers 4.x (the released PolyCoder folders, transformers 4.23): `rotary_pct`,
  `rotary_emb_base`;
- transformers 5: `rope_parameters = {"rope_type", "rope_theta", "partial_rotary_factor"}`.
We write both sets of keys, so either generation of transformers reads our folders.

References: GPT-NeoX (Black et al., 2022); PolyCoder's configs (Xu et al., 2022;
VHellendoorn/Code-LMs, the `config_*.json` of the Hugging Face releases).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from polycoder.errors import PolycoderError

# GPT-NeoX pads the vocabulary to a multiple of 128 (make_vocab_size_divisible_by) so the
# embedding splits evenly across tensor-parallel ranks: 50257 -> 50304.
VOCAB_MULTIPLE = 128

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu")


def pad_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The smallest multiple of `multiple` that holds `n` tokens."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a GPT-NeoX decoder-only transformer."""

    n_layer: int
    """Number of transformer blocks (`num_hidden_layers`)."""
    n_embd: int
    """Width of the residual stream (`hidden_size`)."""
    n_head: int
    """Attention heads; `n_embd` must divide evenly by it."""
    intermediate_size: int
    """Width of the MLP's hidden layer (4 x n_embd in PolyCoder)."""
    vocab_size: int = 50304
    """Rows of the embedding and output head, padded (the tokenizer has fewer real tokens)."""
    block_size: int = 2048
    """Longest sequence the model was trained on (`max_position_embeddings`)."""
    rotary_pct: float = 1.0
    """Fraction of each head's dimensions that get rotary embeddings (1.0 in PolyCoder)."""
    rope_base: float = 10000.0
    """Rotary base frequency (`rotary_emb_base` / `rope_theta`)."""
    parallel_residual: bool = False
    """False: x + attn(ln1(x)), then + mlp(ln2(.)) (PolyCoder). True: x + attn(ln1 x) + mlp(ln2 x)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output head (PolyCoder: untied)."""
    hidden_act: str = "gelu"
    """MLP activation; "gelu" is the exact (erf) GELU as in transformers."""
    attention_bias: bool = True
    """Biases on the QKV and attention output projections."""
    bos_token_id: int = 0
    """Id of `<|endoftext|>`, which also starts each document."""
    eos_token_id: int = 0
    """Id that ends a document (the same `<|endoftext|>` in PolyCoder)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation."""
    name: str = "custom"
    """Preset name, or "custom"."""

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_embd", "n_head", "intermediate_size", "vocab_size", "block_size"):
            if getattr(self, f) <= 0:
                raise PolycoderError(f"model config: {f} must be positive, got {getattr(self, f)}")
        if self.n_embd % self.n_head:
            raise PolycoderError(f"model config: hidden size {self.n_embd} is not divisible by {self.n_head} heads")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise PolycoderError(f"model config: rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise PolycoderError(f"model config: rotary dims ({self.rotary_dims}) must be even; adjust rotary_pct")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise PolycoderError(
                f"model config: hidden_act {self.hidden_act!r} is not supported; use one of {', '.join(SUPPORTED_ACTIVATIONS)}"
            )

    # ---- derived sizes (the one place they are computed) -------------------------------

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rotary_dims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    def num_parameters(self, include_embedding: bool = True) -> int:
        C, F, V = self.n_embd, self.intermediate_size, self.vocab_size
        b = 1 if self.attention_bias else 0
        per_layer = (
            4 * C  # two LayerNorms
            + 3 * C * C + 3 * C * b  # query_key_value
            + C * C + C * b  # attention.dense
            + 2 * C * F + F + C  # MLP
        )
        n = self.n_layer * per_layer + 2 * C  # final LayerNorm
        if include_embedding:
            n += V * C
        if not self.tie_word_embeddings:
            n += V * C
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward+backward FLOPs per token (6N plus attention), as in PaLM's MFU."""
        T = seq_len or self.block_size
        # The input embedding is a lookup (no FLOPs); the output head is a matrix product,
        # and num_parameters(include_embedding=False) already counts it when untied.
        n = self.num_parameters(include_embedding=False) + (self.vocab_size * self.n_embd if self.tie_word_embeddings else 0)
        return 6 * n + 12 * self.n_layer * self.n_embd * T

    # ---- presets ------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise PolycoderError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return PRESETS[name]

    # ---- Hugging Face config.json -------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "custom") -> ModelConfig:
        """Read a transformers `GPTNeoXConfig` dict, in transformers 4.x or 5 form."""
        model_type = d.get("model_type")
        if model_type != "gpt_neox":
            raise PolycoderError(
                f"config.json: model_type is {model_type!r}, but polycoder runs GPT-NeoX models (model_type 'gpt_neox')"
            )
        rope = d.get("rope_parameters") or {}
        if d.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            raise PolycoderError(
                "config.json: rope_scaling / rope_parameters.rope_type other than 'default' is not supported "
                f"(got {d.get('rope_scaling') or rope.get('rope_type')}); remove it or use plain rotary embeddings"
            )
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise PolycoderError(f"config.json lacks required field(s) {', '.join(missing)}")
        eos = d.get("eos_token_id", 0)
        return cls(
            n_layer=d["num_hidden_layers"],
            n_embd=d["hidden_size"],
            n_head=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            block_size=d.get("max_position_embeddings", 2048),
            rotary_pct=rope.get("partial_rotary_factor", d.get("rotary_pct", 0.25)),
            rope_base=float(rope.get("rope_theta", d.get("rotary_emb_base", 10000))),
            # transformers' default is True when the key is absent.
            parallel_residual=d.get("use_parallel_residual", True),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            hidden_act=d.get("hidden_act", "gelu"),
            attention_bias=d.get("attention_bias", True),
            bos_token_id=d.get("bos_token_id", 0) if d.get("bos_token_id") is not None else 0,
            eos_token_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 0,
            initializer_range=d.get("initializer_range", 0.02),
            name=name,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PolycoderError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise PolycoderError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d, name=d.get("polycoder_preset", "custom"))

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A `config.json` that transformers 4.x and 5 both read as this architecture."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "hidden_size": self.n_embd,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.block_size,
            # transformers 4.x keys ...
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rope_base,
            # ... and transformers 5's.
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_base, "partial_rotary_factor": self.rotary_pct},
            "use_parallel_residual": self.parallel_residual,
            "layer_norm_eps": self.layer_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.initializer_range,
            "use_cache": True,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
            "polycoder_preset": self.name,
        }

    def replace(self, **changes: Any) -> ModelConfig:
        names = {f.name for f in fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise PolycoderError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # PolyCoder, Xu et al. 2022, Table 3; numbers from the released config_160M.json.
    "polycoder-160m": ModelConfig(
        n_layer=12, n_embd=768, n_head=12, intermediate_size=3072, name="polycoder-160m"
    ),
    # PolyCoder 0.4B: released config_0-4B.json.
    "polycoder-0.4b": ModelConfig(
        n_layer=24, n_embd=1024, n_head=16, intermediate_size=4096, name="polycoder-0.4b"
    ),
    # PolyCoder 2.7B: released config_2-7B.json.
    "polycoder-2.7b": ModelConfig(
        n_layer=32, n_embd=2560, n_head=32, intermediate_size=10240, name="polycoder-2.7b"
    ),
    # The bundled default model (scripts/train_bundled.sh, configs/polycoder-tiny.yaml):
    # PolyCoder's layout scaled to what 2 CPU cores train in about half an hour and to the
    # repository's 30 MB limit, with an 8192-token code BPE trained on our corpus and the four
    # fill-in-the-middle sentinels appended (ids 8192-8195), padded to 8256 rows (phase 5).
    "polycoder-tiny": ModelConfig(
        n_layer=6, n_embd=256, n_head=8, intermediate_size=1024, block_size=512, vocab_size=8256,
        name="polycoder-tiny",
    ),
    # Tests: PolyCoder's vocabulary and layout, tiny widths, so tests run in milliseconds.
    "test-tiny": ModelConfig(
        n_layer=2, n_embd=64, n_head=4, intermediate_size=256, block_size=256, name="test-tiny"
    ),
    # Tests of the other architecture options (parallel residual, partial rotary, Pythia-like).
    "test-tiny-parallel": ModelConfig(
        n_layer=2, n_embd=64, n_head=4, intermediate_size=256, block_size=256,
        rotary_pct=0.25, parallel_residual=True, name="test-tiny-parallel",
    ),
}
