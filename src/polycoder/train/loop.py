"""The training loop shared by pretraining and fine-tuning.

One optimizer step: for each accumulation step, take this rank's rows of the step's batch
(`loader.WindowLoader`, rearranged for fill-in-the-middle where asked:
`fim_transform`), run the model under autocast, add its loss (`loss`: cross-entropy,
divided by the accumulation steps, or with ignored FIM padding weighted by each micro-batch's
share of the counted targets) to the gradients (DDP or FSDP averages them over ranks on the last accumulation step), unscale
(fp16), clip the global norm, set the learning rate of the step (cosine with linear
warm-up, a pure function of the step), and take an AdamW step.

Speed (benchmarks/train_throughput.py): the Trainer gives our GPTNeoX the backend's training
operations (`polycoder.backend.Backend.train_ops`: the output head fused into the
cross-entropy, and on the CPU oneDNN fp32 products and the native kernels where they
apply), and on the CPU makes glibc keep freed memory (`keep_freed_memory`) so that the
large tensors of a step are not page-faulted afresh.

Determinism: with the same settings, threads and hardware, the loss of every step is a
function of (settings, step) only: the batch depends on (seed, step), the schedule on the
step, and a checkpoint holds the exact fp32 weights, optimizer moments and RNG states. So a
run resumed from a checkpoint repeats the uninterrupted run's losses (tested to 1e-6 on the
CPU in fp32).

Signals: SIGINT or SIGTERM (the usual pre-emption notice) sets a flag; after the current
step every rank agrees to stop, a checkpoint is saved, and `fit` returns with
`interrupted=True` and the signal, whose `exit_status` (128 + the signal: 130 for Ctrl-C,
143 for SIGTERM) the verbs return, as interrupted programs do, so that a script or a
scheduler can tell a finished run from one to resume. A second signal exits at once.

Resuming keeps the learning-rate schedule saved in the checkpoint unless asked
(`polycoder.train.schedule`).

Reference for the loss-curve / MFU bookkeeping: nanoGPT's train.py; PaLM's MFU
(6N + 12 L H T FLOPs per token, `ModelConfig.flops_per_token`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from polycoder.backend import Backend, choose
from polycoder.errors import PolycoderError
from polycoder.files import write_text
from polycoder.model import GPTNeoX
from polycoder.train import checkpointing as ckpt
from polycoder.train.distributed import Dist, wrap_model
from polycoder.train.fim_transform import FimTransform
from polycoder.train.loader import LoaderState, WindowLoader, eval_windows, gather_windows
from polycoder.train.loss import model_loss, share_weights, takes_targets
from polycoder.train.metrics import MetricsLogger, plot_loss_curve
from polycoder.train.schedule import CosineSchedule, resumed_schedule
from polycoder.train.settings import TrainSettings


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    A training step allocates and frees the same large tensors every step. By default glibc
    serves each block over its mmap threshold (at most 32 MB) with fresh pages and unmaps it
    when freed, so every step pays a page fault and a zeroing for each 4 KB of activations
    and gradients: a PolyCoder-160M step measured about a fifth faster with the memory kept
    (docs/benchmarks/README.md). It is what PyTorch's CPU tuning guide gets by swapping in
    jemalloc or tcmalloc. Process-wide and one-way: freed memory stays with the process
    (its resident size stays at the peak of a step). Returns whether it applied (glibc only).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise PolycoderError("fp16 training needs a CUDA GPU (loss scaling); on the CPU use --dtype bf16 or fp32")
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model: nn.Module, settings: TrainSettings, device: torch.device, fsdp: bool) -> torch.optim.Optimizer:
    """AdamW; decay on matrices only (not biases, LayerNorms, the input embedding)."""
    o = settings.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed_in" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    # The fused kernel updates all parameters in one pass; DTensors (FSDP) use foreach.
    if o.fused and not fsdp:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, **kwargs)


@dataclass
class FitResult:
    """What a training run did, for the summary files and the caller."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    checkpoint: str | None
    interrupted: bool
    resumed_from: str | None
    signal: int | None = None
    """The signal that stopped the run (None: finished, or stopped because another rank was signalled)."""
    losses: list[float] = field(default_factory=list, repr=False)
    """Training loss of each step run by this call."""

    @property
    def exit_status(self) -> int:
        """0 for a finished run; 128 + the signal for an interrupted one (SIGINT where unknown)."""
        return 128 + (self.signal or signal.SIGINT) if self.interrupted else 0


class _StopFlag:
    """Set by SIGINT/SIGTERM; a second signal falls through to the default action."""

    def __init__(self):
        self.set = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.set:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.set = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Runs `settings.run.max_steps` optimizer steps of `model` over token arrays."""

    def __init__(
        self,
        model: nn.Module,
        settings: TrainSettings,
        dist: Dist,
        train_arrays: Sequence[np.ndarray],
        valid_arrays: Sequence[np.ndarray],
        run_dir: str | Path,
        write_model: Callable[[nn.Module, Path], None],
        seq_len: int,
        flops_per_token: float | None = None,
        description: str = "train",
        backend: Backend | None = None,
        valid_note: str = "no validation tokens were given",
        fim: FimTransform | None = None,
    ):
        self.raw = model
        self.s = settings
        self.d = dist
        self.run_dir = Path(run_dir)
        self.write_model = write_model
        self.seq_len = seq_len
        self.flops_per_token = flops_per_token
        self.description = description
        self.valid_note = valid_note  # why there is no validation data, and what to do, when there is none
        self.precision = resolve_precision(settings.run.precision, dist.device)
        if dist.device.type == "cpu":
            keep_freed_memory()
        self.grad_accum = settings.data.grad_accum(dist.world_size)
        self.micro = settings.data.micro(dist.world_size)
        self.loader = WindowLoader(train_arrays, seq_len, settings.data.batch_size,
                                   settings.data.sampling, settings.data.seed, transform=fim)
        n_eval = settings.run.eval_batches * self.micro * dist.world_size
        self.valid_arrays = list(valid_arrays)
        self.eval_starts = eval_windows(self.valid_arrays, seq_len, n_eval) if self.valid_arrays else []
        # Every rank must run the same number of forward passes (FSDP): trim to a multiple.
        self.eval_starts = self.eval_starts[: len(self.eval_starts) // dist.world_size * dist.world_size]
        nets = [m for m in model.modules() if isinstance(m, GPTNeoX)]  # also inside a peft wrapper
        self.backend = backend or choose(dist.device)
        for m in nets:
            m.ops = self.backend.train_ops()
        if settings.run.activation_checkpointing:
            if not nets:
                raise PolycoderError("activation checkpointing needs polycoder's GPTNeoX model")
            for m in nets:
                m.gradient_checkpointing = True
        self.fsdp = dist.enabled and settings.run.parallel == "fsdp"
        self.model = wrap_model(model, dist, settings.run.parallel)
        self.step_model = torch.compile(self.model) if settings.run.compile else self.model
        self.optimizer = make_optimizer(self.model, settings, dist.device, self.fsdp)
        self.schedule = CosineSchedule(settings.optim.lr, settings.run.max_steps, settings.optim.warmup,
                                       settings.optim.min_lr_ratio)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.fused_loss = takes_targets(model)
        self.step = 0
        self.tokens = 0

    # ---- state ------------------------------------------------------------------------

    def _full_state_options(self):
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) weights of the model on the CPU (collective under FSDP)."""
        return get_model_state_dict(self.raw, options=self._full_state_options())

    def save(self) -> Path:
        # DDP / one process: the full optimizer state, keyed by parameter name. FSDP: each
        # rank keeps its own shard (resuming then needs the same number of processes).
        optim = None if self.fsdp else get_optimizer_state_dict(self.raw, self.optimizer,
                                                                  options=self._full_state_options())
        write = None
        if self.fsdp:
            full = self.model_state()  # every rank takes part in the gather
            if self.d.is_main:
                write = lambda folder: self.write_model(full, folder)  # noqa: E731
        elif self.d.is_main:
            write = lambda folder: self.write_model(self.raw, folder)  # noqa: E731
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "loader": asdict(self.loader.state),
            "world_size": self.d.world_size,
            "precision": self.precision,
            "settings": self.s.to_dict(),
        }
        payload = {"optimizer": optim, "scheduler": self.schedule.state_dict(),
                   "scaler": self.scaler.state_dict() if self.scaler else None} if self.d.is_main else None
        return ckpt.save_training_checkpoint(self.run_dir, self.step, write, payload, state,
                                             self.s.run.keep_last, self.d.rank, self.d.barrier,
                                             rank_state=self.optimizer.state_dict() if self.fsdp else None)

    def load_state(self, folder: Path, reschedule: bool = False) -> None:
        """Optimizer, learning-rate schedule, RNG and data position from a checkpoint (weights
        are loaded by the caller, who knows whether they are a full model or an adapter).
        The saved schedule is kept unless `reschedule` (see `polycoder.train.schedule`)."""
        state, payload, rng = ckpt.read_training_state(folder, self.d.rank)
        saved = LoaderState(**state["loader"])
        now = self.loader.state
        if saved != now:
            diffs = {k: (getattr(saved, k), getattr(now, k)) for k in asdict(now) if getattr(saved, k) != getattr(now, k)}
            raise PolycoderError(
                f"cannot resume from {folder}: the data or batch settings changed since it was saved "
                f"(saved, now: {diffs}); resume with the same data and settings, or start a new --out")
        if self.fsdp:
            if state["world_size"] != self.d.world_size:
                raise PolycoderError(f"{folder} was written by {state['world_size']} FSDP processes; "
                                     f"resume it with the same number (now {self.d.world_size})")
            self.optimizer.load_state_dict(payload["optimizer"])
        else:
            set_optimizer_state_dict(self.raw, self.optimizer, payload["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        if self.scaler and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.step, self.tokens = state["step"], state["tokens"]
        if payload.get("scheduler"):
            self.schedule, note = resumed_schedule(payload["scheduler"], self.schedule, self.step, reschedule)
            if note and self.d.is_main:
                print(note, file=sys.stderr)

    # ---- the loop ---------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step; returns the mean loss over the global batch."""
        model = self.step_model
        model.train()
        lr = self.schedule.lr(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        total = 0.0
        batches = [self.loader.micro_batch(self.step, self.d.rank, self.d.world_size, self.micro, m)
                   for m in range(self.grad_accum)]
        weights = self._loss_weights([y for _, y in batches])
        for m, (x, y) in enumerate(batches):
            x, y = x.to(self.d.device, non_blocking=True), y.to(self.d.device, non_blocking=True)
            last = m == self.grad_accum - 1
            with self._sync(last):  # around forward and backward, as DDP's no_sync requires
                with autocast(self.precision, self.d.device):
                    loss = model_loss(model, x, y, self.fused_loss)
                    loss = loss / self.grad_accum if weights is None else loss * weights[m]
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.s.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.optim.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.s.data.batch_size * self.seq_len
        return self.d.mean(total)

    def _loss_weights(self, targets: list[torch.Tensor]) -> list[float] | None:
        if self.loader.transform is None:
            return None  # every micro-batch counts all its targets: 1 / grad_accum each
        return share_weights(targets, self.d)

    def _sync(self, last: bool):
        """Skip the gradient all-reduce on all but the last accumulation step."""
        if not self.d.enabled or last:
            return contextlib.nullcontext()
        if self.fsdp:
            self.model.set_requires_gradient_sync(False)
            return _ResetSync(self.model)
        return self.model.no_sync()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float] | None:
        """Mean validation loss and perplexity over the fixed validation windows."""
        if not self.eval_starts:
            return None
        self.step_model.eval()
        mine = self.eval_starts[self.d.rank::self.d.world_size]
        total, count = 0.0, 0
        for i in range(0, len(mine), self.micro):
            x, y = gather_windows(self.valid_arrays, mine[i:i + self.micro], self.seq_len)
            x, y = x.to(self.d.device), y.to(self.d.device)
            with autocast(self.precision, self.d.device):
                loss = model_loss(self.step_model, x, y, self.fused_loss)
            total += loss.item() * len(x)
            count += len(x)
        self.step_model.train()
        mean = self.d.mean(total / max(count, 1))
        return mean, math.exp(min(mean, 50.0))

    def fit(self, resume_from: Path | None = None, reschedule: bool = False) -> FitResult:
        run = self.s.run
        if run.threads:
            torch.set_num_threads(run.threads)
        if resume_from is not None:
            self.load_state(resume_from, reschedule)
        if self.d.is_main and not self.eval_starts:
            print(f"note: no validation data: {self.valid_note}; the validation loss will not be measured",
                  file=sys.stderr)
        if self.d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "settings.json", json.dumps(self.s.to_dict(), indent=2))
        logger = MetricsLogger(self.run_dir, self.d.is_main, run.tensorboard,
                               resume_step=self.step if resume_from is not None else None)
        bar = None
        if self.d.is_main:
            bar = tqdm(total=run.max_steps, initial=self.step, desc=self.description, unit="step", dynamic_ncols=True)
        losses: list[float] = []
        val = None
        saved: Path | None = None
        interrupted = False
        t_start = time.perf_counter()
        start_step = self.step
        with _StopFlag() as stop:
            while self.step < run.max_steps:
                t0 = time.perf_counter()
                loss = self.train_step()
                dt = time.perf_counter() - t0
                if not math.isfinite(loss):
                    raise PolycoderError(
                        f"the loss became {loss} at step {self.step}; lower optim.lr, use --dtype bf16/fp32, "
                        "or resume from an earlier checkpoint")
                losses.append(loss)
                tps = self.s.data.batch_size * self.seq_len / dt
                record: dict[str, Any] = {"step": self.step, "loss": loss, "lr": self.schedule.lr(self.step - 1),
                                          "tokens": self.tokens, "tokens_per_s": tps}
                if self.flops_per_token:
                    record["model_tflops_per_s"] = tps * self.flops_per_token / 1e12
                if run.eval_every and self.step % run.eval_every == 0 and self.step < run.max_steps:
                    val = self.evaluate()
                    if val:
                        record.update(val_loss=val[0], val_ppl=val[1])
                if self.step % run.log_every == 0 or "val_loss" in record:
                    logger.log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                if self.d.any(stop.set):
                    interrupted = True
                    break
                if run.save_every and self.step % run.save_every == 0 and self.step < run.max_steps:
                    saved = self.save()
            if not interrupted:
                val = self.evaluate()
                if val:
                    logger.log({"step": self.step, "val_loss": val[0], "val_ppl": val[1]})
            saved = self.save()
        if bar is not None:
            bar.close()
        logger.close()
        seconds = time.perf_counter() - t_start
        ran = self.step - start_step
        result = FitResult(
            steps=self.step, tokens=self.tokens, seconds=seconds,
            tokens_per_s=ran * self.s.data.batch_size * self.seq_len / max(seconds, 1e-9),
            final_loss=losses[-1] if losses else None,
            val_loss=val[0] if val else None, val_ppl=val[1] if val else None,
            checkpoint=str(saved) if saved else None, interrupted=interrupted,
            resumed_from=str(resume_from) if resume_from else None, signal=stop.signum, losses=losses)
        if self.d.is_main:
            self._write_summary(result)
        return result

    def _write_summary(self, r: FitResult) -> None:
        d = {k: v for k, v in asdict(r).items() if k != "losses"}
        write_text(self.run_dir / "summary.json", json.dumps(d, indent=2))
        png = plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", self.description)
        rows = [("steps", f"{r.steps} / {self.s.run.max_steps}"), ("tokens", f"{r.tokens:,}"),
                ("time (this call)", f"{r.seconds:.1f} s"), ("tokens/s", f"{r.tokens_per_s:,.0f}"),
                ("last training loss", f"{r.final_loss:.4f}" if r.final_loss is not None else "-"),
                ("validation loss / ppl", f"{r.val_loss:.4f} / {r.val_ppl:.2f}" if r.val_loss is not None else
                 "not measured yet" if self.eval_starts else f"none: no validation data ({self.valid_note})"),
                ("checkpoint", r.checkpoint or "-"), ("interrupted", "yes (resume with --resume)" if r.interrupted else "no")]
        md = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
        if png:
            md += f"\n![loss curve]({png.name})\n"
        write_text(self.run_dir / "summary.md", f"# {self.description}\n\n{md}")
        print("\n" + "\n".join(f"{k:>24}: {v}" for k, v in rows))


class _ResetSync:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
