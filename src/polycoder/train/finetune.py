"""`polycoder finetune`: full fine-tuning, LoRA and QLoRA of a GPT-NeoX checkpoint.

    polycoder finetune --model FOLDER|HUB_ID --data PATH --out RUN_DIR [--lora] [--qlora] [--merge]

Data: a JSONL file of {"text": ...} records, or a folder of code (every file whose name a
PolyCoder language claims, `polycoder.data.languages.language_of`, read as UTF-8, in
sorted path order; for filtering and dedup, run `polycoder data collect` first and
fine-tune on its output texts). Each text is tokenized with the model's tokenizer and
ends with EOD; the texts are packed into one stream and cut into windows (sequential
order, shuffled each epoch: `polycoder.train.loader`). Every 20th document (when there
are 20 or more) is held out for validation.

LoRA (Hu et al., 2021) goes through `peft`, targeting the attention QKV and output
projections and both MLP matrices (`query_key_value`, `dense`, `dense_h_to_4h`,
`dense_4h_to_h`: our module names are transformers' GPTNeoX names). The adapter is saved
in peft's format with `task_type: CAUSAL_LM` and the base folder as
`base_model_name_or_path`, so `PeftModel.from_pretrained(GPTNeoXForCausalLM...,
ADAPTER)` in transformers gives the same logits as ours. `--merge` folds the adapter into
the weights and writes a plain checkpoint folder.

QLoRA (Dettmers et al., 2023) quantizes the targeted Linear layers of the base to 4-bit
NF4 with bitsandbytes and trains LoRA on top; it needs a CUDA GPU and bitsandbytes, and
stops with a clear message otherwise. Limit: the QLoRA path has not been run on a GPU by
this project yet.

Outputs: RUN_DIR/checkpoints/step_N/ (adapter or full model + training_state/),
RUN_DIR/final/ (the adapter, or the full model), RUN_DIR/merged/ with --merge, metrics and
summary as for `polycoder train`.

The verb's module: torch and our modules that import it are imported inside the
functions that run the model, so that `polycoder finetune --help` reads the options without
importing torch (about 2 s); tests/test_structure.py allows this for the verb modules only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from polycoder.data.languages import MAX_FILE_BYTES, language_of
from polycoder.errors import PolycoderError
from polycoder.files import write_text
from polycoder.locate import resolve
from polycoder.train.settings import load_settings

if TYPE_CHECKING:
    import torch

LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


# ---- data ---------------------------------------------------------------------------------


def read_texts(path: str | Path) -> list[str]:
    """The texts of a JSONL file ({"text": ...} a line) or of the code files in a folder."""
    path = Path(path)
    if path.is_file():
        texts = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PolycoderError(f"{path}:{i}: not valid JSON ({e}); expected one {{\"text\": ...}} a line") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise PolycoderError(f"{path}:{i}: expected an object with a string field \"text\"")
                texts.append(rec["text"])
        return texts
    if path.is_dir():
        texts = []
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            if language_of(p.name) is None or p.stat().st_size > MAX_FILE_BYTES:
                continue
            try:
                texts.append(p.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                continue
        return texts
    raise PolycoderError(f"fine-tuning data {path} not found; pass a JSONL file of {{\"text\": ...}} or a folder of code")


def pack(docs: list[list[int]], vocab_size: int) -> np.ndarray:
    """Documents, each followed by EOD (0), as one token array."""
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    if not docs:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(d + [0], dtype=dtype) for d in docs])


def token_streams(texts: list[str], tokenizer, holdout_every: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token arrays; every `holdout_every`-th text is held out."""
    ids = tokenizer.encode_batch(texts)
    valid = [d for i, d in enumerate(ids) if len(ids) >= holdout_every and i % holdout_every == holdout_every - 1]
    train = [d for i, d in enumerate(ids) if not (len(ids) >= holdout_every and i % holdout_every == holdout_every - 1)]
    return pack(train, tokenizer.vocab_size), pack(valid, tokenizer.vocab_size)


# ---- LoRA / QLoRA -------------------------------------------------------------------------


def _require_peft():
    try:  # deferred: the train extra's package, with a message where it is missing
        import peft
    except ImportError:
        raise PolycoderError("LoRA needs the `peft` package: pip install 'polycoder[train]'") from None
    return peft


def add_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float, targets: list[str], base: str | None):
    """Wrap `model` with trainable LoRA adapters (peft); only the adapters require grad."""
    peft = _require_peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
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
    folder = Path(folder)
    pm.save_pretrained(str(folder), save_embedding_layers=False)  # we never resize embeddings
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_mapping"] = None
    write_text(cfg_path, json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def load_adapter_weights(pm, folder: str | Path) -> None:
    from safetensors.torch import load_file

    peft = _require_peft()
    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise PolycoderError(f"{folder} holds no adapter_model.safetensors; is it a LoRA checkpoint?")
    result = peft.set_peft_model_state_dict(pm, load_file(str(path)))
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
                  base or cfg.get("base_model_name_or_path"))
    load_adapter_weights(pm, folder)
    return pm


def quantize_4bit(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    """Replace the targeted Linear layers by bitsandbytes NF4 layers (QLoRA's frozen base)."""
    import torch

    if not torch.cuda.is_available():
        raise PolycoderError("QLoRA needs a CUDA GPU (bitsandbytes' 4-bit kernels); on this machine use --lora "
                             "(full-precision base) instead")
    try:  # deferred: optional, CUDA only
        import bitsandbytes as bnb
    except ImportError:
        raise PolycoderError("QLoRA needs bitsandbytes: pip install bitsandbytes (with a CUDA GPU)") from None
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if module.bias is not None:
                q.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.cuda())
    return model


def merge_adapter(pm):
    """The base model with the adapter folded into its weights (W + B A * alpha / r)."""
    return pm.merge_and_unload()


# ---- the verb -----------------------------------------------------------------------------


def finetune(
    model: str,
    out: str,
    data: str | None = None,
    lora: bool = False,
    qlora: bool = False,
    merge: bool = False,
    adapter: str | None = None,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    targets: list[str] | None = None,
    epochs: float = 1.0,
    max_steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 8,
    micro_batch: int = 0,
    seq_len: int = 512,
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    config: str | None = None,
    set: list[str] | None = None,
    resume: bool = False,
    save_every: int = 0,
    eval_every: int = 0,
    threads: int = 0,
    seed: int = 1234,
    device: str = "auto",
) -> int:
    """Fine-tune a checkpoint on code or JSONL texts: full, LoRA (peft) or QLoRA.

    Args:
        model: Base checkpoint: a folder or a hub id.
        out: Run folder (checkpoints/, final/, merged/, metrics.jsonl, summary.md).
        data: JSONL file of {"text": ...} records, or a folder of code files.
        lora: Train LoRA adapters instead of all weights.
        qlora: LoRA on a 4-bit (NF4) base; needs a CUDA GPU and bitsandbytes.
        merge: Also write RUN_DIR/merged: the base with the adapter folded in.
        adapter: An existing adapter folder to merge into --model (with --merge, no --data).
        lora_r: LoRA rank.
        lora_alpha: LoRA scale numerator (the update is B A * alpha / r).
        lora_dropout: Dropout on the LoRA input.
        targets: Module names that get adapters.
        epochs: Passes over the data (sets the number of steps unless --max-steps).
        max_steps: Optimizer steps (overrides --epochs).
        lr: Peak learning rate (default 2e-4 with LoRA, 2e-5 for full fine-tuning).
        batch_size: Windows a step (all processes).
        micro_batch: Windows a forward pass on one process (0: no accumulation).
        seq_len: Tokens a window.
        precision: fp32, bf16, fp16 (GPU) or auto.
        config: YAML settings file (optim:, data:, run: sections).
        set: Further settings as section.key=value.
        resume: Continue from the latest checkpoint in --out.
        save_every: Checkpoint every N steps (0: only at the end).
        eval_every: Validation loss every N steps (0: only at the end).
        threads: CPU threads for torch (0: default).
        seed: Seed of the data order.
        device: cpu, cuda or auto.
    """
    import torch

    from polycoder.checkpoint import load_model, load_weights, save_checkpoint
    from polycoder.train import checkpointing as ckpt
    from polycoder.train.distributed import init_distributed, shutdown
    from polycoder.train.loop import Trainer

    targets = targets or list(LORA_TARGETS)
    lora = lora or qlora
    if threads:
        torch.set_num_threads(threads)
    if adapter is not None:
        if not merge:
            raise PolycoderError("--adapter is for merging an existing adapter: add --merge")
        base, tokenizer = load_model(model)
        pm = load_adapter(base, adapter, str(resolve(model)))
        dest = save_checkpoint(merge_adapter(pm), tokenizer, Path(out) / "merged")
        print(f"merged {adapter} into {model}: {dest}")
        return 0
    if data is None:
        raise PolycoderError("pass --data (a JSONL file or a folder of code) to fine-tune on")

    base_folder = resolve(model)
    net, tokenizer = load_model(model, dtype="float32", device="cpu")
    texts = read_texts(data)
    if not texts:
        raise PolycoderError(f"no texts found in {data}")
    train_arr, valid_arr = token_streams(texts, tokenizer)
    seq_len = min(seq_len, net.config.block_size)
    n_windows = max(1, (len(train_arr) - 1) // seq_len)
    steps = max_steps or max(1, math.ceil(epochs * n_windows / batch_size))
    overrides = {"optim.lr": lr or (2e-4 if lora else 2e-5), "optim.warmup": 0.03, "optim.min_lr_ratio": 0.0,
                 "data.seq_len": seq_len, "data.batch_size": batch_size, "data.micro_batch": micro_batch,
                 "data.sampling": "sequential", "data.seed": seed, "run.max_steps": steps,
                 "run.precision": precision, "run.save_every": save_every, "run.eval_every": eval_every,
                 "run.threads": threads}
    # Precedence: YAML < the options above < --set.
    settings = load_settings(None, config, [f"{k}={v}" for k, v in overrides.items()] + list(set or []))

    d = init_distributed(device)
    try:
        if qlora:
            quantize_4bit(net, targets)
        if lora:
            net.requires_grad_(False)
            trainable = add_lora(net, lora_r, lora_alpha, lora_dropout, targets, str(base_folder))

            def write_model(m, folder: Path) -> None:
                save_adapter(trainable, tokenizer, folder)
        else:
            net.requires_grad_(True)
            trainable = net

            def write_model(m, folder: Path) -> None:
                save_checkpoint(net, tokenizer, folder)
        trainable = trainable.to(d.device)

        resume_from = ckpt.latest_checkpoint(out) if resume else None
        if resume_from is None and ckpt.list_checkpoints(out):
            raise PolycoderError(f"{out} already holds checkpoints; pass --resume to continue, or choose a new --out")
        if resume_from is not None:
            if lora:
                load_adapter_weights(trainable, resume_from)
            else:
                load_weights(net, resume_from)
        kind = "QLoRA" if qlora else "LoRA" if lora else "full"
        trainer = Trainer(trainable, settings, d, [train_arr], [valid_arr] if len(valid_arr) > seq_len else [],
                          out, write_model, seq_len, description=f"finetune ({kind}) {base_folder.name}")
        result = trainer.fit(resume_from)
        if d.is_main and not result.interrupted:
            final = Path(out) / "final"
            if lora:
                save_adapter(trainable, tokenizer, final)
                if merge:
                    merged = merge_adapter(trainable)
                    save_checkpoint(merged, tokenizer, Path(out) / "merged")
            else:
                save_checkpoint(net, tokenizer, final)
            print(f"fine-tuned ({kind}): {final}" + (f"; merged: {Path(out) / 'merged'}" if lora and merge else ""))
    finally:
        shutdown(d)
    return 0
