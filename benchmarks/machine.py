"""Where a benchmark ran: the CPU's model name and the vector features that decide our paths.

Every benchmark names these beside its figures (machines differ between sessions: Intel
Xeons with AVX-512 and AMX, AMD EPYCs with AVX2 only or with AVX-512).
"""

from __future__ import annotations

import platform

from polycoder import cpu

CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
                "avx_vnni", "asimd", "sve", "asimddp", "bf16", "i8mm")


def cpu_description() -> dict:
    """{"model": the CPU's model name (with its x86 family and model numbers, which tell a
    generation apart where a VM names only "AMD EPYC": family 25 is Zen 3/4, 26 is Zen 5),
    "features": those of CPU_FEATURES it has}."""
    fields = cpu.cpuinfo()
    name = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f", family {fields['cpu family']} model {fields['model']}"
    flags = set(cpu.flags().split())
    return {"model": name, "features": [f for f in CPU_FEATURES if f in flags]}


def cpu_line() -> str:
    """The CPU in one line: model (features)."""
    cpu = cpu_description()
    return f"{cpu['model']} ({', '.join(cpu['features'])})"
