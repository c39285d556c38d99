"""The int8 linear's two CPU products against each other, by number of rows: the prefill's choice.

`polycoder.quantize.Int8Linear` multiplies a few rows through `torch._weight_int8pack_mm`
(int8 weights read directly) and, on a CPU that multiplies bf16 natively, a product of
`WIDEN_FROM_ROWS` rows or more through the weights widened to bf16 and oneDNN's bf16
product. This script times both, and the plain bf16 and fp32 products of the same weights
for scale, on the four linears of a block of each model shape (the output head is left out:
a prefill computes it for one row), summed over the four, for each row count. Calls
alternate between the products, `--repeats` times; the best of each is compared.

    python benchmarks/int8_products.py --json int8-products.json
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/int8_products.py   # as on a CPU without AVX512-BF16

Writes JSON (and Markdown next to it); prints a table. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from machine import cpu_description, cpu_line
from report import publish

from polycoder import quantize
from polycoder.config import PRESETS
from polycoder.quantize import Int8Linear

PRODUCTS = ("int8 kernel", "widened to bf16", "bf16 weights", "fp32 weights")


def block_linears(n_embd: int, intermediate: int) -> list[tuple[Int8Linear, torch.Tensor]]:
    """(int8 layer, its fp32 weight) for a block's query_key_value, dense, dense_h_to_4h, dense_4h_to_h."""
    out = []
    for n_out, n_in in [(3 * n_embd, n_embd), (n_embd, n_embd), (intermediate, n_embd), (n_embd, intermediate)]:
        linear = nn.Linear(n_in, n_out, bias=False)
        out.append((Int8Linear.from_linear(linear), linear.weight.detach()))
    return out


def products(layer: Int8Linear, weight: torch.Tensor, x: torch.Tensor) -> dict:
    x16, w16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
    return {"int8 kernel": lambda: layer.packed_product(x16), "widened to bf16": lambda: layer.widened_product(x16),
            "bf16 weights": lambda: F.linear(x16, w16), "fp32 weights": lambda: F.linear(x, weight)}


def measure(shape: str, rows: int, repeats: int) -> dict:
    config = PRESETS[shape]
    best = dict.fromkeys(PRODUCTS, 0.0)
    for layer, weight in block_linears(config.n_embd, config.intermediate_size):
        calls = products(layer, weight, torch.randn(rows, weight.size(1)))
        seconds = dict.fromkeys(PRODUCTS, float("inf"))
        for _ in range(repeats + 1):  # the first pass warms up
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                seconds[name] = min(seconds[name], time.perf_counter() - start)
        for name in PRODUCTS:
            best[name] += seconds[name]
    return {"model": shape, "rows": rows, "ms": {k: round(v * 1e3, 3) for k, v in best.items()},
            "int8_kernel_over_widened": round(best["int8 kernel"] / best["widened to bf16"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["polycoder-160m", "polycoder-0.4b"], choices=sorted(PRESETS))
    ap.add_argument("--rows", default="1,8,16,32,64,256,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [measure(m, int(r), args.repeats) for m in args.models for r in args.rows.split(",")]
    routed = quantize.bf16_products_native()
    lines = [f"# Int8 linear products by rows (cpu, {args.threads} threads, torch {torch.__version__}, "
             f"best of {args.repeats}, one block's four linears summed, ms)", "",
             f"CPU: {cpu_line()}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}; "
             f"Int8Linear takes the widened product from {quantize.WIDEN_FROM_ROWS} rows: "
             f"{'yes' if routed else 'no, bf16 products are not native here'}", "",
             "| model | rows | " + " | ".join(PRODUCTS) + " | int8 kernel / widened |",
             "|---|---:|" + "---:|" * (len(PRODUCTS) + 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['rows']} | " + " | ".join(f"{r['ms'][p]:.2f}" for p in PRODUCTS)
                     + f" | {r['int8_kernel_over_widened']:.2f}x |")
    results = {"cpu": cpu_description(), "threads": args.threads, "torch": torch.__version__,
               "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "widened_from_rows": quantize.WIDEN_FROM_ROWS,
               "widened_routed_here": routed, "rows": rows}
    publish(results, "\n".join(lines) + "\n", args.json)


if __name__ == "__main__":
    main()
