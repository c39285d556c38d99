"""`polycoder finetune`: full fine-tuning, LoRA and QLoRA of a GPT-NeoX checkpoint.

    polycoder finetune [--model FOLDER|HUB_ID|RUN_DIR|polycoder-tiny] --data PATH --out RUN_DIR [--lora] [--qlora] [--merge]
        [--fim] [--fim-rate R] [--fim-spm-rate R] [--fim-line-rate R]

Data: a JSONL file of {"text": ...} records, or a folder of code (every file whose name a
PolyCoder language claims, `polycoder.data.languages.language_of`, read as UTF-8, in
sorted path order; for filtering and dedup, run `polycoder data collect` first and
fine-tune on its output texts). Each text is tokenized with the model's tokenizer and
ends with EOD; the texts are packed into one stream and cut into windows (sequential
order, shuffled each epoch: `polycoder.train.loader`). Every 20th document (when there
are 20 or more) is held out for validation.

Fill-in-the-middle (`--fim`): teaches a left-to-right model to infill. The four sentinels
(`polycoder.fim`) are added to its tokenizer (`Tokenizer.with_fim_tokens`: ids after the
last one) and rows for them to its input embedding and output head, initialised to the mean
of the existing tokens' rows, the vocabulary kept padded to a multiple of 64
(`polycoder.checkpoint.grow_vocabulary`); then it trains with the FIM transform
(`polycoder.train.fim_transform`, rate `--fim-rate`, default 0.5 whenever the tokenizer
has the sentinels, SPM share `--fim-spm-rate`, default 0.5, and share of middles cut at lines
`--fim-line-rate`, default 0). With LoRA, the new rows of
both embeddings are trained too, through peft's `trainable_token_indices` (only those rows
are saved in the adapter; `polycoder.lora`).

LoRA (Hu et al., 2021) goes through `peft`, targeting the attention QKV and output
projections and both MLP matrices (`query_key_value`, `dense`, `dense_h_to_4h`,
`dense_4h_to_h`: our module names are transformers' GPTNeoX names; `polycoder.lora`). The
adapter is saved in peft's format with `task_type: CAUSAL_LM` and the base model as
`base_model_name_or_path` (its absolute path, or its hub id), so
`AutoPeftModelForCausalLM.from_pretrained(ADAPTER)` opens it from any directory and gives
the same logits as ours; every verb takes the adapter folder as a model (merged on load).
`--merge` folds the adapter into the weights and writes a plain checkpoint folder.

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
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from polycoder.data.languages import MAX_FILE_BYTES, language_of
from polycoder.errors import PolycoderError
from polycoder.locate import base_reference, resolve
from polycoder.options import TrainDtype, precision_of
from polycoder.train.settings import load_settings

if TYPE_CHECKING:
    import torch


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


# ---- the verb -----------------------------------------------------------------------------


def finetune(
    out: str,
    model: str | None = None,
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
    dtype: TrainDtype = "auto",
    config: str | None = None,
    set: list[str] | None = None,
    resume: bool = False,
    save_every: int = 0,
    eval_every: int = 0,
    threads: int = 0,
    seed: int = 1234,
    device: str = "auto",
    reschedule: bool = False,
    fim: bool = False,
    fim_rate: float | None = None,
    fim_spm_rate: float | None = None,
    fim_line_rate: float | None = None,
) -> int:
    """Fine-tune a checkpoint on code or JSONL texts: full, LoRA (peft) or QLoRA.

    Args:
        out: Run folder (checkpoints/, final/, merged/, metrics.jsonl, summary.md).
        model: Base checkpoint: a folder, a hub id or polycoder-tiny (default: the bundled model).
        data: JSONL file of {"text": ...} records, or a folder of code files.
        lora: Train LoRA adapters instead of all weights.
        qlora: LoRA on a 4-bit (NF4) base; needs a CUDA GPU and bitsandbytes.
        merge: Also write RUN_DIR/merged: the base with the adapter folded in.
        adapter: An existing adapter folder to merge into --model, or into the base it records if no --model
            (with --merge, no --data).
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
        dtype: float32, bfloat16 (autocast), float16 (GPU) or auto (fp32/bf16/fp16 and the old name
            --precision are accepted).
        config: YAML settings file (optim:, data:, run: sections).
        set: Further settings as section.key=value.
        resume: Continue from the latest checkpoint in --out.
        save_every: Checkpoint every N steps (0: only at the end).
        eval_every: Validation loss every N steps (0: only at the end).
        threads: CPU threads for torch (0: default).
        seed: Seed of the data order.
        device: cpu, cuda or auto.
        reschedule: With --resume: follow the learning-rate schedule of the current settings instead of the
            checkpoint's.
        fim: Teach fill-in-the-middle: add the FIM sentinels to the tokenizer and embeddings (mean-initialised
            rows) and train with the FIM transform.
        fim_rate: Share of documents rearranged for fill-in-the-middle (data.fim_rate; default 0.5 when the
            tokenizer has the FIM sentinels, else 0).
        fim_spm_rate: Share of the FIM samples in SPM order rather than PSM (data.fim_spm_rate; default 0.5).
        fim_line_rate: Share of the FIM samples whose middle is cut at lines, the middles editors ask for
            (data.fim_line_rate; default 0: two uniform characters, as Bavarian et al.).
    """
    import torch

    from polycoder.checkpoint import grow_vocabulary, load_model, load_weights, save_checkpoint
    from polycoder.lora import LORA_TARGETS, add_lora, load_adapter_weights, merge_adapter, save_adapter
    from polycoder.train import checkpointing as ckpt
    from polycoder.train.distributed import init_distributed, shutdown
    from polycoder.train.fim_transform import make_fim_transform
    from polycoder.train.loop import Trainer

    targets = targets or list(LORA_TARGETS)
    lora = lora or qlora
    if threads:
        torch.set_num_threads(threads)
    if adapter is not None:
        if not merge:
            raise PolycoderError("--adapter is for merging an existing adapter: add --merge")
        # into --model, or else the base the adapter records (not the bundled default); its
        # tokenizer and any rows it adds (--fim) with it
        net, tokenizer = load_model(adapter, base=model)
        dest = save_checkpoint(net, tokenizer, Path(out) / "merged")
        print(f"merged {adapter} into {model or 'its base'}: {dest}")
        return 0
    if data is None:
        raise PolycoderError("pass --data (a JSONL file or a folder of code) to fine-tune on")

    base_folder = resolve(model)
    net, tokenizer = load_model(model, dtype="float32", device="cpu")
    new_tokens: list[int] = []  # with LoRA, their rows train too (peft's trainable tokens)
    if fim and tokenizer.fim is None:
        old = tokenizer.vocab_size
        tokenizer = tokenizer.with_fim_tokens()
        net = grow_vocabulary(net, old, tokenizer.vocab_size)
        new_tokens = list(range(old, tokenizer.vocab_size))
        print(f"added the FIM tokens as ids {old}-{tokenizer.vocab_size - 1}; embedding rows: {net.config.vocab_size}",
              file=sys.stderr)
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
                 "run.precision": precision_of(dtype), "run.save_every": save_every, "run.eval_every": eval_every,
                 "run.threads": threads}
    if fim_rate is not None:
        overrides["data.fim_rate"] = fim_rate
    if fim_spm_rate is not None:
        overrides["data.fim_spm_rate"] = fim_spm_rate
    if fim_line_rate is not None:
        overrides["data.fim_line_rate"] = fim_line_rate
    # Precedence: YAML < the options above < --set.
    settings = load_settings(None, config, [f"{k}={v}" for k, v in overrides.items()] + list(set or []))
    transform = make_fim_transform(tokenizer, settings.data)

    d = init_distributed(device)
    try:
        if qlora:
            quantize_4bit(net, targets)
        if lora:
            net.requires_grad_(False)
            trainable = add_lora(net, lora_r, lora_alpha, lora_dropout, targets, base_reference(model, base_folder),
                                 trainable_tokens=new_tokens or None)

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
                          out, write_model, seq_len, description=f"finetune ({kind}{', FIM' if transform else ''}) "
                          f"{base_folder.name}", fim=transform)
        result = trainer.fit(resume_from, reschedule)
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
    if result.interrupted and d.is_main:
        print(f"interrupted at step {result.steps}; saved {result.checkpoint}; continue with --resume", file=sys.stderr)
    return result.exit_status  # 130 after Ctrl-C: an interrupted run is not a finished one
