"""Decode speed: our engine against transformers' `generate` and llama.cpp, in one run.

For each model shape (random weights, seeded; or a real folder), batch size and prompt
length, every engine generates `--new-tokens` greedy tokens from the same prompts with the
same weights and the same number of threads. Decode speed is what is compared: for our
engine the prefill (`Engine.add`) is timed apart from the decode steps; for transformers
and llama.cpp the time of a 1-token run (prefill + one token) is subtracted from that of
the full run. Engines are run round-robin, `--repeats` times, so that a machine shared
with other work slows all of them alike. The best pass of each engine (the least disturbed
by other work: on a shared machine the load can change twofold between passes) is
reported and compared, the median beside it; every pass is in the JSON.

Memory bandwidth is measured in the same run (a threaded sum over a 512 MiB tensor: a pure
read, as decoding is), and each engine's figure is set against its floor: the tokens/s
reached if every step did nothing but read the weights it uses (input embedding excluded:
it is a lookup) and the KV cache once. Small models partly sit in the CPU caches, so the
floor is approximate and can be beaten.

Engines: ours-fp32 / ours-bf16 / ours-int8 / ours-int4 (`polycoder.generation.Engine`,
`load_model(quantize=...)`), hf-fp32 / hf-bf16 (transformers `GPTNeoXForCausalLM.generate`,
SDPA), llama-f32 / llama-f16 / llama-q8_0 (llama.cpp through llama-cpp-python's low-level API,
`polycoder.export.llamacpp`, on our GGUF export; its KV cache in f16, llama.cpp's default;
skipped with a note where llama_cpp or `polycoder.export` is missing, and at batch > 1:
the driver runs one sequence).

`--device cuda` runs the same comparison on a GPU (our engine replays its decode step as
CUDA graphs there: `polycoder.backend.cuda_graphs.StaticDecode`): by default polycoder-2.7b and
polycoder-160m, bf16, ours against transformers, the bandwidth measured on the GPU (a sum
over a 4 GiB tensor), llama.cpp skipped. Not yet run: no session so far had a GPU.

    python benchmarks/decode.py --device cuda --json decode-gpu.json

`--quality-model FOLDER` also measures what int8/int4/bf16 cost in held-out perplexity:
per-token perplexity of the files under `--quality-files` (default: this Python's own
standard library, real code the model has not been trained on), each file scored on its
own with <|endoftext|> prepended, in disjoint windows of the model's context, one cached
decode step a token (the path generation takes, native kernels included).

    python benchmarks/decode.py --json decode.json
    python benchmarks/decode.py --models polycoder-160m --batches 1 --prompts 64 --engines ours-fp32,hf-fp32

Random-weight presets get the bundled model's code tokenizer (8192 tokens, with merges),
so the llama.cpp rows run in any clone. The CPU's model name and vector features and the
decode path our engine takes (`polycoder.backend.choose`) head the table.

Writes JSON (and Markdown next to it); prints a table. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_description
from report import publish
from transformers import GPTNeoXForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from polycoder import kernels  # noqa: E402
from polycoder.backend import choose, physical_cores  # noqa: E402
from polycoder.checkpoint import build_model, load_model, save_checkpoint  # noqa: E402
from polycoder.config import PRESETS, ModelConfig  # noqa: E402
from polycoder.export.gguf import export_gguf  # noqa: E402
from polycoder.export.llamacpp import LlamaCpp  # noqa: E402
from polycoder.export.llamacpp import available as llama_cpp_available  # noqa: E402
from polycoder.generation import Engine, SamplingParams, Sequence, sample_generator  # noqa: E402
from polycoder.locate import BUNDLED_DIR  # noqa: E402
from polycoder.options import ModelOptions  # noqa: E402
from polycoder.tokenizer import Tokenizer  # noqa: E402

ENGINES = ["ours-fp32", "ours-bf16", "ours-int8", "ours-int4", "hf-fp32", "hf-bf16", "llama-f32", "llama-f16", "llama-q8_0"]
# Bytes a weight of a linear layer takes, per engine (scales included: q8_0 is 34 bytes a
# block of 32; int4 here has a bf16 scale and offset a group of 32).
BYTES_PER_WEIGHT = {"fp32": 4, "f32": 4, "bf16": 2, "f16": 2, "int8": 1 + 2 / 768, "q8_0": 34 / 32, "int4": 0.5 + 4 / 32}
# ---- measurements -------------------------------------------------------------------------


def memory_bandwidth(mib: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Read bandwidth in bytes/s: best of a few (threaded) sums over a large tensor."""
    a = torch.ones(mib << 18, dtype=torch.float32, device=device)  # mib MiB
    a.sum()
    best = min(_timed(lambda: a.sum()) for _ in range(repeats))
    return a.numel() * 4 / best


def _timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def bytes_per_step(config: ModelConfig, precision: str, batch: int, context: int, kv_bytes: int) -> float:
    """Bytes one decode step must read: the weights it uses (not the input embedding) and the KV cache."""
    C, L = config.n_embd, config.n_layer
    linear = L * (4 * C * C + 2 * C * config.intermediate_size) + C * config.vocab_size
    small = L * (4 * C + 3 * C + config.intermediate_size + C) * 4 + 2 * C * 4  # biases and LayerNorms (fp32-ish)
    kv = 2 * L * batch * context * C * kv_bytes
    return linear * BYTES_PER_WEIGHT[precision] + small + kv


# ---- engines ------------------------------------------------------------------------------


def run_ours(model, tok, prompts: list[list[int]], new_tokens: int, compile: bool) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 forward passes a row)."""
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eod=False)
    engine = Engine(model, tok, max_rows=len(prompts), max_len=len(prompts[0]) + new_tokens + 1, compile=compile)
    seqs = [Sequence(p, params, tok, sample_generator(0, i, 0)) for i, p in enumerate(prompts)]
    _sync()
    t0 = time.perf_counter()
    for s in seqs:
        engine.add([s])
    _sync()
    t1 = time.perf_counter()
    while engine.rows:
        engine.step()
    _sync()
    t2 = time.perf_counter()
    assert all(len(s.token_ids) == new_tokens for s in seqs)
    return t1 - t0, t2 - t1


def run_hf(hf, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor(prompts, device=hf.device)
    kw = dict(do_sample=False, pad_token_id=1, eos_token_id=None)
    with torch.inference_mode():
        first = _timed(lambda: hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw))
        full = _timed(lambda: hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw))
    return first, max(full - first, 1e-9)


def run_llama(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """llama.cpp greedy decoding (polycoder.export.llamacpp): 1-token run vs full run."""
    (prompt,) = prompts
    first = _timed(lambda: llm.greedy(prompt, 1))
    full = _timed(lambda: llm.greedy(prompt, new_tokens))
    return first, max(full - first, 1e-9)


class Shape:
    """One model (shape or folder) with every engine's copy of its weights loaded lazily."""

    def __init__(self, name: str, folder: Path, engines: list[str], threads: int, notes: list[str], max_ctx: int, work: Path,
                 device: str = "cpu"):
        self.name, self.folder, self.threads, self.notes, self.device = name, folder, threads, notes, device
        self.work = work  # GGUF exports go here, never next to a real model folder
        self.config = ModelConfig.from_json_file(folder / "config.json")
        self.loaded: dict[str, object] = {}
        self.engines = []
        for e in engines:
            if self._load(e, max_ctx) is not None:
                self.engines.append(e)

    def _load(self, engine: str, max_ctx: int):
        kind, _, prec = engine.partition("-")
        try:
            if kind == "ours":
                dtype = "bfloat16" if prec == "bf16" else "float32"
                quant = prec if prec in ("int8", "int4") else None
                model, tok = load_model(self.folder, dtype=dtype, quantize=quant, device=self.device)
                self.loaded[engine] = (model, tok)
            elif kind == "hf":
                dt = torch.bfloat16 if prec == "bf16" else torch.float32
                hf = GPTNeoXForCausalLM.from_pretrained(self.folder, dtype=dt, attn_implementation="sdpa")
                self.loaded[engine] = hf.to(self.device).eval()
            elif kind == "llama":
                if self.device != "cpu":
                    raise _Skip("the llama.cpp driver here runs on the CPU")
                self.loaded[engine] = self._load_llama(prec, max_ctx)
        except _Skip as e:
            self.notes.append(f"{self.name} {engine}: skipped ({e})")
            return None
        return self.loaded[engine]

    def _load_llama(self, outtype: str, max_ctx: int):
        if not llama_cpp_available():
            raise _Skip("llama_cpp (llama-cpp-python) is not installed") from None
        path = self.work / f"{self.name}-{outtype}.gguf"
        if not path.is_file():
            try:
                export_gguf(path, model_options=ModelOptions(model=str(self.folder)), outtype=outtype, check=False)
            except Exception as e:  # report, and measure the rest
                raise _Skip(f"GGUF export failed: {type(e).__name__}: {str(e)[:200]}") from None
        # The driver turns llama.cpp's weight repacking off (q8_0 crashed in prefill with it here).
        return LlamaCpp(path, n_ctx=max_ctx, threads=self.threads)

    def run(self, engine: str, prompts, new_tokens: int, compile: bool):
        kind = engine.partition("-")[0]
        if kind == "ours":
            model, tok = self.loaded[engine]
            return run_ours(model, tok, prompts, new_tokens, compile)
        if kind == "hf":
            return run_hf(self.loaded[engine], prompts, new_tokens)
        return run_llama(self.loaded[engine], prompts, new_tokens)


class _Skip(Exception):
    pass


# ---- quality ------------------------------------------------------------------------------


def heldout_perplexity(model, tok: Tokenizer, files: list[Path], max_tokens: int) -> dict:
    """Per-model-token perplexity through the decode path, as generation runs the model.

    Each file on its own, EOD first, in disjoint windows of the model's context; every
    token's logits come from a one-token cached step (the backend's decode step: the native
    kernels where they apply), so what is measured is the arithmetic that generates text.
    """
    block = model.config.block_size
    backend = choose("cpu")
    nll, count = 0.0, 0
    with torch.inference_mode():
        for f in files:
            ids = [tok.eod_id] + tok.encode(f.read_bytes().decode("utf-8", errors="replace"))
            for s in range(0, len(ids) - 1, block):
                window = ids[s : s + block + 1]
                if len(window) < 2:
                    continue
                cache = model.new_cache(1, block)
                step = backend.decode_step(model, cache)
                x = torch.tensor([window])
                for t in range(len(window) - 1):
                    logits = step(x[:, t : t + 1], torch.tensor([[t]]), t + 1)[0]
                    nll += float(torch.logsumexp(logits, -1) - logits[window[t + 1]])
                count += len(window) - 1
                if count >= max_tokens:
                    break
            if count >= max_tokens:
                break
    return {"perplexity": float(torch.tensor(nll / count).exp()), "tokens": count, "files": len(files)}


def quality(folder: Path, files_root: Path, max_tokens: int) -> dict:
    files = sorted(p for p in files_root.rglob("*.py") if "test" not in p.name and 2_000 < p.stat().st_size < 200_000)[:200]
    variants = [("fp32", {}), ("bf16", {"dtype": "bfloat16"}), ("int8", {"quantize": "int8"}), ("int4", {"quantize": "int4"})]
    out = {}
    for name, kw in variants:
        model, tok = load_model(folder, **kw)
        out[name] = heldout_perplexity(model, tok, files, max_tokens)
        print(f"  quality {name}: perplexity {out[name]['perplexity']:.4f} on {out[name]['tokens']} tokens", flush=True)
    base = out["fp32"]["perplexity"]
    for name in out:
        out[name]["delta_pct"] = 100 * (out[name]["perplexity"] / base - 1)
    # And the logits themselves, on one window of real code, one cached step at a time.
    tok = load_model(folder)[1]
    ids = [0] + tok.encode(files[0].read_text(errors="replace"))[:255]

    def stepwise(model):
        cache = model.new_cache(1, len(ids))
        step = choose("cpu").decode_step(model, cache)
        with torch.inference_mode():
            return torch.stack([step(torch.tensor([[t]]), torch.tensor([[i]]), i + 1)[0] for i, t in enumerate(ids)])

    r = stepwise(load_model(folder)[0])
    for name, kw in variants[1:]:
        q = stepwise(load_model(folder, **kw)[0])
        out[name]["logits_rel_err"] = float((q - r).norm() / r.norm())
        out[name]["top1_agreement"] = float((q.argmax(-1) == r.argmax(-1)).float().mean())
    return out


# ---- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write results here (and .md beside it)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (then the defaults change: see the module docstring)")
    ap.add_argument("--models", default=None,
                    help="presets (random weights), model folders, or 'bundled' (skipped when absent)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", default="64,512", help="prompt lengths in tokens")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--engines", default=None, help=f"default on the CPU: all of {ENGINES}; on a GPU ours-bf16,hf-bf16")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin passes over the engines; the best is compared")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch and llama.cpp threads (0: one a physical core). On a machine busy with other work, "
                         "1 can be much faster for torch: its OpenMP threads wait on peers that are not scheduled")
    ap.add_argument("--compile", action="store_true", help="torch.compile our decode step (GPU only: refused on a CPU)")
    ap.add_argument("--quality-model", type=Path, default=None,
                    help="a trained model folder: measure perplexity cost of bf16/int8/int4")
    ap.add_argument("--quality-files", type=Path, default=Path(os.__file__).parent,
                    help="held-out code files (default: Python's stdlib)")
    ap.add_argument("--quality-tokens", type=int, default=50_000)
    args = ap.parse_args(argv)

    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    gpu = args.device != "cpu"
    if gpu and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this PyTorch sees no CUDA device")
    args.models = args.models or ("polycoder-2.7b,polycoder-160m" if gpu else "polycoder-160m,polycoder-0.4b,bundled")
    engines = [e.strip() for e in (args.engines or ("ours-bf16,hf-bf16" if gpu else ",".join(ENGINES))).split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engine(s) {sorted(unknown)}; choose from {ENGINES}")
    batches = [int(b) for b in args.batches.split(",")]
    prompt_lens = [int(p) for p in args.prompts.split(",")]
    notes: list[str] = []
    tok = Tokenizer.from_pretrained(BUNDLED_DIR)  # random presets' tokenizer: ours, with merges (llama.cpp needs them)
    print(f"threads {threads}, device {args.device}; measuring memory bandwidth ...", flush=True)
    bw = memory_bandwidth(4096, device=args.device) if gpu else memory_bandwidth()
    print(f"read bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    cpu = cpu_description()
    backend = choose(args.device)
    print(f"CPU {cpu['model']} ({', '.join(cpu['features'])}); our decode path: {backend}", flush=True)
    results: dict = {"device": torch.cuda.get_device_name(args.device) if gpu else "cpu", "cpu": cpu,
                     "backend": str(backend), "threads": threads, "bandwidth_gbps": bw / 1e9, "torch": torch.__version__,
                     "native_kernels": kernels.status(), "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "compile": args.compile, "rows": [], "notes": notes}
    work = Path(tempfile.mkdtemp(prefix="decode-bench-"))  # random-weight checkpoints and GGUF files
    try:
        _run_models(args, engines, batches, prompt_lens, threads, tok, bw, work, results, notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.quality_model:
        print("quality ...", flush=True)
        results["quality"] = quality(args.quality_model, args.quality_files, args.quality_tokens)
    _add_ratios(results["rows"])
    text = markdown(results)
    publish(results, text, args.json)
    return results


def _run_models(args, engines, batches, prompt_lens, threads, tok, bw, work, results, notes) -> None:
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        folder = _model_folder(model_name, work, tok, notes)
        if folder is None:
            continue
        max_ctx = max(prompt_lens) + args.new_tokens + 8
        shape = Shape(Path(model_name).name, folder, engines, threads, notes, max_ctx, work, args.device)
        for B in batches:
            for T in prompt_lens:
                if T + args.new_tokens + 1 > shape.config.block_size:
                    _note(notes, f"{model_name}: prompt {T} + {args.new_tokens} exceeds the context; skipped")
                    continue
                g = torch.Generator().manual_seed(B * 1000 + T)
                vocab = min(shape.config.vocab_size, tok.vocab_size)
                prompts = torch.randint(3, vocab, (B, T), generator=g).tolist()
                runnable = [e for e in shape.engines if not (e.startswith("llama") and B > 1)]
                if B > 1 and any(e.startswith("llama") for e in shape.engines):
                    _note(notes, "llama.cpp columns are batch 1 only (the llama.cpp driver runs one sequence)")
                times = {e: [] for e in runnable}
                for e in runnable:  # warm-up (and compile) outside the timed passes
                    shape.run(e, prompts, min(4, args.new_tokens), args.compile)
                for _ in range(args.repeats):
                    for e in runnable:
                        times[e].append(shape.run(e, prompts, args.new_tokens, args.compile))
                        print(f"  {shape.name} B={B} T={T} {e}: {B * (args.new_tokens - 1) / times[e][-1][1]:.1f} tok/s",
                              flush=True)
                for e in runnable:
                    all_tps = [B * (args.new_tokens - 1) / t[1] for t in times[e]]
                    tps = max(all_tps)  # the least disturbed pass (see the module docstring)
                    prec = e.partition("-")[2]
                    kv_bytes = 2 if prec in ("bf16", "f16") or e.startswith("llama") else 4  # llama.cpp: f16 cache
                    floor = B * bw / bytes_per_step(shape.config, prec, B, T + args.new_tokens // 2, kv_bytes)
                    results["rows"].append({
                        "model": shape.name, "batch": B, "prompt": T, "engine": e, "decode_tokens_per_s": tps,
                        "decode_tokens_per_s_median": statistics.median(all_tps), "decode_tokens_per_s_all": all_tps,
                        "prefill_s": statistics.median(t[0] for t in times[e]), "floor_tokens_per_s": floor,
                        "pct_of_floor": 100 * tps / floor})
        del shape


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def _model_folder(name: str, work: Path, tok, notes: list[str]) -> Path | None:
    if name == "bundled":
        if (BUNDLED_DIR / "config.json").is_file():
            return BUNDLED_DIR
        notes.append("bundled model: not in this installation; skipped")
        return None
    if name in PRESETS:
        folder = work / name
        save_checkpoint(build_model(ModelConfig.from_preset(name), seed=0), tok, folder)
        return folder
    if (Path(name) / "config.json").is_file():
        return Path(name)
    notes.append(f"{name}: neither a preset nor a model folder; skipped")
    return None


def _add_ratios(rows: list[dict]) -> None:
    """Each of our rows gets its ratio to every other engine's row of the same configuration."""
    by_key: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_key.setdefault((r["model"], r["batch"], r["prompt"]), {})[r["engine"]] = r["decode_tokens_per_s"]
    for r in rows:
        if r["engine"].startswith("ours"):
            others = by_key[(r["model"], r["batch"], r["prompt"])]
            r["ratio_to"] = {e: r["decode_tokens_per_s"] / v for e, v in others.items() if not e.startswith("ours")}


def markdown(results: dict) -> str:
    cpu = results.get("cpu") or {}
    lines = [f"# Decode speed ({results.get('device', 'cpu')}, {results['threads']} threads, "
             f"read bandwidth {results['bandwidth_gbps']:.1f} GB/s, "
             f"{results['new_tokens']} new tokens, best of {results['repeats']} passes, torch {results['torch']}, "
             f"native kernels: {results.get('native_kernels', '?')})", "",
             f"CPU: {cpu.get('model', '?')} ({', '.join(cpu.get('features', []))}); "
             f"our decode path: {results.get('backend', '?')}",
             "",
             "| model | batch | prompt | engine | decode tok/s (best) | median | % of floor | vs hf-fp32 | vs hf-bf16 | "
             "vs llama.cpp (fp32: f32, bf16: f16, int8/int4: q8_0) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    same = {"ours-fp32": "llama-f32", "ours-bf16": "llama-f16", "ours-int8": "llama-q8_0", "ours-int4": "llama-q8_0"}
    for r in results["rows"]:
        ratio = r.get("ratio_to", {})

        def fmt(e: str, ratio: dict = ratio) -> str:
            return f"{ratio[e]:.2f}x" if e in ratio else ""

        lines.append(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['engine']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s_median']:.1f} | "
                     f"{r['pct_of_floor']:.0f} % | {fmt('hf-fp32')} | {fmt('hf-bf16')} | {fmt(same.get(r['engine'], ''))} |")
    if "quality" in results:
        lines += ["", "| precision | held-out perplexity | delta | logits rel. error | top-1 agreement |",
                  "|---|---|---|---|---|"]
        for name, q in results["quality"].items():
            lines.append(f"| {name} | {q['perplexity']:.4f} | {q['delta_pct']:+.2f} % | {q.get('logits_rel_err', 0):.4f} | "
                         f"{q.get('top1_agreement', 1):.4f} |")
    if results["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
