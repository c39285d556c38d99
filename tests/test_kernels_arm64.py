"""The native kernels on every variant against a scalar fp64 reference: tests/kernels_check.c.

The program links the kernels (decode.c, decode_block.c, train.c) and checks pc_linear (fp32, bf16, int8
weights; 1..8 and 13 rows; odd sizes and column tails; fused GELU over its range), pc_block
on tiny blocks (attention included), the cross-entropy, the rotary split and the transpose,
each with tolerances from the arithmetic (the program's opening comment says which).

ARM64 NEON is checked under emulation: the program is cross-compiled for Armv8-A (int8 by
widening multiply-accumulates) and Armv8.2-A with the dot product extension (int8 by sdot)
and run by qemu-aarch64; skipped, naming the Debian packages, where the cross compiler or
qemu is absent. The NEON variant's speed is not measured here: that needs an ARM machine
running benchmarks/decode.py. The same program also runs natively (the host's variant, and
on x86-64 the AVX2 one where the CPU runs it), so the reference checks those variants too.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from polycoder import kernels

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tests" / "kernels_check.c"
CROSS_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
PACKAGES = "gcc-aarch64-linux-gnu qemu-user libgomp1-arm64-cross"
ARM64 = platform.machine().lower() in ("aarch64", "arm64")
X86_64 = platform.machine().lower() in ("x86_64", "amd64")

# target id -> (the compiler's target flag, pc_available's code, the int8 product's path or None: any)
TARGETS = {
    "aarch64-armv8-a": ("-march=armv8-a", 3, "smlal"),
    "aarch64-armv8.2-a+dotprod": ("-march=armv8.2-a+dotprod", 3, "sdot"),
    "host-native": ("-mcpu=native" if ARM64 else "-march=native", None, None),
    "host-x86-64-v3": ("-march=x86-64-v3", 2, None),
}


def _cross_sysroot() -> Path | None:
    """Where the cross toolchain's aarch64 libraries live (qemu's -L): the folder above the
    one holding its libgomp, None where that library is missing."""
    found = subprocess.run([CROSS_CC, "-print-file-name=libgomp.so.1"], capture_output=True, text=True, timeout=30)
    lib = Path(found.stdout.strip())
    return lib.resolve().parent.parent if lib.is_absolute() and lib.is_file() else None


def _build_and_run(target: str, tmp_path: Path) -> tuple[str, int]:
    flag, _, _ = TARGETS[target]
    cross = target.startswith("aarch64")
    if cross:
        if not shutil.which(CROSS_CC) or not shutil.which(QEMU):
            pytest.skip(f"needs {CROSS_CC} and {QEMU}: apt-get install {PACKAGES}")
        sysroot = _cross_sysroot()
        if sysroot is None:
            pytest.skip(f"{CROSS_CC} finds no aarch64 libgomp: apt-get install libgomp1-arm64-cross")
        cc, run = CROSS_CC, [QEMU, "-L", str(sysroot)]
    else:
        cc, run = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"), []
        if not cc:
            pytest.skip("needs a C compiler (cc, gcc or clang)")
        if target == "host-x86-64-v3":
            needs = set(kernels.ISAS["avx2"][1])
            if not X86_64 or not needs <= set(kernels._cpu_flags().split()):
                pytest.skip("the AVX2 variant needs an x86-64 CPU with AVX2 + FMA")
    exe = tmp_path / f"kernels_check-{target}"
    sources = [CHECK, *kernels.SOURCES]
    # -O3 as the library's own build (polycoder/kernels/__init__.py), so the code checked is the code shipped
    built = subprocess.run([cc, "-O3", flag, "-fopenmp", "-Wall", "-I", str(kernels.FOLDER), *map(str, sources),
                            "-o", str(exe), "-lm"], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"{cc} {flag} failed:\n{built.stderr[-3000:]}"
    ran = subprocess.run([*run, str(exe)], capture_output=True, text=True, timeout=300)
    return ran.stdout + ran.stderr, ran.returncode


@pytest.mark.parametrize("target", TARGETS)
def test_kernels_match_the_scalar_reference(target, tmp_path):
    out, rc = _build_and_run(target, tmp_path)
    _, code, int8_path = TARGETS[target]
    variant = re.search(r"^variant: PC_ISA (\d+), VL \d+, int8 products ([^,\s]+)", out, re.M)
    assert variant, out[-3000:]
    if code is not None:
        assert int(variant[1]) == code, f"built the variant {variant[1]}, expected {code}"
    if int8_path is not None:
        assert variant[2] == int8_path, f"int8 products by {variant[2]}, expected {int8_path}"
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert not failed and rc == 0, f"exit status {rc}; failed checks:\n" + "\n".join(failed[:40]) + f"\n{out[-2000:]}"
    summary = re.search(r"^(\d+) checks, 0 failed$", out, re.M)
    # every variant runs the whole list (the stubs, PC_ISA 0, only pc_available's)
    assert summary and int(summary[1]) >= (300 if int(variant[1]) else 1), out[-2000:]
