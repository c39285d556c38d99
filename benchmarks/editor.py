"""Benchmark editing sessions replayed against a running server: an editor typing at the cursor.

Each session takes a real held-out file (`--data RAW/heldout`, the layout `polycoder data
fetch` makes; without it, this repository's own `src/` files, which the output says), a
seeded cursor at the start of a line's code, and the next `--chars` characters of the file
taken out: the user types them back, `--every` characters (keystrokes) a request, as an
editor re-asks while the user types. Each request sends what an editor sends:

- prefix = the window's text before the cursor, suffix = the rest of the window after it
  (constant while typing: the file after the removed characters);
- the window: whole lines around the cursor, as llama.vscode sends them (256 lines before,
  64 after). `--window client` (the default) cuts them to a token budget before sending (the
  tiny model's context less `--max-tokens` and a few tokens; `--window-160m` for the 160M
  shape): the lines nearest the cursor kept, 3/4 of the budget to the prefix and 1/4 to the
  suffix (llama.cpp's ratio), less the room the typed characters need. `--window server`
  sends the 256 and 64 lines as they are, as llama.vscode does, and the server cuts them to
  its context (`polycoder.fim.fit`). The window is chosen once a session and kept while
  typing. `--window follow` is `server` with llama.vscode's window taken again at each
  request: a typed newline moves it down a line, so in a long file the prefix's first line
  leaves it (the suffix's lines, counted from the cursor, stay);
- `--extra-chunks N` (default 0): /infill also sends llama.vscode's ring of extra context,
  `input_extra`: N chunks of 64 lines (its ring_n_chunks and ring_chunk_size are 16 and
  64) from other files of the same pool, seeded, the same N while a session types (the ring
  changes when the user yanks, saves or switches files, not as they type). Far more than a
  2,048-token context holds: each server keeps what its own rules leave room for;
- `/infill` (llama.vscode's shape: input_prefix, input_suffix, n_predict, cache_prompt),
  `/v1/completions` with `suffix` (Continue's / OpenAI's), and Tabby's two templating backends,
  `/completion` (`llama.cpp/completion`) and `/api/generate` (`ollama/completion`), each
  sending `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>` as its prompt (`--routes`:
  infill, completions, tabby, tabby-ollama), each on a server of its own (an empty prompt
  cache); streamed, greedy.

Each request is read until its first event (a piece of text, or the end when the suffix's
stop rule ends it at once): that is its time to first token (TTFT, over HTTP, from send).
It then streams on for `--dwell` seconds (the user typing the next keys) and the client
closes the connection (an editor's abort) before sending the next one: the new request
cancels the last. One difference from an editor: a request is never aborted before its
first token, so that every request has a TTFT.

Prefill tokens per request = the delta of the server's `polycoder_prefill_tokens_total`
between one request and the next (requests run one at a time), cached tokens the delta of
`polycoder_prefill_reused_tokens_total`. Per model, the same sessions run with the prompt
cache on (`--prompt-cache-mb` default) in the served order SPM and PSM (`--fim-order`), and
with it off (`--prompt-cache-mb 0`, SPM: with nothing reused the order changes no count).
In PSM the typed characters land right after the prefix, before the suffix, so the suffix
is recomputed every keystroke; in SPM the prefix is last and all before its tail is cached.

Models (temporary folders; the weights are untrained for the sentinels, fine for timing):
- tiny: the bundled polycoder-tiny (512 context). While its tokenizer has no FIM tokens, a
  copy with them is built (`Tokenizer.with_fim_tokens()`, the embedding grown to hold them
  by `polycoder.checkpoint.grow_vocabulary`); once the bundled model has them (its FIM
  phase), it is served as it is and the table says so.
- 160m: PolyCoder-160M's shape with random weights (`--random-init`, 2048 context), served
  with the bundled code tokenizer plus the FIM tokens (`--tokenizer`; its 50304 rows hold
  them), as benchmarks/prompt_cache.py serves it without them.
`--url` measures a server that already runs (as it is configured: one row a route; the routes
share its prompt cache, so the second replays sessions the first left cached: give one).

`--precision fp32|bf16|int8` sets the weights of every server (ours: `--dtype bfloat16`,
`--quantize int8`). `--llama-server PATH` (`make llama-cpp` puts one in .venv/bin) adds
llama.cpp's own server on the same weights (our GGUF export: f32, f16 or q8_0) for the /infill
route: started as `llama-server -m MODEL.gguf -c CONTEXT -np 1 -t 2 --metrics`, once as it
comes and once with each `--cache-reuse N` of `--llama-cache-reuse` (default 256, what
llama.vscode's README tells its users to add): llama.cpp then moves cached chunks of at least N
tokens that the new prompt holds further on (the suffix, in PSM) to their new place instead of
recomputing them. llama.cpp lays /infill out in PSM; its `--spm-infill` (`--llama-spm`: a row
with it) is `<fim_suffix>S<fim_prefix>P<fim_middle>`, not StarCoder's SPM that our models
learnt (`<fim_prefix><fim_suffix>S<fim_middle>P`): a row for timing only. Its prefill and
cached tokens come from its own /metrics (`llamacpp:prompt_tokens_total`,
`llamacpp:prompt_tokens_cached_total`).
`--llama-batch N` starts it with `-b N -ub N` (llama.vscode's README runs it with 1024: its
/infill keeps 3/4 of a batch of prefix and 1/4 of suffix, so its default batch, 2,048,
sends a full 2,048-token context past its limit). A request a server refuses (a 4xx) is
counted in the table, not timed.

Usage:
    .venv/bin/python benchmarks/editor.py [--models tiny 160m] [--data RAW/heldout] [--sessions 3]
        [--chars 18] [--every 3] [--routes infill completions] [--window client|server] [--window-160m 768]
        [--precision fp32|bf16|int8] [--url URL]
        [--llama-server .venv/bin/llama-server [--llama-cache-reuse 256 16] [--llama-batch 1024] [--llama-spm]]
        [--note TEXT] [--json out/benchmarks/editor.json]

The default run (both models, 3 sessions of 18 characters) takes about 3 minutes on 2 cores;
`--sessions 12 --chars 60 --window-160m 2000` is a bigger one.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from machine import cpu_line
from report import publish
from server import start_llama_server, start_server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from polycoder import checkpoint, kernels  # noqa: E402
from polycoder.locate import BUNDLED_DIR  # noqa: E402
from polycoder.tokenizer import Tokenizer  # noqa: E402

EXTENSIONS = {".c", ".h", ".cs", ".cpp", ".cc", ".hpp", ".go", ".java", ".js", ".php", ".py", ".rb", ".rs", ".scala",
              ".ts"}
ROUTES = {"infill": "/infill", "completions": "/v1/completions + suffix",
          "tabby": "/completion, Tabby's template", "tabby-ollama": "/api/generate, Tabby's template"}
PATHS = {"infill": "/infill", "completions": "/v1/completions", "tabby": "/completion", "tabby-ollama": "/api/generate"}
TEMPLATE = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
"""Tabby's `prompt_template` for a StarCoder-style model (its llama.cpp and Ollama backends)."""
PRECISIONS = {"fp32": ([], "f32"), "bf16": (["--dtype", "bfloat16"], "f16"), "int8": (["--quantize", "int8"], "q8_0")}
"""Each --precision: our server's options and the GGUF type llama.cpp gets (f16: its half
precision for bf16 weights, whose values f16 holds but for the exponent range; q8_0: its int8)."""
LINES_BEFORE, LINES_AFTER = 256, 64
"""llama.vscode's defaults (n_prefix, n_suffix): lines sent before and after the cursor."""
RING_CHUNK_LINES = 64
"""llama.vscode's ring_chunk_size: lines a chunk of extra context."""


@dataclass
class Session:
    """One file being edited: the window's text before the cursor, the characters to type, the
    window's text after them."""

    name: str
    before: str
    typed: str
    after: str
    extra: list[dict]
    """/infill's `input_extra`: llama.vscode's ring of chunks of other files (`--extra-chunks`)."""
    follow: bool = False
    """`before` is the whole file before the cursor, and each request sends its last LINES_BEFORE
    lines (with what was typed), as llama.vscode takes its window at each request."""

    def prefix(self, typed: int) -> str:
        """The prefix sent once `typed` characters are typed."""
        text = self.before + self.typed[:typed]
        if not self.follow:
            return text
        lines = text.split("\n")  # as llama.vscode counts lines (splitlines also splits at form feeds)
        return "\n".join(lines[max(0, len(lines) - 1 - LINES_BEFORE) :])  # the last is the cursor's


def source_files(data: Path | None, count: int, seed: int) -> tuple[list[Path], list[Path], str]:
    """`count` seeded files, one language after another, from `data` (RAW/heldout/LANG/...),
    else from this repository's src/; all the files they were picked from; and where they
    came from, in words."""
    rng = random.Random(seed)
    if data is not None and data.is_dir():
        by_lang = {d.name: sorted(p for p in d.rglob("*") if p.suffix in EXTENSIONS and 2_000 < p.stat().st_size < 200_000)
                   for d in sorted(data.iterdir()) if d.is_dir()}
        langs = [lang for lang, files in by_lang.items() if files]
        rng.shuffle(langs)
        picked = [rng.choice(by_lang[langs[i % len(langs)]]) for i in range(count)]
        return picked, [f for files in by_lang.values() for f in files], f"held-out files from {data}"
    files = sorted(p for p in (REPO / "src").rglob("*.py") if p.stat().st_size > 2_000)
    why = f"{data} not found" if data is not None else "no --data given"
    return rng.sample(files, min(count, len(files))), files, f"this repository's src/ files ({why})"


def ring_chunks(pool: list[Path], editing: Path, count: int, rng: random.Random) -> list[dict]:
    """llama.vscode's ring of extra context: `count` chunks of RING_CHUNK_LINES lines of files
    in `pool` other than the one being edited, as `input_extra` items."""
    others = [p for p in pool if p != editing]
    chunks = []
    for _ in range(count if others else 0):
        path = rng.choice(others)
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        start = rng.randrange(max(1, len(lines) - RING_CHUNK_LINES + 1))
        chunks.append({"text": "".join(lines[start : start + RING_CHUNK_LINES]), "filename": path.name})
    return chunks


def session(path: Path, tok: Tokenizer, budget: int | None, chars: int, rng: random.Random,
            extra: list[dict], follow: bool = False) -> Session:
    """A seeded cursor in `path` (at a line's first non-blank character, with code on both
    sides), the next `chars` characters taken out, and the window that fits `budget` tokens
    (None: the lines as llama.vscode sends them, for the server to cut; `follow`: taken
    again at each request); `extra` goes with every request on /infill."""
    text = path.read_text(errors="replace")
    lines = text.splitlines(keepends=True)
    candidates = [i for i in range(len(lines) // 4, 3 * len(lines) // 4) if lines[i].strip()] or [len(lines) // 2]
    i = rng.choice(candidates)
    col = len(lines[i]) - len(lines[i].lstrip())
    cursor = sum(len(line) for line in lines[:i]) + col
    typed = text[cursor : cursor + chars]
    above, head = lines[max(0, i - LINES_BEFORE) : i], lines[i][:col]
    rest = text[cursor + len(typed) :].splitlines(keepends=True)[: LINES_AFTER + 1]
    name = f"{path.parent.name}/{path.name}"
    if follow:
        return Session(name, text[:cursor], typed, "".join(rest), extra, follow=True)
    if budget is None:
        return Session(name, "".join(above) + head, typed, "".join(rest), extra)
    prefix_budget = 3 * budget // 4 - len(tok.encode(typed)) - 2
    suffix_budget = budget - 3 * budget // 4 - 3  # the three sentinels
    while above and len(tok.encode("".join(above) + head)) > prefix_budget:
        above = above[max(1, len(above) // 16) :]  # drop the lines farthest from the cursor
    while rest and len(tok.encode("".join(rest))) > suffix_budget:
        rest = rest[: -max(1, len(rest) // 16)]
    return Session(name, "".join(above) + head, typed, "".join(rest), extra)


def counter(metrics: str, name: str) -> float:
    m = re.search(rf"^{name}_total ([0-9.e+]+)$", metrics, re.M)
    return float(m.group(1)) if m else float("nan")


def counts(client: httpx.Client, url: str) -> tuple[float, float]:
    """(prompt tokens prefilled, prompt tokens reused from the cache) so far: ours, or llama.cpp's."""
    text = client.get(url + "/metrics").text
    if "llamacpp:prompt_tokens_total" in text:
        return counter(text, "llamacpp:prompt_tokens"), counter(text, "llamacpp:prompt_tokens_cached")
    return counter(text, "polycoder_prefill_tokens"), counter(text, "polycoder_prefill_reused_tokens")


def body(route: str, prefix: str, suffix: str, max_tokens: int, extra: list[dict]) -> dict:
    """The request an editor sends on `route` (Tabby's two as its backends build them, less `model`:
    the server's one); `extra` is llama.vscode's, on /infill only."""
    if route == "infill":
        return {"input_prefix": prefix, "input_suffix": suffix, "n_predict": max_tokens, "temperature": 0,
                "stream": True, "cache_prompt": True, **({"input_extra": extra} if extra else {})}
    templated = TEMPLATE.format(prefix=prefix, suffix=suffix)
    if route == "tabby":
        return {"seed": 0, "prompt": templated, "n_predict": max_tokens, "temperature": 0, "stream": True,
                "penalty_last_n": 0, "presence_penalty": 0}
    if route == "tabby-ollama":
        return {"prompt": templated, "template": "{{ .Prompt }}", "stream": True,
                "options": {"num_predict": max_tokens, "seed": 0, "repeat_last_n": 0, "temperature": 0}}
    return {"prompt": prefix, "suffix": suffix, "max_tokens": max_tokens, "temperature": 0, "stream": True}


def sse_events(lines):
    """Server-Sent Events' data lines (OpenAI's and llama.cpp's streams)."""
    return (line for line in lines if line.startswith("data:") and line.strip() != "data: [DONE]")


def ndjson_events(lines):
    """Ollama's stream: a JSON object a line."""
    return (line for line in lines if line.strip())


def request(client: httpx.Client, url: str, route: str, prefix: str, suffix: str, max_tokens: int,
            dwell: float, extra: list[dict] | None = None) -> float | None:
    """One streamed request: seconds to its first event; then read for `dwell` seconds and
    close the connection (the editor's abort when the user types on). None: the server
    refused it (a 4xx: llama.cpp's answer to a prompt longer than its context)."""
    path = PATHS[route]
    events = ndjson_events if route == "tabby-ollama" else sse_events
    t0 = time.perf_counter()
    ttft = None
    with client.stream("POST", url + path, json=body(route, prefix, suffix, max_tokens, extra or []), timeout=600) as r:
        if 400 <= r.status_code < 500:
            r.read()
            return None
        r.raise_for_status()
        for _ in events(r.iter_lines()):
            if ttft is None:
                ttft = time.perf_counter() - t0
            if time.perf_counter() - t0 - ttft >= dwell:
                break  # leaving the block closes the connection: the server cancels the row
    if ttft is None:
        raise RuntimeError(f"{path} answered no event")
    return ttft


def replay(url: str, sessions: list[Session], route: str, every: int, max_tokens: int, dwell: float) -> dict:
    """Every session's requests, one at a time: TTFT, prefill and cached tokens of each."""
    out = {"ttft_s": [], "prefill": [], "cached": [], "first_ttft_s": [], "first_prefill": [], "first_cached": [],
           "refused": 0}
    with httpx.Client() as client:
        request(client, url, route, "def warm_up():\n    ", "\n", 1, 0)
        time.sleep(0.1)
        for s in sessions:
            for k in range(0, len(s.typed) + 1, every):
                before = counts(client, url)
                ttft = request(client, url, route, s.prefix(k), s.after, max_tokens, dwell, s.extra)
                if ttft is None:
                    out["refused"] += 1
                    continue
                time.sleep(0.1)  # the engine thread exports its counts after the step that answered
                after = counts(client, url)
                prefill, cached = after[0] - before[0], after[1] - before[1]
                if k == 0:  # the session's first request: the file is new to the cache
                    out["first_ttft_s"].append(ttft)
                    out["first_prefill"].append(prefill)
                    out["first_cached"].append(cached)
                else:
                    out["ttft_s"].append(ttft)
                    out["prefill"].append(prefill)
                    out["cached"].append(cached)
    return out


def summary(label: str, context: int, cache: str, order: str | None, route: str, res: dict, tok: Tokenizer,
            sessions: list[Session]) -> dict:
    """One row of the table: a model, a server configuration and a route."""
    ttft = sorted(res["ttft_s"])

    def median(xs: list) -> float:
        return statistics.median(xs) if xs else float("nan")  # nan: every such request was refused

    return {"model": label, "context": context, "prompt_cache": cache, "fim_order": order or "as served",
            "route": route, "requests": len(ttft), "refused": res["refused"], "ttft_p50_s": median(ttft),
            "ttft_p95_s": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))] if ttft else float("nan"),
            "prefill_tokens_median": median(res["prefill"]),
            "prefill_tokens_mean": statistics.fmean(res["prefill"]) if res["prefill"] else float("nan"),
            "cached_tokens_median": median(res["cached"]),
            "first_request_ttft_s": median(res["first_ttft_s"]),
            "first_request_prefill": median(res["first_prefill"]),
            "prompt_tokens": [len(tok.encode(s.prefix(0))) + len(tok.encode(s.after)) for s in sessions],
            "served_prompt_tokens": [a + b for a, b in zip(res["first_prefill"], res["first_cached"])] or [float("nan")],
            "sessions": [s.name for s in sessions], "raw": res}


def fim_tiny(folder: Path) -> Path:
    """The bundled model with FIM tokens (as it is if it has them, else a grown copy in `folder`)."""
    tok = Tokenizer.from_pretrained(BUNDLED_DIR)
    if tok.fim is not None:
        return BUNDLED_DIR
    model, _ = checkpoint.load_model(BUNDLED_DIR)
    fim_tok = tok.with_fim_tokens()
    grown = checkpoint.grow_vocabulary(model, tok.vocab_size, fim_tok.vocab_size)
    checkpoint.save_checkpoint(grown, fim_tok, folder)
    return folder


def export_gguf(serve_args: list[str], outtype: str, out: Path) -> Path:
    """The served model (the same `--model`, `--random-init`, `--tokenizer`) as a GGUF file of
    `outtype`. Random weights are the server's own draw (both seed 0), each side rounding them
    to its precision."""
    subprocess.run([sys.executable, "-m", "polycoder", "export", "gguf", *serve_args, "--outtype", outtype,
                    "--out", str(out), "--no-check"], check=True, stdout=subprocess.DEVNULL)
    return out


def command_line() -> list[str]:
    """This run's options, but --note's text (printed below the table)."""
    argv = sys.argv[1:]
    if "--note" in argv:
        i = argv.index("--note")
        argv = argv[:i + 1] + ["..."] + argv[i + 2 :]
    return argv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=["tiny", "160m"], default=["tiny", "160m"])
    ap.add_argument("--data", type=Path, default=None,
                    help="RAW/heldout (polycoder data fetch's layout); without it, this repository's src/ files")
    ap.add_argument("--sessions", type=int, default=3, help="files edited, one session each")
    ap.add_argument("--chars", type=int, default=18, help="characters typed a session")
    ap.add_argument("--every", type=int, default=3, help="keystrokes between requests (K)")
    ap.add_argument("--max-tokens", type=int, default=16, help="n_predict / max_tokens of each request")
    ap.add_argument("--dwell", type=float, default=0.1, help="seconds a request streams after its first token")
    ap.add_argument("--extra-chunks", type=int, default=0,
                    help="/infill sends llama.vscode's ring of extra context too: this many chunks of 64 lines of "
                         "other files (its default ring_n_chunks is 16)")
    ap.add_argument("--routes", nargs="+", choices=list(ROUTES), default=["infill"],
                    help="/infill (llama.vscode's shape) and/or /v1/completions with suffix (Continue's / OpenAI's)")
    ap.add_argument("--window", choices=["client", "server", "follow"], default="client",
                    help="client: the window cut to the context before sending; server: llama.vscode's 256 and 64 "
                         "lines sent as they are, the server cuts them; follow: server, the window taken again at "
                         "each request (a typed newline moves it down a line)")
    ap.add_argument("--window-160m", type=int, default=768,
                    help="prompt tokens of the 160M shape's window (its context is 2048; the full one is slow here)")
    ap.add_argument("--url", help="measure this running server instead (as configured; tokenizer: --tokenizer)")
    ap.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                    help="the weights on both servers: fp32; bf16 (llama.cpp: f16); int8 (--quantize int8; "
                         "llama.cpp: q8_0)")
    ap.add_argument("--llama-server", type=Path, default=None,
                    help="llama.cpp's llama-server binary: add its /infill on the same weights (our GGUF export)")
    ap.add_argument("--llama-cache-reuse", type=int, nargs="+", default=[256],
                    help="with --llama-server: a row for each of these --cache-reuse values too")
    ap.add_argument("--llama-batch", type=int, default=None,
                    help="with --llama-server: its -b and -ub (llama.vscode's README runs it with 1024; /infill "
                         "keeps 3/4 of a batch of prefix and 1/4 of suffix); default llama.cpp's own")
    ap.add_argument("--llama-spm", action="store_true",
                    help="with --llama-server: a row with its --spm-infill too (<fim_suffix>S<fim_prefix>P<fim_middle>: "
                         "for timing, a layout our models were not trained on)")
    ap.add_argument("--context", type=int, default=512, help="with --url: the server's context")
    ap.add_argument("--tokenizer", type=Path, default=BUNDLED_DIR, help="with --url: the server's tokenizer folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="a line under the table (how loaded the machine was, ...)")
    ap.add_argument("--json", type=Path, default=None, help="write FILE.json and FILE.md")
    args = ap.parse_args()
    files, pool, source = source_files(args.data, args.sessions, args.seed)
    print(f"sessions over {source}", flush=True)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="polycoder-editor-bench-") as tmp:
        rows = measure(args, files, pool, Path(tmp))
    report(args, files, source, rows, load)


def measure(args: argparse.Namespace, files: list[Path], pool: list[Path], tmp: Path) -> list[dict]:
    """Every model and server configuration's row (servers started in turn, models built in `tmp`;
    the ring's chunks from `pool`)."""
    runs = []  # (model label, context, window tokens, serve args or None, tokenizer)
    if args.url:
        runs.append(("the server at --url", args.context, args.context - args.max_tokens - 8, None,
                     Tokenizer.from_pretrained(args.tokenizer)))
    if "tiny" in args.models and not args.url:
        folder = fim_tiny(tmp / "tiny")
        label = "polycoder-tiny" + (" (FIM-grown copy)" if folder != BUNDLED_DIR else "")
        runs.append((label, 512, 512 - args.max_tokens - 8, ["--model", str(folder)], Tokenizer.from_pretrained(folder)))
    if "160m" in args.models and not args.url:
        fim_tok = Tokenizer.from_pretrained(BUNDLED_DIR).with_fim_tokens()
        fim_tok.save(tmp / "tok160m")
        runs.append(("polycoder-160m shape, random weights", 2048, args.window_160m,
                     ["--model", "polycoder-160m", "--random-init", "--tokenizer", str(tmp / "tok160m")], fim_tok))
    rows = []
    for label, context, window, serve_args, tok in runs:
        rng, ring_rng = random.Random(args.seed), random.Random(args.seed + 1)
        sessions = [session(f, tok, window if args.window == "client" else None, args.chars, rng,
                            ring_chunks(pool, f, args.extra_chunks, ring_rng), follow=args.window == "follow")
                    for f in files]
        # (which server, prompt cache, FIM order, the server's extra options)
        configs = [("ours", "given", None, [])] if serve_args is None else [
            ("ours", "on", "spm", ["--fim-order", "spm"]), ("ours", "on", "psm", ["--fim-order", "psm"]),
            ("ours", "off", "spm", ["--fim-order", "spm", "--prompt-cache-mb", "0"])]
        cases = list(itertools.product(configs, args.routes))
        gguf = None
        if args.llama_server and serve_args is not None:
            gguf = export_gguf(serve_args, PRECISIONS[args.precision][1], tmp / f"{len(rows)}.gguf")
            cases += [(("llama", "llama-server: its slot's", "psm", []), "infill")]
            cases += [(("llama", f"llama-server: its slot's, --cache-reuse {n}", "psm", ["--cache-reuse", str(n)]),
                       "infill") for n in args.llama_cache_reuse]
            if args.llama_spm:
                cases += [(("llama", "llama-server: its slot's", "llama.cpp's SPM", ["--spm-infill"]), "infill")]
        for (server, cache, order, options), route in cases:
            proc = None
            url = args.url
            if server == "llama":  # llama.cpp's own server, as llama.vscode's users run it
                batch = ["-b", str(args.llama_batch), "-ub", str(args.llama_batch)] if args.llama_batch else []
                proc, url = start_llama_server(str(args.llama_server), str(gguf), "-c", str(context), "-np", "1",
                                               "-t", "2", "--metrics", *batch, *options)
            elif serve_args is not None:  # a fresh server a route: each starts with an empty prompt cache
                proc, url = start_server(*serve_args, *PRECISIONS[args.precision][0], "--max-context", str(context),
                                         "--max-batch-size", "4", "--log-level", "warning", *options)
            try:
                res = replay(url, sessions, route, args.every, args.max_tokens, args.dwell)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
            rows.append(summary(label, context, cache, order, route, res, tok, sessions))
            row = rows[-1]
            print(f"  {label}, cache {cache}, {row['fim_order']}, {route}: TTFT p50 {row['ttft_p50_s']:.3f} s, "
                  f"p95 {row['ttft_p95_s']:.3f} s, prefill {row['prefill_tokens_median']:.0f} tokens", flush=True)
    return rows


def report(args: argparse.Namespace, files: list[Path], source: str, rows: list[dict], load: tuple) -> None:
    n_req = len(range(0, args.chars + 1, args.every)) - 1
    names = rows[0]["sessions"] if rows else []
    lines = [f"CPU: {cpu_line()}; {os.cpu_count()} logical CPUs; load average before: "
             f"{', '.join(f'{x:.2f}' for x in load)}, after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
             f"code path: the server's default backend, {args.precision}, native "
             f"kernels {kernels.status()}" + (f"; llama.cpp: llama-server (`make llama-cpp`), "
                                              f"{PRECISIONS[args.precision][1]} GGUF of the same model, -np 1 -t 2"
                                              if args.llama_server else ""),
             f"{len(files)} sessions over {source} ({', '.join(names)}); {args.chars} characters "
             f"typed a session, a request every {args.every} keystrokes ({n_req} after the session's first); "
             + (f"/infill with {args.extra_chunks} chunks of {RING_CHUNK_LINES} lines of other files as input_extra; "
                if args.extra_chunks else "") +
             f"n_predict {args.max_tokens}, "
             f"greedy, streamed, each aborted {args.dwell} s after its first token by the next",
             f"Run: benchmarks/editor.py {' '.join(command_line())}",
             "TTFT and prefill tokens are per typing request (the session's first request, cold, apart); "
             "prefill tokens from the server's /metrics deltas; "
             + ("the window cut to the context before sending" if args.window == "client" else
                "llama.vscode's 256 and 64 lines sent as they are"
                + (", taken again at each request" if args.window == "follow" else "")
                + ", cut by the server (window tokens: as sent; served: the first request's prefill and cached tokens)"),
             "",
             "| model | context | prompt cache | FIM order | route | window prompt tokens (median) "
             "| served prompt tokens (median) | requests answered | refused | TTFT p50 s "
             "| TTFT p95 s | prefill tokens a request (median) | cached tokens a request (median) "
             "| first request TTFT s | first request prefill |",
             "|" + "---|" * 15]
    for r in rows:
        lines.append(f"| {r['model']} | {r['context']} | {r['prompt_cache']} | {r['fim_order']} | {ROUTES[r['route']]} "
                     f"| {statistics.median(r['prompt_tokens']):.0f} | {statistics.median(r['served_prompt_tokens']):.0f} "
                     f"| {r['requests']} | {r['refused']} | {r['ttft_p50_s']:.3f} "
                     f"| {r['ttft_p95_s']:.3f} | {r['prefill_tokens_median']:.0f} | {r['cached_tokens_median']:.0f} "
                     f"| {r['first_request_ttft_s']:.3f} | {r['first_request_prefill']:.0f} |")
    publish({"cpu": cpu_line(), "kernels": kernels.status(), "argv": command_line(), "source": source,
             "files": [str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f) for f in files],
             "precision": args.precision,
             "chars": args.chars, "every": args.every, "routes": args.routes, "max_tokens": args.max_tokens,
             "extra_chunks": args.extra_chunks,
             "window": args.window,
             "dwell_s": args.dwell, "note": args.note, "rows": rows},
            "\n".join(lines + (["", args.note] if args.note else [])) + "\n", args.json)


if __name__ == "__main__":
    main()
