"""Speculative decoding with prompt-lookup drafts against plain decoding, on real code.

Acceptance depends on the text, so the prompts are real files the model has not been
trained on: this Python's own standard library (`--files`), each prompt the first
`--prompt-tokens` tokens of a file cut at a line end, the completion `--new-tokens` tokens,
greedy or sampled at `--temperature` (seeded: a prompt gets the same sample in every run).
For each draft length k (`--drafts`), and plain decoding, every prompt is completed
one at a time (an editor's request) and the runs go round-robin, `--repeats` times, so a
machine shared with other work slows all of them alike; the best pass is compared, every
pass is in the JSON. Each speculative completion is checked to be the plain one token for
token (greedy, and sampled with the same seed), and the acceptance rate (drafted tokens kept) and the forward passes per
token are reported.

    python benchmarks/speculative.py --json speculative.json
    python benchmarks/speculative.py --model FOLDER --drafts 4,8 --prompts 8
    python benchmarks/speculative.py --temperature 0.8 --drafts 4

Writes JSON (and Markdown next to it); prints a table. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch
from machine import cpu_description, cpu_line
from report import publish

from polycoder import kernels
from polycoder.backend import choose
from polycoder.checkpoint import load_model
from polycoder.generation import SamplingParams
from polycoder.generation.engine import Engine
from polycoder.generation.sampling import sample_generator
from polycoder.generation.text import Sequence


def real_prompts(tok, root: Path, count: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """The first `prompt_tokens` tokens (cut back to a line end) of `count` seeded files."""
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and p.stat().st_size > 4000)
    random.Random(seed).shuffle(files)
    prompts = []
    for f in files:
        ids = tok.encode(f.read_text(errors="replace"))[:prompt_tokens]
        text = tok.decode(ids)
        cut = text.rfind("\n")
        if cut > len(text) // 2:
            prompts.append(tok.encode(text[: cut + 1]))
        if len(prompts) == count:
            break
    return prompts


def complete(model, tok, ids: list[int], new_tokens: int, speculate: int, temperature: float = 0.0,
             index: int = 0) -> tuple[list[int], float, dict]:
    """One completion (prompt `index`'s sample at `temperature`) on a fresh engine; (tokens,
    decode seconds, engine stats)."""
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eod=False, temperature=temperature, seed=0)
    engine = Engine(model, tok, max_rows=1, max_len=min(model.config.block_size, len(ids) + new_tokens + 1),
                    speculate=speculate)
    engine.add([Sequence(ids, params, tok, sample_generator(0, index, 0))])
    seq = engine.rows[0]
    start = time.perf_counter()
    while engine.rows:
        engine.step()
    return seq.token_ids, time.perf_counter() - start, engine.stats


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default=None, choices=["int8", "int4"])
    ap.add_argument("--files", type=Path, default=Path(os.__file__).parent, help="real code the model was not trained on")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--drafts", default="3,5,7", help="draft lengths k to compare with plain decoding")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled, seeded")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave PyTorch's default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    new_tokens = min(args.new_tokens, model.config.block_size - args.prompt_tokens - 1)
    prompts = real_prompts(tok, args.files, args.prompts, min(args.prompt_tokens, model.config.block_size - new_tokens - 1))
    ks = [0, *[int(k) for k in args.drafts.split(",")]]
    complete(model, tok, prompts[0], 8, 0)  # warm-up: kernel plans, first-call allocations
    passes: dict[int, list[float]] = {k: [] for k in ks}
    stats = {k: {"forwards": 0, "drafted": 0, "accepted": 0} for k in ks}
    plain: list[list[int]] = []
    identical = {k: True for k in ks}
    tokens_total = 0  # the same in every pass: completions of fixed length
    for rep in range(args.repeats):
        for k in ks:
            seconds, tokens = 0.0, 0
            for i, ids in enumerate(prompts):
                out, dt, st = complete(model, tok, ids, new_tokens, k, args.temperature, i)
                seconds, tokens = seconds + dt, tokens + len(out)
                if k == 0 and rep == 0:
                    plain.append(out)
                elif out != plain[i]:
                    identical[k] = False
                if rep == 0:
                    for key in stats[k]:  # the engine counts more (prefill, prompt cache)
                        stats[k][key] += st[key]
            passes[k].append(tokens / seconds)
            tokens_total = tokens
    rows = []
    for k in ks:
        best = max(passes[k])
        st = stats[k]
        rows.append({"engine": "plain" if k == 0 else f"lookup k={k}", "draft": k, "tokens_per_s": best,
                     "passes": passes[k], "speedup": best / max(passes[0]),
                     "acceptance": st["accepted"] / st["drafted"] if st["drafted"] else None,
                     "tokens_per_forward": tokens_total / st["forwards"] if st["forwards"] else None,
                     "identical_to_plain": identical[k]})
    result = {"cpu": cpu_description(), "cpu_line": cpu_line(), "kernels": kernels.status(), "backend": repr(choose("cpu")),
              "model": args.model or "bundled",
              "dtype": args.dtype + (f" {args.quantize}" if args.quantize else ""), "threads": torch.get_num_threads(),
              "prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": new_tokens,
              "temperature": args.temperature,
              "files": str(args.files), "rows": rows}
    text = markdown(result)
    publish(result, text, args.json)
    return result


def markdown(result: dict) -> str:
    lines = [f"CPU: {result['cpu_line']}; kernels: {result['kernels']}; {result['backend']}",
             f"model {result['model']} ({result['dtype']}), {result['threads']} threads, {result['prompts']} prompts of "
             f"<= {result['prompt_tokens']} tokens from {result['files']}, {result['new_tokens']} tokens each, "
             + ("greedy" if not result.get("temperature") else f"sampled at temperature {result['temperature']}"), "",
             "| decoding | tokens/s (best) | speed-up | drafts kept | tokens a forward pass | same output |",
             "|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        acc = "" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f} %"
        tpf = "" if r["tokens_per_forward"] is None else f"{r['tokens_per_forward']:.2f}"
        lines.append(f"| {r['engine']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {acc} | {tpf} | "
                     f"{'yes' if r['identical_to_plain'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
