"""The native pieces of CPU training against the torch operations they replace, in one run.

Each pair takes its turns interleaved (A, B, A, B, ...) in one process, so machine load
hits both alike; the table gives the median of each and the ratio. PolyCoder-160M shapes by
default (4 x 512 tokens, 12 heads of 64, vocabulary 50304), 2 threads:

- attention backward, bf16: `polycoder.backend.attention.causal_attention` against SDPA
  (forward + backward timed, the forward being SDPA's own in both);
- QKV split + rotary, forward + backward: `rotary_qkv` (one native pass each way) against
  the model's torch path (split, rotate, concatenate, transposing copies), in fp32 and
  under bf16 autocast;
- the output head's loss and the gradient of its logits in bf16 (`_loss_and_grad`: the
  logits' product and the softmax pass): the native pass over bf16 logits against torch's
  chunked fp32 softmax, the same product in both;
- the head's weight gradient in bf16 for an fp32 weight: h^T g with the native
  transpose-and-widen (`polycoder.backend.fused_loss._head_grad`) against g^T h and a cast;
- with `--steps N`: whole training steps of the model (Trainer.train_step, bf16) with the
  backend's training operations with and without the native kernels
  (`TrainOps(native=True)` against `TrainOps(native=False)`: rotary pass, attention
  backward and the loss's softmax pass; what tests/test_train_attention.py checks they
  equal), N steps each, interleaved.

Speed is never asserted; the native kernels must be available (`polycoder.kernels`).
POLYCODER_AMX=0 times the attention kernel's vdpbf16ps path instead of its AMX tiles.

    .venv/bin/python benchmarks/train_kernels.py [--repeats 7] [--steps 6] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from polycoder import kernels  # noqa: E402
from polycoder.backend import TrainOps, choose  # noqa: E402
from polycoder.backend.attention import causal_attention, rotary_qkv  # noqa: E402
from polycoder.backend.fused_loss import _head_grad, _loss_and_grad  # noqa: E402
from polycoder.checkpoint import build_model  # noqa: E402
from polycoder.config import ModelConfig  # noqa: E402
from polycoder.model import RotaryEmbedding, split_qkv_rotary  # noqa: E402
from polycoder.train.distributed import Dist  # noqa: E402
from polycoder.train.loop import Trainer, keep_freed_memory  # noqa: E402
from polycoder.train.settings import load_settings  # noqa: E402


def interleaved(pairs: dict[str, tuple], repeats: int) -> list[dict]:
    """{name: (ours, theirs)} callables -> rows of median seconds and their ratio."""
    rows = []
    for name, (ours, theirs) in pairs.items():
        ours(), theirs()  # warm-up: buffers, libraries
        times = {"ours": [], "torch": []}
        for _ in range(repeats):
            for key, fn in (("ours", ours), ("torch", theirs)):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
        a, b = statistics.median(times["ours"]), statistics.median(times["torch"])
        rows.append({"what": name, "ours_ms": a * 1e3, "torch_ms": b * 1e3, "speedup": b / a})
    return rows


def op_pairs(B: int, H: int, T: int, D: int, V: int) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    q, k, v, do = ((torch.randn(B, H, T, D, generator=g) * s).bfloat16() for s in (2, 1, 1, 1))

    def attention(fn):
        def run():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            fn(*leaves).backward(do)
        return run

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True)

    C = H * D
    rope = RotaryEmbedding(ModelConfig(n_embd=C, n_head=H, n_layer=1, intermediate_size=4 * C, block_size=T))
    cos, sin = rope.cos[:T], rope.sin[:T]
    qkv = torch.randn(B, T, 3 * C, generator=g)
    grads = [torch.randn(B, H, T, D, generator=g).bfloat16() for _ in range(3)]

    def torch_rotary(x, n_head, c, s):  # polycoder.model.TorchOps.qkv_rotary
        return split_qkv_rotary(x, n_head, c[:, None, None], s[:, None, None])

    def rotary(fn, bf16: bool):
        x0 = qkv.bfloat16() if bf16 else qkv

        def run():
            x = x0.detach().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outs = [o.to(torch.bfloat16) if bf16 else o for o in fn(x, H, cos, sin)]  # as attention takes them
            torch.autograd.backward(outs, [gr.to(o.dtype) for o, gr in zip(outs, grads)])
        return run

    h = torch.randn(B * T, C, generator=g).bfloat16()
    logits_grad = (torch.randn(B * T, V, generator=g) * 1e-3).bfloat16()
    head = (torch.randn(V, C, generator=g) * 0.02).bfloat16()
    targets = torch.randint(0, V, (B * T,), generator=g)

    def head_loss(native: bool):
        return lambda: _loss_and_grad(h, head, targets, 64, True, native, False)

    return {
        f"attention fwd+bwd bf16 [{B},{H},{T},{D}]": (attention(causal_attention), attention(sdpa)),
        f"QKV split+rotary fwd+bwd fp32 [{B},{T},{3 * C}]": (rotary(rotary_qkv, False), rotary(torch_rotary, False)),
        f"QKV split+rotary fwd+bwd bf16 [{B},{T},{3 * C}]": (rotary(rotary_qkv, True), rotary(torch_rotary, True)),
        f"head loss + logits gradient bf16 [{B * T},{V}]": (head_loss(True), head_loss(False)),
        f"head dW bf16 -> fp32 [{V},{C}]": (lambda: _head_grad(h, logits_grad, torch.float32, True, False),
                                           lambda: torch.mm(logits_grad.t(), h).float()),
    }


def step_pair(preset: str, B: int, T: int) -> tuple:
    """Whole bf16 training steps: the model with the backend's training operations with and
    without the native kernels (the same fused loss and oneDNN choice in both)."""
    cfg = ModelConfig.from_preset(preset)
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, size=200_000).astype(np.uint16)
    settings = load_settings(None, None, {"data.seq_len": T, "data.batch_size": B, "run.precision": "bf16",
                                          "run.max_steps": 1000, "run.tensorboard": False, "optim.warmup": 0})
    model = build_model(cfg, seed=0).requires_grad_(True).train()
    trainer = Trainer(model, settings, Dist(), [data], [], tempfile.mkdtemp(), lambda m, f: None, T)
    onednn_fp32 = choose("cpu").onednn_fp32

    def with_ops(native: bool):
        def run():
            model.ops = TrainOps(native=native, onednn_fp32=onednn_fp32)
            trainer.train_step()
        return run

    return with_ops(True), with_ops(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="timed turns of each side of a pair")
    ap.add_argument("--steps", type=int, default=0, help="also time this many whole bf16 steps each way")
    ap.add_argument("--preset", default="polycoder-160m", help="the model of --steps")
    ap.add_argument("--json", default="benchmarks/results/train_kernels.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the Trainer does: large buffers reused, not faulted in afresh each call
    if not kernels.has_attention_grad_bf16():
        raise SystemExit(f"the native training kernels do not run here ({kernels.status()}; or no AVX512-BF16)")
    rows = interleaved(op_pairs(args.batch, args.heads, args.seq_len, args.head_size, args.vocab), args.repeats)
    if args.steps:
        rows += interleaved({f"whole bf16 step, {args.preset} {args.batch} x {args.seq_len}":
                             step_pair(args.preset, args.batch, args.seq_len)}, args.steps)
    width = max(len(r["what"]) for r in rows)
    print(f"{args.threads} threads, torch {torch.__version__}, medians of {args.repeats} interleaved turns"
          + (f" ({args.steps} for the whole step)" if args.steps else ""))
    print(f"| {'what':{width}} | ours ms | torch ms | speed-up |")
    print(f"|{'-' * (width + 2)}|---------|----------|----------|")
    for r in rows:
        print(f"| {r['what']:{width}} | {r['ours_ms']:7.1f} | {r['torch_ms']:8.1f} | {r['speedup']:7.2f}x |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "repeats": args.repeats,
                               "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
