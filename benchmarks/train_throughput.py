"""Training throughput: our loop against transformers' GPTNeoX, same shapes, batch, threads.

For each precision (fp32; bf16 autocast with fp32 master weights) the script times
optimizer steps of
- ours: `polycoder.train.loop.Trainer.train_step` on `polycoder.model.GPTNeoX` with the
  training operations `polycoder.backend.choose` picks on this machine (the QKV split and
  rotary as one native pass, SDPA's causal attention with a native backward in bf16
  (`polycoder.backend.attention`), the output head fused with the cross-entropy, fp32
  products through oneDNN on non-Intel CPUs (`polycoder.backend.onednn`)), fused AdamW,
  gradient clipping;
- transformers: `GPTNeoXForCausalLM(input_ids, labels=...)` with its own loss, backward,
  clipping and `torch.optim.AdamW` (defaults), the usual way to train it;
all of them (both implementations at every precision) taking their steps in turn in the
same process, so machine load hits them alike, across precisions too.
Both start from the same weights (ours, loaded into transformers), see the same batch at
each step (the loader's) and use the same learning rate, so their loss curves must agree:
the table reports the largest loss difference per precision, and that of our bf16 run
from our fp32 run.
Process settings are shared: the Trainer makes glibc keep freed memory
(`loop.keep_freed_memory`), which speeds transformers' steps as much as ours.
Reported: tokens/s, model FLOPs utilisation (6N + 12 L C T FLOPs a token, PaLM's
definition, `train_flops_per_token`) against the matrix-product rate measured in the
same run (a square GEMM at that precision; for fp32 the faster of MKL, torch's default,
and oneDNN), and the ratios. Speed is never asserted.

    .venv/bin/python benchmarks/train_throughput.py [--preset polycoder-160m] [--batch 4]
        [--seq-len 512] [--steps 3] [--threads 2] [--precisions fp32 bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_line
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from polycoder.backend import choose, onednn  # noqa: E402
from polycoder.checkpoint import build_model, save_checkpoint  # noqa: E402
from polycoder.config import ModelConfig  # noqa: E402
from polycoder.train.distributed import Dist  # noqa: E402
from polycoder.train.loop import Trainer, autocast  # noqa: E402
from polycoder.train.settings import load_settings  # noqa: E402


def gemm_rate(dtype: torch.dtype, n: int = 2048, reps: int = 5, use_onednn: bool = False) -> float:
    """FLOP/s of an n x n x n matrix product at `dtype` (the peak we compare against);
    `use_onednn`: through oneDNN's linear op instead of torch.mm (MKL for fp32)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    mm = (lambda: onednn.matmul_nt(a, b)) if use_onednn else (lambda: a @ b)
    mm()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mm()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def train_flops_per_token(cfg, T: int) -> float:
    """6 x (matrix parameters that touch each token: the blocks and the output head) plus
    12 L C T for attention scores and values (PaLM, appendix B). Written out here because
    ModelConfig.flops_per_token counts the output head twice (reported to the lead)."""
    C, L, F, V = cfg.n_embd, cfg.n_layer, cfg.intermediate_size, cfg.vocab_size
    per_layer = 4 * C * C + 2 * C * F  # QKV + attention output + MLP (biases and LayerNorms are noise)
    return 6 * (L * per_layer + V * C) + 12 * L * C * T


def hf_model(cfg):
    # The same architecture through config.json, so nothing is configured twice.
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(build_model(cfg.replace(n_layer=1), seed=0), None, Path(d) / "m")
        hf_cfg = GPTNeoXConfig.from_pretrained(Path(d) / "m")
    hf_cfg.num_hidden_layers = cfg.n_layer
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(hf_cfg).train()


def hf_stepper(theirs, trainer, o, prec: str):
    """One transformers training step a call: our batch and learning rate of that step, its
    own loss, backward, clipping and torch.optim.AdamW."""
    opt = torch.optim.AdamW(theirs.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0)
    steps = 0

    def step() -> float:
        nonlocal steps
        x, y = (t.contiguous() for t in trainer.loader.global_batch(steps))  # our batch of this step
        for g in opt.param_groups:
            g["lr"] = trainer.schedule.lr(steps)
        with autocast(prec, torch.device("cpu")) if prec != "fp32" else contextlib.nullcontext():
            loss = theirs(x, labels=y, shift_labels=y).loss  # y: the next tokens, already shifted
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="polycoder-160m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model and precision (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--json", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_preset(args.preset)
    B, T = args.batch, args.seq_len
    tokens = B * T
    flops_tok = train_flops_per_token(cfg, T)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 50257, size=200_000).astype(np.uint16)
    peaks = {"fp32 mkl": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    if onednn.available():
        peaks["fp32 onednn"] = gemm_rate(torch.float32, use_onednn=True)
    peak = {"fp32": max(v for k, v in peaks.items() if k.startswith("fp32")), "bf16": peaks["bf16"]}
    # Every (precision, implementation) pair is built first and they take their steps in
    # turn, so that the ratios across precisions (ours bf16 against transformers fp32) come
    # from the same minutes of a shared machine as the ratios within one.
    runs = []  # (precision, name, step function)
    for prec in args.precisions:
        settings = load_settings(None, None, {
            "data.seq_len": T, "data.batch_size": B, "run.precision": prec, "run.max_steps": 1000,
            "run.tensorboard": False, "optim.lr": 1e-4, "optim.warmup": 0})
        ours = build_model(cfg, seed=0).requires_grad_(True).train()
        trainer = Trainer(ours, settings, Dist(), [data], [], tempfile.mkdtemp(), lambda m, f: None, T)
        theirs = hf_model(cfg)
        keys = set(theirs.state_dict())  # transformers 5 calls the head lm_head in memory
        theirs.load_state_dict({("lm_head.weight" if k == "embed_out.weight" and k not in keys else k): v
                                for k, v in ours.state_dict().items()})
        runs.append((prec, "ours", trainer.train_step))
        runs.append((prec, "transformers", hf_stepper(theirs, trainer, settings.optim, prec)))
    times = {(p, n): [] for p, n, _ in runs}
    losses = {(p, n): [] for p, n, _ in runs}
    for i in range(args.steps + 1):
        for prec, name, step in runs:
            t = time.perf_counter()
            loss = step()
            dt = time.perf_counter() - t
            if i:  # step 0 warms up allocators and kernels
                times[prec, name].append(dt)
            losses[prec, name].append(loss)
            print(f"{prec} {name:>12} step {i}: {dt:6.2f} s  loss {loss:.4f}", flush=True)
    rows = []
    for prec, name, _ in runs:
        dt = statistics.median(times[prec, name])
        tps = tokens / dt
        rows.append({"precision": prec, "impl": name, "step_s": dt, "step_times": times[prec, name], "tokens_per_s": tps,
                     "tflops": tps * flops_tok / 1e12,
                     "mfu_vs_measured_peak": tps * flops_tok / peak[prec],
                     "first_loss": losses[prec, name][0], "losses": losses[prec, name],
                     "max_loss_diff_vs_transformers": max(
                         abs(a - b) for a, b in zip(losses[prec, name], losses[prec, "transformers"]))})
    base = {r["precision"]: r["tokens_per_s"] for r in rows if r["impl"] == "transformers"}
    for r in rows:
        r["vs_transformers_same_precision"] = r["tokens_per_s"] / base[r["precision"]]
        r["vs_transformers_fp32"] = r["tokens_per_s"] / base["fp32"] if "fp32" in base else None

    print(f"\n{args.preset}, batch {B} x {T}, {args.threads} threads, torch {torch.__version__}, "
          f"{cpu_line()}, training backend {choose('cpu')}")
    print("measured GEMM peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
          + f"; {flops_tok / 1e6:.0f} MFLOP a token")
    ours_loss = {r["precision"]: r["losses"] for r in rows if r["impl"] == "ours"}
    for prec in ours_loss:
        diff = next(r["max_loss_diff_vs_transformers"] for r in rows if r["impl"] == "ours" and r["precision"] == prec)
        print(f"loss curves, {prec}: ours vs transformers, largest difference over {len(ours_loss[prec])} steps {diff:.2e}")
    if "fp32" in ours_loss and "bf16" in ours_loss:
        d = max(abs(a - b) for a, b in zip(ours_loss["bf16"], ours_loss["fp32"]))
        print(f"loss curves: ours bf16 vs ours fp32, largest difference {d:.2e}")
    head = (f"| {'precision':9} | {'impl':12} | {'step s':>7} | {'tokens/s':>8} | {'GFLOP/s':>7} | {'MFU':>5} | "
            f"{'x tf same':>9} | {'x tf fp32':>9} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['precision']:9} | {r['impl']:12} | {r['step_s']:7.2f} | {r['tokens_per_s']:8.1f} | "
              f"{r['tflops'] * 1e3:7.1f} | {r['mfu_vs_measured_peak']:5.1%} | {r['vs_transformers_same_precision']:9.2f} | "
              f"{(r['vs_transformers_fp32'] or 0):9.2f} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "batch": B, "seq_len": T, "threads": args.threads,
                               "steps": args.steps, "torch": torch.__version__,
                               "gemm_peak_flops": peak, "gemm_rates": peaks, "flops_per_token": flops_tok,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
