"""`polycoder serve` under load while hostile and careless requests arrive, in one run.

A real server on 127.0.0.1 (the bundled model by default, `--api-key` set) serves
`--streams` streamed completions with the key. While they run, other clients send, in a
loop, every class of bad request the hardening issue listed:

- sampling integers that would overflow in the engine (`top_k` = 10^20 on the OpenAI route
  and in Ollama's `options`; a 2^70 seed; `n` = 10^20): a 400 naming the field;
- bodies over the size limit, declared (Content-Length) and streamed (chunked): a 413;
- a prompt of a million characters (inside the size limit, far over the context): a 400
  decided from its length before tokenizing;
- malformed JSON (lone UTF-16 surrogates, 100 000 levels of nesting, a 5000-digit
  integer): a 400;
- requests without the key: a 401;
- one client's 2 prompts with n = 16 next to another client's 4-token request (fairness: the
  small request's latency is recorded);
- clients that disconnect in the middle of a stream.

Throughout, /health is polled every 100 ms (its latency recorded) and the server's RSS is
sampled. Reported: each class with the statuses it got and whether they were the expected
ones, whether every stream with the key finished (finish_reason stop or length), the worst
/health latency, and the RSS before, at its peak and 5 s after the load.

    python benchmarks/serve_hostile.py --json serve_hostile.json

Writes JSON (and Markdown next to it); prints a table. Nothing here is asserted: the tests
with the same classes are tests/test_serve_hostile.py and tests/test_serve_errors.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
from machine import cpu_description
from report import publish
from server import start_server

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def raw(body: str) -> dict:
    return {"content": body.encode("utf-8", "surrogatepass"), "headers": {"Content-Type": "application/json", **AUTH}}


BIG = "x" * (5 << 20)  # over the 2 MiB default limit
LONG_PROMPT = "def f():\n    return 1\n" * 45000  # 1M characters: inside the limit, far over any context
NESTED = '{"prompt": ' + "[" * 100000 + "]" * 100000 + "}"


def hostile_requests() -> list[tuple[str, str, str, dict, set[int]]]:
    """(class, method path, description, httpx arguments, expected statuses); made anew for
    each round, as the chunked body is a generator."""

    async def chunked():
        for _ in range(10):
            yield b"{\"prompt\": \"" + b"y" * (1 << 20)
        yield b"\"}"

    return [
        ("overflowing integers", "/v1/completions", "top_k 1e20",
         {"json": {"prompt": "x", "top_k": 10**20}, "headers": AUTH}, {400}),
        ("overflowing integers", "/api/generate", "options.top_k 1e20",
         {"json": {"model": "bench", "prompt": "x", "options": {"top_k": 10**20}}, "headers": AUTH}, {400}),
        ("overflowing integers", "/v1/completions", "seed 2^70",
         {"json": {"prompt": "x", "seed": 2**70}, "headers": AUTH}, {400}),
        ("overflowing integers", "/v1/completions", "n 1e20", {"json": {"prompt": "x", "n": 10**20}, "headers": AUTH}, {400}),
        ("oversized body", "/v1/completions", "5 MB declared", {"json": {"prompt": BIG}, "headers": AUTH}, {413}),
        ("oversized body", "/v1/completions", "10 MB chunked", {"content": chunked(), "headers": AUTH}, {413}),
        ("prompt over the context", "/v1/completions", "1M characters",
         {"json": {"prompt": LONG_PROMPT, "max_tokens": 4}, "headers": AUTH}, {400}),
        ("malformed JSON", "/v1/completions", "lone surrogate", raw('{"prompt": "\\ud800"}'), {400}),
        ("malformed JSON", "/v1/completions", "nesting 100000", raw(NESTED), {400}),
        ("malformed JSON", "/v1/completions", "5000-digit integer", raw('{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}"),
         {400}),
        ("no key", "/v1/completions", "no Authorization", {"json": {"prompt": "x", "max_tokens": 2}}, {401}),
        ("no key", "/api/generate", "wrong key",
         {"json": {"model": "bench", "prompt": "x"}, "headers": {"Authorization": "Bearer wrong"}}, {401}),
    ]


async def main_async(args) -> dict:
    serve_args = ["--api-key", KEY, "--max-batch-size", str(args.max_batch_size), "--model-name", "bench",
                  "--log-level", "warning"]
    proc, url = start_server(*serve_args, *(["--model", args.model] if args.model else []))
    pid = proc.pid
    await asyncio.sleep(2)
    rss_before = rss_mb(pid)
    done = asyncio.Event()
    health, rss_peak = [], [rss_before]
    statuses: dict[tuple[str, str, str], Counter] = {}
    expected = {(c, p, d): e for c, p, d, _, e in hostile_requests()}
    fairness: list[float] = []
    disconnects = Counter()

    async def prober(client):
        while not done.is_set():
            t0 = time.perf_counter()
            try:
                r = await client.get(url + "/health", timeout=30)
                health.append((time.perf_counter() - t0, r.status_code))
            except httpx.HTTPError as e:
                health.append((time.perf_counter() - t0, type(e).__name__))
            rss_peak.append(rss_mb(pid))
            await asyncio.sleep(0.1)

    async def stream(client, i):
        body = {"model": "bench", "prompt": f"# request {i}\ndef f{i}(x):\n", "max_tokens": args.max_tokens,
                "temperature": 0.8, "seed": i, "stream": True}
        reasons = []
        async with client.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=600) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    reasons += [c.get("finish_reason") for c in json.loads(line[6:])["choices"] if c.get("finish_reason")]
        return reasons[-1] if reasons else "no finish_reason"

    async def hostile(client):
        while not done.is_set():
            for cls, path, desc, kw, _ in hostile_requests():
                if done.is_set():
                    return
                key = (cls, path, desc)
                try:
                    r = await client.post(url + path, timeout=120, **kw)
                    statuses.setdefault(key, Counter())[r.status_code] += 1
                except httpx.HTTPError as e:
                    statuses.setdefault(key, Counter())[type(e).__name__] += 1
                await asyncio.sleep(0.05)

    async def fair(client):
        while not done.is_set():
            big = asyncio.gather(*(client.post(url + "/v1/completions", headers=AUTH, timeout=600, json={
                "prompt": f"# big {k}\n", "n": 16, "max_tokens": args.max_tokens, "temperature": 0.8}) for k in range(2)))
            big_task = asyncio.ensure_future(big)
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/completions", headers=AUTH, timeout=600,
                                  json={"prompt": "x = ", "max_tokens": 4, "temperature": 0})
            fairness.append(time.perf_counter() - t0 if r.status_code == 200 else float("nan"))
            await big_task

    async def disconnecting(client):
        while not done.is_set():
            try:
                async with client.stream("POST", url + "/v1/completions", headers=AUTH, timeout=120, json={
                        "prompt": "def g():\n", "max_tokens": 200, "stream": True}) as r:
                    n = 0
                    async for _ in r.aiter_lines():
                        n += 1
                        if n >= 4:
                            break
                disconnects["closed early"] += 1
            except httpx.HTTPError as e:
                disconnects[type(e).__name__] += 1
            await asyncio.sleep(0.2)

    limits = httpx.Limits(max_connections=args.streams + 16)
    async with httpx.AsyncClient(limits=limits) as client:
        probe = asyncio.ensure_future(prober(client))
        side = [asyncio.ensure_future(f(client)) for f in (hostile, fair, disconnecting)]
        t0 = time.perf_counter()
        finishes = await asyncio.gather(*(stream(client, i) for i in range(args.streams)))
        wall = time.perf_counter() - t0
        done.set()
        await asyncio.gather(*side, probe)
    await asyncio.sleep(5)
    rss_after = rss_mb(pid)
    alive = proc.poll() is None
    proc.terminate()
    proc.wait(30)

    health_ok = [t for t, s in health if s == 200]
    classes = []
    for key, counter in statuses.items():
        cls, path, desc = key
        classes.append({"class": cls, "route": path, "request": desc, "statuses": dict(counter),
                        "as_expected": set(counter) <= expected[key]})
    return {
        "cpu": cpu_description(), "streams": args.streams, "max_tokens": args.max_tokens,
        "stream_finishes": dict(Counter(finishes)), "streams_ok": sum(f in ("stop", "length") for f in finishes),
        "stream_wall_s": wall, "health_polls": len(health), "health_failures": len(health) - len(health_ok),
        "health_max_s": max(health_ok, default=float("nan")), "rss_before_mb": rss_before,
        "rss_peak_mb": max(rss_peak), "rss_after_mb": rss_after, "classes": classes,
        "small_request_latency_s": fairness, "disconnects": dict(disconnects), "server_alive": alive,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write results here (and .md beside it)")
    ap.add_argument("--model", help="model folder (default: the bundled model)")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=32)
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    lines = [f"# polycoder serve under hostile load ({res['streams']} streams of {res['max_tokens']} tokens)", "",
             f"- streams with the key finished: {res['streams_ok']} / {res['streams']} {res['stream_finishes']} "
             f"in {res['stream_wall_s']:.1f} s",
             f"- /health: {res['health_polls']} polls, {res['health_failures']} failed, worst {res['health_max_s']:.3f} s",
             f"- RSS: {res['rss_before_mb']:.0f} MB before, {res['rss_peak_mb']:.0f} MB at peak, "
             f"{res['rss_after_mb']:.0f} MB 5 s after",
             f"- a 4-token request beside 2 x n=16: {', '.join(f'{t:.2f} s' for t in res['small_request_latency_s'])}",
             f"- clients disconnecting mid-stream: {res['disconnects']}; server alive at the end: {res['server_alive']}",
             "", "| class | route | request | statuses | as expected |", "|---|---|---|---|---|"]
    for c in res["classes"]:
        lines.append(f"| {c['class']} | {c['route']} | {c['request']} | "
                     + ", ".join(f"{k}: {v}" for k, v in c["statuses"].items()) + f" | {c['as_expected']} |")
    text = "\n".join(lines) + "\n"
    publish(res, text, args.json)


if __name__ == "__main__":
    main()
