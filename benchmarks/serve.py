"""Benchmark `polycoder serve`: tokens/s and p50/p95 latency at 1, 8 and 32 concurrent clients.

The same N greedy requests (code prompts of 20-130 tokens, `--max-tokens` new tokens each)
are sent to a real server on 127.0.0.1 over HTTP (streamed, so time to first token is
measured too) by 1, 8 and 32 concurrent clients. One client is "serving the same requests
one after another"; the other rows show what continuous batching buys. The last row runs
the same prompts through transformers' `generate` in a loop, in-process (no HTTP), on the
same model folder. Throughput = generated tokens / wall time of the whole run; latency is
per request (send to last byte). All in one run, so the ratios compare like with like.

Without --model it builds a random model of PolyCoder-160M's shape (12 layers, 768 wide,
50304 vocabulary) with the bundled model's code tokenizer and saves it as a folder.
Random weights decode at the same speed as trained ones.

Usage:
    .venv/bin/python benchmarks/serve.py [--model FOLDER] [--requests 32] [--max-tokens 32]
        [--concurrency 1 8 32] [--max-context 512] [--out out/benchmarks/serve.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from machine import cpu_description
from server import start_server
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from polycoder.checkpoint import build_model as build  # noqa: E402
from polycoder.checkpoint import save_checkpoint  # noqa: E402
from polycoder.config import ModelConfig  # noqa: E402
from polycoder.locate import BUNDLED_DIR  # noqa: E402
from polycoder.tokenizer import Tokenizer  # noqa: E402

SNIPPETS = [
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[0]\n",
    "#include <stdio.h>\n#include <stdlib.h>\n\nint main(int argc, char **argv) {\n    int n = atoi(argv[1]);\n",
    "public class LinkedList<T> {\n    private Node<T> head;\n    private int size;\n\n    public void add(T value) {\n",
    "func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {\n\tswitch r.Method {\n",
    "fn parse_line(line: &str) -> Result<(String, u32), ParseError> {\n    let mut parts = line.split(',');\n",
    "const express = require('express');\nconst app = express();\n\napp.get('/users/:id', async (req, res) => {\n",
    "import numpy as np\n\n\ndef softmax(x, axis=-1):\n    \"\"\"Numerically stable softmax.\"\"\"\n",
    "SELECT users.id, users.name, COUNT(orders.id) AS n_orders\nFROM users\nLEFT JOIN orders ON ",
]


def make_prompts(n: int) -> list[str]:
    # Distinct prompts of different lengths: rows join and leave the batch at different steps.
    return [f"# request {i}\n" + SNIPPETS[i % len(SNIPPETS)] * (1 + i % 3) for i in range(n)]


def build_model(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    tok = Tokenizer.from_pretrained(BUNDLED_DIR)
    save_checkpoint(build(ModelConfig.from_preset("polycoder-160m"), seed=0), tok, folder)
    return folder


def start(model: Path, batch: int, context: int, device: str) -> tuple[subprocess.Popen, str]:
    return start_server("--model", str(model), "--max-batch-size", str(batch), "--max-queue", "1024",
                        "--max-context", str(context), "--device", device, "--log-level", "warning",
                        "--model-name", "bench")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, text = None, 0, []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                if c["text"]:
                    first = first or time.perf_counter()
                    text.append(c["text"])
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": tokens, "text": "".join(text)}


async def run_level(url: str, prompts: list[str], max_tokens: int, clients: int) -> tuple[list[dict], float]:
    queue: asyncio.Queue = asyncio.Queue()
    for i, p in enumerate(prompts):
        queue.put_nowait((i, p))
    results: list[dict | None] = [None] * len(prompts)

    async def worker(client):
        while not queue.empty():
            i, p = queue.get_nowait()
            results[i] = await one_request(client, url, p, max_tokens)

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall  # type: ignore[return-value]


def transformers_loop(model_dir: Path, prompts: list[str], max_tokens: int, device: str) -> tuple[list[dict], float]:
    tok = Tokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    # Our engine never samples the padded vocabulary tail (ids past the tokenizer's); a random
    # model often ranks them first, so transformers is told the same to give the same text.
    padded = list(range(tok.vocab_size, model.config.vocab_size))
    results = []
    t_all = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([tok.encode(p)], device=device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=tok.eod_id, pad_token_id=tok.eod_id,
                                 suppress_tokens=padded or None)
        dt = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        results.append({"latency": dt, "ttft": float("nan"), "tokens": len(new), "text": tok.decode(new)})
    return results, time.perf_counter() - t_all


def summarize(name: str, clients: int, results: list[dict], wall: float) -> dict:
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] == r["ttft"])
    tokens = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    return {"mode": name, "clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_latency_s": statistics.median(lat), "p95_latency_s": pct(lat, 0.95),
            "p50_ttft_s": statistics.median(ttft) if ttft else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: a random 160M-shaped one)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "polycoder-bench-160m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-context", type=int, default=512, help="KV cache length per row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "benchmarks" / "serve.json")
    args = ap.parse_args()

    model_dir = args.model or build_model(args.work)
    prompts = make_prompts(args.requests)
    rows, texts = [], {}
    proc, url = start(model_dir, max(args.concurrency), args.max_context, args.device)
    try:
        asyncio.run(run_level(url, prompts[:2], 4, 2))  # warm-up
        for c in args.concurrency:
            results, wall = asyncio.run(run_level(url, prompts, args.max_tokens, c))
            name = "server, one after another" if c == 1 else "server, concurrent"
            rows.append(summarize(name, c, results, wall))
            texts[c] = [r["text"] for r in results]
            print(f"  {name} x{c}: {rows[-1]['tokens_per_s']:.1f} tok/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    if not args.skip_transformers:
        results, wall = transformers_loop(model_dir, prompts, args.max_tokens, args.device)
        rows.append(summarize("transformers generate, loop", 1, results, wall))
        texts["transformers"] = [r["text"] for r in results]
    base = next((r for r in rows if r["clients"] == 1 and r["mode"].startswith("server")), rows[0])
    for r in rows:
        r["speedup_vs_one_after_another"] = r["tokens_per_s"] / base["tokens_per_s"]
    same = {k: v == texts[args.concurrency[0]] for k, v in texts.items()}

    header = ("| mode | clients | requests | tokens | wall s | tokens/s | p50 latency s | p95 latency s | p50 TTFT s | "
              "x vs one-by-one |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {r['p50_latency_s']:.2f} | {r['p95_latency_s']:.2f} | "
                     f"{r['p50_ttft_s']:.2f} | {r['speedup_vs_one_after_another']:.2f} |")
    print("\n".join(lines))
    print(f"greedy texts equal to the one-after-another run: {same}")
    report = {"model": str(model_dir), "device": args.device, "max_tokens": args.max_tokens,
              "max_context": args.max_context,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cpu_description(),
                          "load_avg": os.getloadavg()},
              "rows": rows, "greedy_texts_equal": same}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
