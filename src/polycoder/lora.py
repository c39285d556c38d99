"""LoRA adapters in peft's format: add them to a model, save, read back, and merge.

LoRA (Hu et al., 2021) through `peft` on our GPT-NeoX (its module names are transformers'
GPTNeoX names, so the targets and the saved adapter are the same as for
`GPTNeoXForCausalLM`). An adapter folder holds adapter_config.json (`task_type:
CAUSAL_LM`, the base model as `base_model_name_or_path`: an absolute path or a hub id,
`polycoder.locate.base_reference`), adapter_model.safetensors and the tokenizer files, so
`AutoPeftModelForCausalLM.from_pretrained(ADAPTER)` opens it from any working directory.

`polycoder finetune --lora` writes adapters; `polycoder.checkpoint` loads an adapter
folder given as a model by merging it into its base (`merged`).

Tokens added to the vocabulary (`finetune --lora --fim`'s four sentinels) have rows no base
weight has trained: `trainable_tokens` makes just those rows of the input embedding and of
the (untied) output head trainable, through peft's `trainable_token_indices` (a
TrainableTokens layer: the adapter saves the rows themselves, 4 x hidden values a matrix,
not whole embedding matrices as `modules_to_save` would). The base named in the adapter
stays the original model, whose embeddings are smaller: peft's `AutoPeftModelForCausalLM`
grows them to the adapter folder's tokenizer before loading (its own rule), and
`polycoder.checkpoint` grows them as `finetune --fim` did; the rows the adapter holds
overwrite whatever either put there. peft finds modules by name, and transformers 5 calls
the output head `lm_head` in memory where our model (and every checkpoint file) says
`embed_out`: the adapter is written with transformers' name (`HF_NAMES`), in its config and
its weights, and read back with ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from polycoder.errors import PolycoderError
from polycoder.files import atomic_folder, fsync_tree

LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
"""The attention QKV and output projections and both MLP matrices."""


def _require_peft():
    try:  # deferred: the train extra's package, with a message where it is missing
        import peft
    except ImportError:
        raise PolycoderError("LoRA adapters need the `peft` package: pip install 'polycoder[train]'") from None
    return peft


EMBEDDINGS = ["embed_in", "embed_out"]
"""The input embedding and the output head: where new tokens need rows."""
HF_NAMES = {"embed_out": "lm_head"}
"""Our module names that transformers 5's GPTNeoXForCausalLM holds under another name."""
_OURS = {v: k for k, v in HF_NAMES.items()}


def _renamed(name: str, names: dict[str, str]) -> str:
    """`name` (a module name or a weight key) with each dotted part renamed by `names`."""
    return ".".join(names.get(part, part) for part in name.split("."))


def add_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float, targets: list[str], base: str | None,
             trainable_tokens: list[int] | dict[str, list[int]] | None = None):
    """Wrap `model` with trainable LoRA adapters (peft); only the adapters require grad.

    `base` is what adapter_config.json will name as the base model (a reference that
    resolves from anywhere: `polycoder.locate.base_reference`). `trainable_tokens`: token
    ids whose rows of both embeddings train too (or peft's {module: ids} form)."""
    peft = _require_peft()
    if isinstance(trainable_tokens, list):
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        trainable_tokens = {name: list(trainable_tokens) for name in (EMBEDDINGS[:1] if tied else EMBEDDINGS)}
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                             trainable_token_indices=trainable_tokens or None)
    pm = peft.get_peft_model(model, config)
    c = pm.peft_config["default"]
    # Written into adapter_config.json: transformers users get PeftModelForCausalLM and find
    # the base; the auto_mapping peft fills in for non-transformers models would point them
    # at polycoder.model instead.
    c.task_type = "CAUSAL_LM"
    c.base_model_name_or_path = base
    c.auto_mapping = None
    return pm


def save_adapter(pm, tokenizer, folder: str | Path) -> Path:
    """Write the adapter folder (peft's files and the tokenizer) atomically."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        # Whole embedding matrices are never saved: new tokens' rows are TrainableTokens (above).
        pm.save_pretrained(str(tmp), save_embedding_layers=False)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["auto_mapping"] = None
        if cfg.get("trainable_token_indices"):  # in transformers' names (see above), weights and config alike
            cfg["trainable_token_indices"] = {_renamed(k, HF_NAMES): v for k, v in cfg["trainable_token_indices"].items()}
            weights = tmp / "adapter_model.safetensors"
            save_file({_renamed(k, HF_NAMES): v for k, v in load_file(str(weights)).items()}, str(weights),
                      metadata={"format": "pt"})
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        fsync_tree(tmp)
    return folder


def load_adapter_weights(pm, folder: str | Path) -> None:
    peft = _require_peft()
    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise PolycoderError(f"{folder} holds no adapter_model.safetensors; is it a LoRA checkpoint?")
    result = peft.set_peft_model_state_dict(pm, {_renamed(k, _OURS): v for k, v in load_file(str(path)).items()})
    if getattr(result, "unexpected_keys", None):
        raise PolycoderError(f"{path}: adapter weights do not fit this model ({result.unexpected_keys[:3]})")


def load_adapter(model: torch.nn.Module, folder: str | Path, base: str | None = None):
    """`model` wrapped with the adapter saved in `folder` (rank, scale, targets from its config)."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise PolycoderError(f"{folder} holds no adapter_config.json; pass a LoRA adapter folder")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise PolycoderError(f"{folder}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters are supported")
    targets = cfg["target_modules"]
    pm = add_lora(model, cfg["r"], cfg["lora_alpha"], 0.0, sorted(targets) if isinstance(targets, list) else targets,
                  base or cfg.get("base_model_name_or_path"),
                  {_renamed(k, _OURS): v for k, v in (cfg.get("trainable_token_indices") or {}).items()} or None)
    load_adapter_weights(pm, folder)
    return pm


def merge_adapter(pm):
    """The base model with the adapter folded into its weights (W + B A * alpha / r)."""
    return pm.merge_and_unload()


def merged(model: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """`model` with the adapter in `folder` folded into its weights (in place)."""
    return merge_adapter(load_adapter(model, folder))
