"""Two versions of the decode products against each other, in one process: `pc_linear` GB/s.

A change to polycoder/kernels/decode.c is measured by building the library from two source
folders (`--a`, `--b`: each holding decode.c, train.c and the headers, e.g. a copy taken
before the change and the package's own folder) with the flags the package builds with (its
tuning defines for this CPU included), and
calling both on the same weights, alternately, `--repeats` times a shape; the best call of
each is compared (the machine is shared: alternating makes a load change hit both alike).
Shapes: fp32, bf16 and int8 weights of about `--mib` MiB (so they come from memory, not the
caches), K = 768 and 3072 columns (PolyCoder-160M's), 1, 2, 4 and 8 activation rows. A torch
sum over the same weights in the same run says what reading them costs.

    python benchmarks/kernel_ab.py --a /tmp/before --json kernel-ab.json
    python benchmarks/kernel_ab.py --a /tmp/before --isa avx2
    python benchmarks/kernel_ab.py --a src/polycoder/kernels --isa-a avx2   # the two x86 variants

Writes JSON (and Markdown next to it); prints a table. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_description, cpu_line
from report import publish

from polycoder import kernels

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
MARCH = {"native": "native", "avx2": "x86-64-v3"}
ROWS = (1, 2, 4, 8)


def build(folder: Path, march: str, out: Path):
    """pc_linear of the library built from `folder`'s decode.c and train.c."""
    out.mkdir(parents=True, exist_ok=True)
    lib = out / f"{folder.name or 'src'}-{abs(hash(str(folder)))}.so"
    subprocess.run(["cc", *kernels.compile_flags(march), "-I", str(folder),
                    str(folder / "decode.c"), str(folder / "train.c"), "-o", str(lib), "-lm"], check=True)
    fn = ctypes.CDLL(str(lib)).pc_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long,
                   ctypes.c_long, ctypes.c_int]
    return fn


def weights(dtype: torch.dtype, mib: int, K: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    N = (mib << 20) // (K * torch.empty((), dtype=dtype).element_size())
    if dtype == torch.int8:
        return torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N)
    return torch.randn(N, K).to(dtype), None


def call(fn, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, y: torch.Tensor, threads: int) -> float:
    M, K = x.shape
    t = time.perf_counter()
    rc = fn(x.data_ptr(), 0, w.data_ptr(), KINDS[w.dtype], scale.data_ptr() if scale is not None else None, None, 0,
            y.data_ptr(), 0, 0, M, w.shape[0], K, threads)
    dt = time.perf_counter() - t
    if rc:
        raise RuntimeError(f"pc_linear failed with code {rc}")
    return dt


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="source folder of version A (decode.c, train.c, headers)")
    ap.add_argument("--b", type=Path, default=kernels.FOLDER, help="source folder of version B (default: the package's)")
    ap.add_argument("--isa", default="native", choices=["native", "avx2"], help="avx2: build for x86-64-v3")
    ap.add_argument("--isa-a", default=None, choices=["native", "avx2"],
                    help="version A's build only (default: --isa): with --a the package's folder, the AVX2 variant "
                         "against the native one")
    ap.add_argument("--mib", type=int, default=288, help="MiB of weights a shape")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    isa_a = args.isa_a or args.isa
    with tempfile.TemporaryDirectory() as tmp:
        fns = [build(args.a, MARCH[isa_a], Path(tmp) / "a"), build(args.b, MARCH[args.isa], Path(tmp) / "b")]
        rows = []
        for dtype in KINDS:
            for K in (768, 3072):
                w, scale = weights(dtype, args.mib, K)
                nbytes = w.numel() * w.element_size()
                sum_s = read_seconds(w)
                for M in ROWS:
                    x, y = torch.randn(M, K), torch.empty(M, w.shape[0])
                    best = [float("inf")] * 2
                    for _ in range(args.repeats):
                        for i, fn in enumerate(fns):
                            best[i] = min(best[i], call(fn, x, w, scale, y, threads))
                    rows.append({"weights": str(dtype).removeprefix("torch."), "K": K, "rows": M,
                                 "a_gb_s": nbytes / best[0] / 1e9, "b_gb_s": nbytes / best[1] / 1e9,
                                 "sum_gb_s": nbytes / sum_s / 1e9})
    result = {"cpu": cpu_description(), "cpu_line": cpu_line(), "isa": args.isa, "isa_a": isa_a, "threads": threads,
              "mib": args.mib,
              "a": str(args.a), "b": str(args.b), "repeats": args.repeats, "rows": rows}
    publish(result, markdown(result), args.json)
    return result


def read_seconds(w: torch.Tensor, repeats: int = 3) -> float:
    """The best time of a torch sum over w's bytes, seen as fp32 (the same bytes read, at
    fp32's speed whatever the weights' type: torch's int8 sum is far slower than memory)."""
    words = w.view(-1).view(torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        words.sum()
        best = min(best, time.perf_counter() - t)
    return best


def markdown(result: dict) -> str:
    build_of = result["isa"] if result.get("isa_a", result["isa"]) == result["isa"] else \
        f"A {result['isa_a']}, B {result['isa']}"
    lines = [f"CPU: {result['cpu_line']}; build {build_of}, {result['threads']} threads, "
             f"{result['mib']} MiB of weights a shape, best of {result['repeats']} alternating calls",
             f"A = {result['a']}, B = {result['b']}", "",
             "| weights | K | rows | A GB/s | B GB/s | B / A | torch sum GB/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['weights']} | {r['K']} | {r['rows']} | {r['a_gb_s']:.1f} | {r['b_gb_s']:.1f} | "
                     f"{r['b_gb_s'] / r['a_gb_s']:.2f}x | {r['sum_gb_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
