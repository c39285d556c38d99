"""Our decode end to end under two settings, alternating pass by pass: tokens/s and B / A.

`benchmarks/kernel_ab.py` compares two builds of the products alone; whether a change pays
is decided by whole decode steps (attention, LayerNorms, the Python around the call, the
output head). The setting is the process environment the kernels read when they are built
(`POLYCODER_KERNELS_ISA=avx2` against the native variant, or `POLYCODER_KERNELS=0` against
them), so each side is its own worker process holding the same weights, and the two take
turns, one pass each, in the order A B B A round after round: a machine shared with other
work slows both alike, and a drift in load between rounds cancels. Nothing runs beside the
pass being timed (the other worker waits on its pipe).

    python benchmarks/decode_ab.py --a POLYCODER_KERNELS_ISA=avx2 --json ab.json
    python benchmarks/decode_ab.py --a POLYCODER_KERNELS=0 --engines ours-fp32 --batches 1,8

Reported per engine, batch and prompt: each side's best and median decode tokens/s, the
ratio of the bests and the median of the per-round ratios (B over A: above 1, B is faster).
Weights: a preset with random weights (seeded, as benchmarks/decode.py makes them) or a
model folder. Writes JSON (and Markdown next to it); prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from decode import ENGINES, Shape, _model_folder
from machine import cpu_line
from report import publish

from polycoder.backend import physical_cores
from polycoder.locate import BUNDLED_DIR
from polycoder.tokenizer import Tokenizer

OURS = [e for e in ENGINES if e.startswith("ours-")]


def parse_env(text: str) -> dict[str, str]:
    """'NAME=value NAME2=value2' (or empty: the environment as it is) -> the variables to set."""
    env = {}
    for item in text.split():
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise SystemExit(f"--a/--b: {item!r} is not NAME=value")
        env[name] = value
    return env


def serve(folder: Path, threads: int) -> None:
    """A worker: runs one pass for every request line on stdin, answers a JSON line on stdout."""
    from polycoder import kernels

    torch.set_num_threads(threads)
    shapes: dict[str, Shape] = {}
    for line in sys.stdin:
        req = json.loads(line)
        engine = req["engine"]
        if engine not in shapes:
            shapes[engine] = Shape(folder.name, folder, [engine], threads, [], req["max_ctx"], folder.parent)
        prompts = req["prompts"]
        prefill, decode = shapes[engine].run(engine, prompts, req["new_tokens"], False)
        print(json.dumps({"prefill_s": prefill, "decode_s": decode, "kernels": kernels.status()}), flush=True)


class Worker:
    def __init__(self, env: dict[str, str], folder: Path, threads: int):
        full = {**os.environ, **env}
        self.env = env
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full)

    def run(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the worker with {self.env or 'the environment as is'} ended (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="POLYCODER_KERNELS_ISA=avx2", help="side A's environment: NAME=value ... ('' for as is)")
    ap.add_argument("--b", default="", help="side B's environment (default: as is)")
    ap.add_argument("--model", default="polycoder-160m", help="a preset (random weights) or a model folder")
    ap.add_argument("--engines", default="ours-fp32,ours-bf16,ours-int8", help=f"of {OURS}")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompts", default="64", help="prompt lengths in tokens")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4, help="rounds of A B B A passes")
    ap.add_argument("--threads", type=int, default=0, help="0: one a physical core")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = args.threads or physical_cores()
    if args.serve:
        serve(args.serve, threads)
        return {}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if set(engines) - set(OURS):
        ap.error(f"--engines: choose from {OURS}")
    env_a, env_b = parse_env(args.a), parse_env(args.b)
    tok = Tokenizer.from_pretrained(BUNDLED_DIR)
    work = Path(tempfile.mkdtemp(prefix="decode-ab-"))
    notes: list[str] = []
    rows = []
    try:
        folder = _model_folder(args.model, work, tok, notes)
        if folder is None:
            raise SystemExit("; ".join(notes))
        sides = {"A": Worker(env_a, folder, threads), "B": Worker(env_b, folder, threads)}
        status = {}
        try:
            for B in (int(b) for b in args.batches.split(",")):
                for T in (int(t) for t in args.prompts.split(",")):
                    g = torch.Generator().manual_seed(B * 1000 + T)
                    prompts = torch.randint(3, tok.vocab_size, (B, T), generator=g).tolist()
                    req = dict(prompts=prompts, max_ctx=T + args.new_tokens + 8)
                    for e in engines:
                        for name, w in sides.items():  # warm-up: load, build the plans
                            status[name] = w.run(engine=e, new_tokens=4, **req)["kernels"]
                        tps = {"A": [], "B": []}
                        for r in range(args.rounds):
                            for name in ("A", "B", "B", "A") if r % 2 == 0 else ("B", "A", "A", "B"):
                                t = sides[name].run(engine=e, new_tokens=args.new_tokens, **req)["decode_s"]
                                tps[name].append(B * (args.new_tokens - 1) / t)
                            print(f"  {e} B={B} T={T} round {r}: A {tps['A'][-1]:.1f} B {tps['B'][-1]:.1f} tok/s", flush=True)
                        # a round's ratio: B's two passes against A's two
                        per_round = [(tps["B"][2 * i] + tps["B"][2 * i + 1]) / (tps["A"][2 * i] + tps["A"][2 * i + 1])
                                     for i in range(args.rounds)]
                        rows.append({"engine": e, "batch": B, "prompt": T, "a_tokens_per_s": tps["A"], "b_tokens_per_s": tps["B"],
                                     "a_best": max(tps["A"]), "b_best": max(tps["B"]),
                                     "a_median": statistics.median(tps["A"]), "b_median": statistics.median(tps["B"]),
                                     "b_over_a_best": max(tps["B"]) / max(tps["A"]),
                                     "b_over_a_median_round": statistics.median(per_round)})
        finally:
            for w in sides.values():
                w.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"cpu": cpu_line(), "threads": threads, "torch": torch.__version__, "model": args.model,
               "a": args.a, "b": args.b, "kernels": status, "new_tokens": args.new_tokens, "rounds": args.rounds,
               "rows": rows, "notes": notes}
    publish(results, markdown(results), args.json)
    return results


def markdown(r: dict) -> str:
    out = [f"# Decode A/B ({r['model']}, {r['threads']} threads, {r['new_tokens']} new tokens, {r['rounds']} rounds "
           f"of A B B A, torch {r['torch']})", "",
           f"CPU: {r['cpu']}", "",
           f"A: `{r['a'] or '(as is)'}`: kernels {r['kernels'].get('A')}; "
           f"B: `{r['b'] or '(as is)'}`: kernels {r['kernels'].get('B')}", "",
           "| engine | batch | prompt | A best | A median | B best | B median | B / A (bests) | B / A (median of rounds) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        out.append(f"| {x['engine']} | {x['batch']} | {x['prompt']} | {x['a_best']:.1f} | {x['a_median']:.1f} | "
                   f"{x['b_best']:.1f} | {x['b_median']:.1f} | {x['b_over_a_best']:.2f}x | {x['b_over_a_median_round']:.2f}x |")
    if r["notes"]:
        out += ["", "Notes:", *[f"- {n}" for n in r["notes"]]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
