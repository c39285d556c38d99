"""Where a benchmark ran: the CPU's model name and the vector features that decide our paths.

Every benchmark names these beside its figures (machines differ between sessions: Intel
Xeons with AVX-512 and AMX, AMD EPYCs with AVX2 only or with AVX-512).
"""

from __future__ import annotations

import platform

CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
                "avx_vnni", "asimd", "sve", "asimddp", "bf16", "i8mm")


def cpu_description() -> dict:
    """{"model": the CPU's model name, "features": those of CPU_FEATURES it has}."""
    name, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and not name:
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": name or platform.processor() or platform.machine(),
            "features": [f for f in CPU_FEATURES if f in flags]}


def cpu_line() -> str:
    """The CPU in one line: model (features)."""
    cpu = cpu_description()
    return f"{cpu['model']} ({', '.join(cpu['features'])})"
