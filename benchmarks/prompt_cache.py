"""Benchmark the server's prompt cache: an editor's keystrokes against a cold prompt.

An editor sends the whole buffer again every few keystrokes. For each model, a real server
on 127.0.0.1 gets, a few rounds over: one cold prompt (a buffer no request has sent before,
about `--tokens` tokens, made new each round by its first line) and then `--keystrokes`
prompts that each add a character or two to the last. Each request asks for one token
(max_tokens 1, not streamed), so its latency is the time to the first token, end to end
over HTTP; the tokens its prefill ran come from the server's /metrics
(polycoder_prefill_tokens before and after: the requests run one at a time). The same runs
with the prompt cache on (`--prompt-cache-mb`, default size) and off (0).

Models: the bundled polycoder-tiny (512 context) and PolyCoder-160M's shape with random
weights (`--random-init`, 2048 context, the bundled code tokenizer; random weights prefill
at the speed of trained ones). The issue's target: a keystroke extending a 1,500-token
prompt costs at most a third of the cold request's latency with the cache.

Usage:
    .venv/bin/python benchmarks/prompt_cache.py [--models tiny 160m] [--rounds 3] [--keystrokes 5]
        [--tokens 1500] [--json out/benchmarks/prompt_cache.json]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import httpx
from machine import cpu_line
from report import publish
from server import start_server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from polycoder.locate import BUNDLED_DIR  # noqa: E402
from polycoder.tokenizer import Tokenizer  # noqa: E402

# What the cold prompt is made of: code of several kinds, repeated with numbered names.
CODE = (
    "def handler_{i}(request, session):\n    user = session.get(request.user_id)\n"
    "    if user is None:\n        raise NotFound(f'no user {{request.user_id}}')\n"
    "    items = [item for item in user.items if item.active]\n    return render(items, page={i})\n\n\n"
    "class Cache{i}:\n    def __init__(self, size):\n        self.size = size\n        self.data = {{}}\n\n"
    "    def get(self, key, default=None):\n        return self.data.get(key, default)\n\n\n"
)
TYPED = "result = handler_0(request, session)\n    cache.put(key, result)\n"
MODELS = {
    "tiny": ("polycoder-tiny", 512, ["--model", "polycoder-tiny"]),
    "160m": ("polycoder-160m shape, random weights", 2048,
             ["--model", "polycoder-160m", "--random-init", "--tokenizer", str(BUNDLED_DIR)]),
}


def buffer(tok: Tokenizer, round_: int, tokens: int) -> str:
    """A cold buffer of about `tokens` tokens, its first line unique to the round."""
    text, i = f"# session {round_} of the benchmark\n", 0
    while len(tok.encode(text)) < tokens:
        text += CODE.format(i=i)
        i += 1
    ids = tok.encode(text)[:tokens]
    return tok.decode(ids).rstrip(" ") + "\n    "  # the cursor, indented


def prefill_tokens(url: str) -> float:
    m = re.search(r"^polycoder_prefill_tokens_total ([0-9.e+]+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else float("nan")


def first_token(url: str, prompt: str) -> tuple[float, float]:
    """(seconds to the first token, prompt tokens prefilled) of one request."""
    before = prefill_tokens(url)
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0}, timeout=600)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt, prefill_tokens(url) - before


def measure(args_: list[str], context: int, tok: Tokenizer, tokens: int, rounds: int, keystrokes: int,
            cache_mb: str | None) -> dict:
    extra = ["--prompt-cache-mb", cache_mb] if cache_mb is not None else []
    proc, url = start_server(*args_, "--max-context", str(context), "--max-batch-size", "4", "--log-level",
                             "warning", *extra)
    try:
        first_token(url, "def warm_up():\n    return")
        cold, keys = [], []
        for r in range(rounds):
            text = buffer(tok, r, tokens)
            cold.append(first_token(url, text))
            for k in range(keystrokes):
                text += TYPED[2 * k : 2 * k + 2]  # two characters a keystroke
                keys.append(first_token(url, text))
    finally:
        proc.terminate()
        proc.wait(30)
    return {"prompt_tokens": len(tok.encode(text)), "cold_s": [c[0] for c in cold], "cold_prefill": [c[1] for c in cold],
            "keystroke_s": [k[0] for k in keys], "keystroke_prefill": [k[1] for k in keys]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "160m"])
    ap.add_argument("--rounds", type=int, default=3, help="cold prompts (each followed by its keystrokes)")
    ap.add_argument("--keystrokes", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1500, help="cold prompt tokens (less where the context is shorter)")
    ap.add_argument("--json", type=Path, default=None, help="write FILE.json and FILE.md")
    args = ap.parse_args()
    tok = Tokenizer.from_pretrained(BUNDLED_DIR)
    rows = []
    for name in args.models:
        label, context, serve_args = MODELS[name]
        tokens = min(args.tokens, context - 2 * args.keystrokes - 16)
        for cache_mb in (None, "0"):
            res = measure(serve_args, context, tok, tokens, args.rounds, args.keystrokes, cache_mb)
            cold, key = statistics.median(res["cold_s"]), statistics.median(res["keystroke_s"])
            rows.append({"model": label, "context": context, "prompt_cache": "on (default)" if cache_mb is None else "off",
                         "cold_tokens": tokens, "cold_ttft_s": cold, "keystroke_ttft_s": key, "ratio": key / cold,
                         "cold_prefill_tokens": statistics.median(res["cold_prefill"]),
                         "keystroke_prefill_tokens": statistics.median(res["keystroke_prefill"]), "raw": res})
            print(f"  {label}, cache {rows[-1]['prompt_cache']}: cold {cold:.3f} s, keystroke {key:.3f} s", flush=True)
    lines = [f"CPU: {cpu_line()}; {os.cpu_count()} logical CPUs; load average before: "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
             f"{args.rounds} cold prompts, each followed by {args.keystrokes} keystrokes (+2 characters each); "
             "medians; time to first token = a max_tokens=1 request over HTTP", "",
             "| model | context | prompt cache | cold prompt tokens | cold TTFT s | keystroke TTFT s | keystroke / cold "
             "| prefill tokens cold | prefill tokens a keystroke |",
             "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['context']} | {r['prompt_cache']} | {r['cold_tokens']} | {r['cold_ttft_s']:.3f} "
                     f"| {r['keystroke_ttft_s']:.3f} | {r['ratio']:.2f} | {r['cold_prefill_tokens']:.0f} "
                     f"| {r['keystroke_prefill_tokens']:.0f} |")
    publish({"cpu": cpu_line(), "rounds": args.rounds, "keystrokes": args.keystrokes, "rows": rows},
            "\n".join(lines) + "\n", args.json)


if __name__ == "__main__":
    main()
