"""`polycoder serve` (and llama.cpp's `llama-server`) as a subprocess on a free loopback port, for the
serving benchmarks."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*serve_args: str, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Start `python -m polycoder serve SERVE_ARGS --port P` and wait until /health answers:
    (process, base URL)."""
    port = free_port()
    return _start([sys.executable, "-m", "polycoder", "serve", *serve_args, "--port", str(port)], port, timeout)


def start_llama_server(binary: str, gguf: str, *args: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Start llama.cpp's `llama-server -m GGUF ARGS` on 127.0.0.1 (its web UI off) and wait until
    /health answers: (process, base URL)."""
    port = free_port()
    return _start([binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--no-webui", *args], port, timeout)


def _start(cmd: list[str], port: int, timeout: float) -> tuple[subprocess.Popen, str]:
    """Run `cmd` and wait for its /health. Its log goes to a temporary file (a pipe nobody reads
    could fill and stall the server), shown if it exits before it is ready."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"{Path(cmd[0]).name} failed: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"{Path(cmd[0]).name} did not start in {timeout:.0f} s")
