#!/usr/bin/env python3
"""Screenshot of the playground's editor with ghost text, for the README (docs/playground-ghost-text.png).

    PYTHONPATH=src python scripts/playground_screenshot.py [--model polycoder-tiny] [--out docs/playground-ghost-text.png]

Starts `polycoder serve` on a free loopback port (the bundled model unless told otherwise),
opens the page in headless Chromium (Debian's chromium + chromedriver, through selenium, as
tests/test_serve_playground.py does), types a fixed C snippet with the caret inside a function,
waits for the greedy completion to stream in as ghost text and saves the page. Greedy
decoding, a fixed window size and a fixed snippet make the picture the same on every run
with the same model (fonts aside: it uses the machine's monospace font).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

REPO = Path(__file__).resolve().parents[1]
SNIPPET = """#include <stddef.h>

/* The sum of the n numbers at xs. */
static int sum(const int *xs, size_t n)
{
    int total = 0;
    |
    return total;
}
"""
CARET = SNIPPET.index("|")  # where the caret stands; the bar itself is not typed
TYPED = "for ("


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "polycoder", "serve", "--model", model, "--port", str(port),
                             "--log-level", "warning"])
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"polycoder serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("polycoder serve did not come up in 120 s")


def browser(profile: str) -> webdriver.Chrome:
    for name in ("chromium", "chromedriver"):
        if shutil.which(name) is None:
            raise SystemExit(f"{name} is not on PATH: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--hide-scrollbars", "--force-device-scale-factor=1",
                 "--window-size=1100,820", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                            options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="polycoder-tiny", help="model to serve (default: the bundled one)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "playground-ghost-text.png")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    port = free_port()
    server = start_server(args.model, port)
    profile = tempfile.mkdtemp(prefix="polycoder-chromium-")
    driver = browser(profile)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        limit = driver.find_element(By.ID, "max_tokens")
        limit.clear()
        limit.send_keys(str(args.max_tokens))
        Select(driver.find_element(By.ID, "language")).select_by_value("c")
        driver.execute_script("""
            const code = document.getElementById("code");
            code.focus(); code.value = arguments[0]; code.setSelectionRange(arguments[1], arguments[1]);""",
                              SNIPPET.replace("|", ""), CARET)
        driver.find_element(By.ID, "code").send_keys(TYPED)
        WebDriverWait(driver, 120, poll_frequency=0.05).until(
            lambda d: d.find_element(By.ID, "editor").get_attribute("data-state") in ("done", "error"))
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#highlight span.k"))
        status = driver.find_element(By.ID, "status").text
        if driver.find_element(By.ID, "editor").get_attribute("data-state") != "done":
            raise SystemExit(f"the page did not complete: {status}")
        ghost = driver.execute_script("const g = document.getElementById('ghost'); return g && g.textContent;")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out} (ghost text {ghost!r}; {status})")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        server.terminate()
        server.wait(20)


if __name__ == "__main__":
    main()
