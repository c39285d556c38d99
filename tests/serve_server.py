"""Start a real `polycoder serve` process on 127.0.0.1 for the serving tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m polycoder serve ...` in a subprocess; `url` once /health answers."""

    def __init__(self, model: Path, *args: str, env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "polycoder", "serve", "--model", str(model), "--port", str(self.port),
               "--model-name", "tiny", "--log-level", "info", *args]
        self.log_path = log
        self._log = open(log, "wb") if log else subprocess.DEVNULL
        # The server keeps the test process's thread count, so that a one-row computation is
        # bitwise the same in both (seeded sampling from a near-uniform random model is that sensitive).
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.logs()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("server did not come up in 120 s")
            time.sleep(0.2)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def post(server: Server, body, path: str = "/v1/completions", **kw) -> httpx.Response:
    """POST a JSON body to the server."""
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def still_serves(server: Server) -> None:
    """The server answers an ordinary request (after whatever the test sent it)."""
    r = post(server, {"prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
