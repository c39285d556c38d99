"""`polycoder train`: pretrain a GPT-NeoX model on token shards, from scratch or onwards.

    polycoder train --preset polycoder-160m --data TOKENS_DIR --out RUN_DIR \
        [--config FILE.yaml] [--set optim.lr=3e-4 ...] [--resume] [--max-steps N]
    torchrun --nproc-per-node 8 -m polycoder train ...      (DDP; --parallel fsdp to shard)

TOKENS_DIR is what `polycoder data tokenize` writes: train/ and valid/ shards and the
tokenizer/ they were made with. A model from scratch takes the preset's architecture and
a vocabulary padded from the shards' (so a preset trains with any tokenizer); `--model
FOLDER` continues from a model's weights instead. Checkpoints land in RUN_DIR/checkpoints/;
`--resume` continues from the latest one (or starts afresh if there is none, so a
pre-emptible job can always pass it), on the learning-rate schedule it was saved with unless
`--reschedule`. A finished run leaves RUN_DIR/final/: the last weights as a model folder
(config.json, weights, tokenizer; no training state), as `finetune` does. An interrupted
one (Ctrl-C, SIGTERM) saves a checkpoint and exits with 128 + the signal (130, 143).
See `polycoder.train.loop` for the step itself and `polycoder.train.settings` for every
setting and the PolyCoder recipe.

Fill-in-the-middle (`polycoder.train.fim_transform`): where the tokenizer of TOKENS_DIR has
the FIM sentinels (every tokenizer `polycoder tokenizer train` makes), half the document
pieces of each window are rearranged by default (`--fim-rate`, `--fim-spm-rate`; data.fim_rate
null means that automatic choice; `--fim-line-rate` cuts a share of the middles at lines); a
left-to-right tokenizer trains left to right as before, and asking it for a rate > 0 is an
error naming `finetune --fim`.

The verb's module: torch and our modules that import it are imported inside the
functions that run the model, so that `polycoder train --help` reads the options without
importing torch (about 2 s); tests/test_structure.py allows this for the verb modules only.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

import yaml

from polycoder.config import PRESETS, ModelConfig, pad_vocab
from polycoder.errors import PolycoderError
from polycoder.options import Alias, TrainDtype, precision_of
from polycoder.tokenizer import Tokenizer
from polycoder.train.settings import TrainSettings, load_settings

PresetName = Literal[tuple(PRESETS)]  # `train --help` lists the presets, and a misspelt one is named at once


def _settings(preset: str | None, config: str | None, overrides: list[str] | None, **cli) -> TrainSettings:
    """Preset recipe < YAML < --set < the explicit command-line options that were given."""
    merged = [o for o in overrides or []]
    for key, value in cli.items():
        if value is not None:
            merged.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return load_settings(preset, config, merged)


def _preset_from_yaml(config: str | None) -> str | None:
    if config is None or not Path(config).is_file():
        return None
    doc = yaml.safe_load(Path(config).read_text()) or {}
    return doc.get("preset") if isinstance(doc, dict) else None


def model_config(preset: str, changes: dict) -> ModelConfig:
    """The preset's architecture with the settings' `model:` changes, or a whole new one."""
    if preset in PRESETS:
        return ModelConfig.from_preset(preset).replace(**changes) if changes else ModelConfig.from_preset(preset)
    need = {"n_layer", "n_embd", "n_head", "intermediate_size"}
    if need <= set(changes):
        try:
            return ModelConfig(**{**changes, "name": preset})
        except TypeError as e:
            raise PolycoderError(f"model settings for {preset!r}: {e}") from None
    return ModelConfig.from_preset(preset)  # raises: unknown preset, naming the known ones


def train(
    data: str,
    out: str,
    preset: PresetName | None = None,
    config: str | None = None,
    model: Annotated[str | None, Alias("--init")] = None,
    resume: bool = False,
    max_steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    micro_batch: int | None = None,
    seq_len: int | None = None,
    dtype: TrainDtype = None,
    parallel: Literal["ddp", "fsdp"] | None = None,
    compile: bool | None = None,
    activation_checkpointing: bool | None = None,
    save_every: int | None = None,
    eval_every: int | None = None,
    threads: int | None = None,
    seed: int | None = None,
    set: list[str] | None = None,
    device: str = "auto",
    reschedule: bool = False,
    fim_rate: float | None = None,
    fim_spm_rate: float | None = None,
    fim_line_rate: float | None = None,
) -> int:
    """Pretrain a GPT-NeoX model on token shards (from scratch, or onwards from --model).

    Args:
        data: Token folder from `polycoder data tokenize` (train/, valid/, tokenizer/).
        out: Run folder: checkpoints/, metrics.jsonl, tensorboard/, loss.png, summary.md.
        preset: Model preset (architecture and training recipe), e.g. polycoder-160m.
        config: YAML settings file with optim:, data:, run: sections (and optionally preset:).
        model: Start from this model's weights instead of a random initialisation (a folder, run folder,
            adapter folder, hub id or polycoder-tiny; --init is its old name).
        resume: Continue from the latest checkpoint in --out (starts afresh if there is none).
        max_steps: Optimizer steps of the whole run (run.max_steps).
        lr: Peak learning rate (optim.lr).
        batch_size: Global batch in windows a step (data.batch_size).
        micro_batch: Windows a forward pass on one process (data.micro_batch).
        seq_len: Tokens a window (data.seq_len; default the model's context).
        dtype: float32, bfloat16 (autocast), float16 (GPU, loss scaling) or auto (fp32/bf16/fp16 and the old
            name --precision are accepted).
        parallel: Under torchrun: ddp or fsdp.
        compile: Compile the model with torch.compile.
        activation_checkpointing: Recompute activations in the backward pass.
        save_every: Checkpoint every N steps (run.save_every).
        eval_every: Validation loss every N steps (run.eval_every).
        threads: CPU threads for torch.
        seed: Seed of the data order and the initialisation (data.seed).
        set: Further settings as section.key=value, e.g. optim.weight_decay=0.1.
        device: cpu, cuda or auto.
        reschedule: With --resume: follow the learning-rate schedule of the current settings (e.g. a larger
            --max-steps stretches the cosine) instead of the one the checkpoint was trained on.
        fim_rate: Share of document pieces rearranged for fill-in-the-middle (data.fim_rate; default 0.5 when the
            tokenizer has the FIM sentinels, else 0).
        fim_spm_rate: Share of the FIM samples in SPM order rather than PSM (data.fim_spm_rate; default 0.5).
        fim_line_rate: Share of the FIM samples whose middle is cut at lines, the middles editors ask for
            (data.fim_line_rate; default 0: two uniform characters, as Bavarian et al.).
    """
    import torch

    from polycoder.checkpoint import build_model, load_model, load_weights, save_checkpoint
    from polycoder.model import GPTNeoX
    from polycoder.train import checkpointing as ckpt
    from polycoder.train.distributed import init_distributed, shutdown
    from polycoder.train.fim_transform import make_fim_transform
    from polycoder.train.loader import open_split
    from polycoder.train.loop import FitResult, Trainer

    preset = preset or _preset_from_yaml(config)
    if preset is None and model is None:
        raise PolycoderError("name a model: --preset NAME (from scratch) or --model FOLDER (continue from its weights)")
    settings = _settings(preset, config, set, **{
        "run.max_steps": max_steps, "optim.lr": lr, "data.batch_size": batch_size, "data.micro_batch": micro_batch,
        "data.seq_len": seq_len, "run.precision": precision_of(dtype), "run.parallel": parallel, "run.compile": compile,
        "run.activation_checkpointing": activation_checkpointing, "run.save_every": save_every,
        "run.eval_every": eval_every, "run.threads": threads, "data.seed": seed, "data.fim_rate": fim_rate,
        "data.fim_spm_rate": fim_spm_rate, "data.fim_line_rate": fim_line_rate})
    if settings.run.threads:
        torch.set_num_threads(settings.run.threads)

    train_arrays, vocab = open_split(data, "train")
    if not train_arrays:
        raise PolycoderError(f"{data}/train holds no token shards; run `polycoder data tokenize` first")
    valid_arrays, _ = open_split(data, "valid")
    tok_dir = Path(data) / "tokenizer"
    tokenizer = Tokenizer.from_pretrained(tok_dir) if tok_dir.is_dir() else None

    d = init_distributed(device)
    try:
        if model is not None:
            net, init_tok = load_model(model, dtype="float32", device="cpu")
            tokenizer = tokenizer or init_tok
            if net.config.vocab_size < vocab:
                raise PolycoderError(f"{model} has {net.config.vocab_size} vocabulary rows but the shards use "
                                     f"{vocab} tokens; tokenize with the model's tokenizer")
        else:
            cfg = model_config(preset, settings.model)
            # the tokenizer decides the vocabulary (its FIM sentinels need rows even where no shard holds one)
            vocab = max(vocab, tokenizer.vocab_size) if tokenizer is not None else vocab
            if cfg.vocab_size != pad_vocab(vocab):
                cfg = cfg.replace(vocab_size=pad_vocab(vocab))
            net = build_model(cfg, torch.float32, "cpu", seed=settings.data.seed)
        if tokenizer is None:
            raise PolycoderError(f"{tok_dir} not found: a checkpoint must carry its tokenizer; tokenize with "
                                 "`polycoder data tokenize`, which copies it there")
        fim = make_fim_transform(tokenizer, settings.data)
        if fim is not None and max(asdict(fim.fim).values()) >= net.config.vocab_size:
            raise PolycoderError(f"{model} has {net.config.vocab_size} vocabulary rows, too few for the FIM tokens of "
                                 f"{tok_dir}; add them with `polycoder finetune --fim`")
        net.requires_grad_(True)
        net = net.to(d.device)
        T = settings.data.seq_len or net.config.block_size
        if T > net.config.block_size:
            raise PolycoderError(f"data.seq_len {T} exceeds the model's context {net.config.block_size}")

        resume_from = ckpt.latest_checkpoint(out) if resume else None
        if resume and resume_from is None and d.is_main:
            print(f"no checkpoint in {out}/checkpoints yet: starting from step 0")
        elif resume_from is None and ckpt.list_checkpoints(out):
            raise PolycoderError(f"{out} already holds checkpoints; pass --resume to continue, or choose a new --out")
        if resume_from is not None:
            load_weights(net, resume_from)
            if d.is_main:
                print(f"resuming from {resume_from}")

        cfg = net.config

        def write_model(m, folder: Path) -> None:
            if isinstance(m, dict):  # a gathered FSDP state dict
                net = GPTNeoX(cfg)
                net.load_state_dict(m, strict=False)
                m = net
            save_checkpoint(m, tokenizer, folder)

        valid_note = (f"{data}/valid holds no token shards" if not valid_arrays else
                      f"no shard of {data}/valid holds a whole window of {T} tokens")
        valid_note += ("; split the corpus with `polycoder data split` so that valid/ gets files (it warns where it "
                       "cannot; --by-file-below N helps languages with few repositories), then tokenize it again")
        trainer = Trainer(net, settings, d, train_arrays, valid_arrays, out, write_model, T,
                          flops_per_token=cfg.flops_per_token(T), description=f"train {cfg.name}",
                          valid_note=valid_note, fim=fim)
        result: FitResult = trainer.fit(resume_from, reschedule)
        if d.is_main and not result.interrupted:
            final = ckpt.export_final(Path(result.checkpoint), Path(out) / "final")
            print(f"trained {cfg.name}: {final}")
    finally:
        shutdown(d)
    if result.interrupted and d.is_main:
        print(f"interrupted at step {result.steps}; saved {result.checkpoint}; continue with --resume", file=sys.stderr)
    return result.exit_status
