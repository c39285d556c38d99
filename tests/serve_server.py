"""Start a real `polycoder serve` process (or llama.cpp's `llama-server`) on 127.0.0.1 for the serving tests."""

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


class Service:
    """A server command in a subprocess on 127.0.0.1:`port`; `url` once its /health answers
    (within `timeout` seconds; its log, or the end of it, in the error otherwise)."""

    def __init__(self, cmd: list[str], port: int, name: str, env: dict | None = None, log: Path | None = None,
                 timeout: float = 120):
        self.port, self.url, self.log_path = port, f"http://127.0.0.1:{port}", log
        self._log = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}: {self.logs()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not come up in {timeout:.0f} s: {self.logs()[-2000:]}")
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


class Server(Service):
    """`python -m polycoder serve ...` in a subprocess. It keeps the test process's thread
    count, so that a one-row computation is bitwise the same in both (seeded sampling from a
    near-uniform random model is that sensitive)."""

    def __init__(self, model: Path, *args: str, env: dict | None = None, log: Path | None = None):
        port = free_port()
        super().__init__([sys.executable, "-m", "polycoder", "serve", "--model", str(model), "--port", str(port),
                          "--model-name", "tiny", "--log-level", "info", *args], port, "server", env, log)


class LlamaServer(Service):
    """llama.cpp's `llama-server BINARY -m GGUF ARGS` on 127.0.0.1, its web UI off."""

    def __init__(self, binary: Path, gguf: Path, *args: str, log: Path | None = None):
        port = free_port()
        super().__init__([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--no-webui", *args],
                         port, "llama-server", log=log, timeout=60)


def post(server: Server, body, path: str = "/v1/completions", **kw) -> httpx.Response:
    """POST a JSON body to the server."""
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def still_serves(server: Server) -> None:
    """The server answers an ordinary request (after whatever the test sent it)."""
    r = post(server, {"prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
