"""This machine's CPU as /proc/cpuinfo describes it (Linux; elsewhere nothing): read once, for
the native kernels' build and key, the training products' choice of library, and the
benchmarks' record of where they ran."""

from __future__ import annotations

import functools
import platform


@functools.cache
def cpuinfo() -> dict[str, str]:
    """Each /proc/cpuinfo field's first value (the first CPU's); {} where there is no such file."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def flags() -> str:
    """The CPU's features, space-separated ("flags" on x86, "Features" on ARM64; where neither
    is known, `platform.processor()`)."""
    info = cpuinfo()
    return info.get("flags") or info.get("Features") or platform.processor()


def vendor() -> str:
    """The x86 vendor ("GenuineIntel", "AuthenticAMD"), or "" where not known."""
    return cpuinfo().get("vendor_id", "")
