"""Where `eval infilling`'s samples come from: a local model (loaded once for its sampling
and its scoring) or an OpenAI- or Ollama-style endpoint, each behind one `Source`.

A local model samples with `polycoder.generation.generate` on the prompts of
`polycoder.eval.infilling_tasks.prompt_ids` and scores removed lines by likelihood
(`score_middles`); an endpoint is sent the prefix and, in FIM mode, the suffix, and lays out
the prompt itself. This module imports torch: the verb imports it when it runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch

from polycoder.checkpoint import load
from polycoder.errors import PolycoderError
from polycoder.eval.endpoint import Api, Endpoint, Refused
from polycoder.eval.humaneval import FAILED
from polycoder.eval.infilling_tasks import Task, as_read, one_line, prompt_ids
from polycoder.fim import FIM_TOKENS, back_off
from polycoder.fingerprint import describe, digest, endpoint_identity, model_identity, name_of, short_names
from polycoder.generation import SamplingParams, generate
from polycoder.line_breaks import cursor_line_break
from polycoder.options import ModelOptions
from polycoder.tokenizer import load_tokenizer


@dataclass
class Source:
    """Where samples come from: a local model or an endpoint."""

    label: str
    described: str
    key: str
    fim: bool
    """Whether FIM prompts can be asked (a local model: its tokenizer has the sentinels)."""
    open_sampler: Callable
    """() -> a context manager yielding (fn(pairs, seed) -> [[(text, finish_reason)]], pairs a call)."""
    score_middles: Callable | None = None
    """(pairs) -> the loss of each pair's removed middle under its prompt (a local model), or None."""
    score_key: str = ""
    """What the middles' losses depend on (the model's weights, dtype and quantization; not the
    sampling settings, which `key` holds): the key of their cache."""
    close: Callable[[], None] = lambda: None
    """Lets go of what sampling and scoring loaded (a local model), once both are done."""


class LoadOnce:
    """A local model, loaded on the first call and shared by its sampling and its scoring (each
    loaded it again before), until `close`: models compared side by side are held one at a time."""

    def __init__(self, options: ModelOptions):
        self.options = options
        self._loaded: tuple | None = None

    def __call__(self) -> tuple:
        if self._loaded is None:
            self._loaded = load(self.options)
        return self._loaded

    def close(self) -> None:
        self._loaded = None


@contextmanager
def _local_sampler(loaded: LoadOnce, settings: dict, order: str, max_rows: int):
    model, tokenizer = loaded()
    room = model.config.block_size - settings["max_new_tokens"] - 1
    if room < 16:
        raise PolycoderError(f"--max-new-tokens {settings['max_new_tokens']} leaves no room for a prompt in the "
                             f"model's context of {model.config.block_size} tokens; lower it")

    def fn(pairs: list[tuple[Task, str]], seed: int) -> list[list[tuple[str, str]]]:
        if any(mode == "fim" for _, mode in pairs) and tokenizer.fim is None:
            raise PolycoderError(f"{loaded.options.model}: its tokenizer has no FIM tokens; use --mode prefix-only")
        results: list = [None] * len(pairs)
        # The stop strings and the whitespace the prompt leaves to the model (`back_off`, as
        # our server does at the cursor) differ from task to task: one call each kind.
        # The file's line break, in which the output is written (the model reads LF: `as_read`), too.
        kinds: dict[tuple[bool, str, str], list[int]] = {}
        for i, (task, _) in enumerate(pairs):
            key = (one_line(task), back_off(as_read(task).prefix)[1], cursor_line_break(task.prefix, task.suffix))
            kinds.setdefault(key, []).append(i)
        for (line, heal, eol), idx in kinds.items():
            prompts = [prompt_ids(tokenizer, pairs[i][0], pairs[i][1], order, room) for i in idx]
            params = SamplingParams(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                                    top_p=settings["top_p"], num_samples=settings["num_samples"],
                                    stop=(("\n",) if line else ()) + FIM_TOKENS, seed=seed, heal=heal, eol=eol)
            for i, completions in zip(idx, generate(model, tokenizer, prompts, params, max_rows=max_rows)):
                results[i] = [(c.text, c.finish_reason) for c in completions]
        return results

    yield fn, max(1, max_rows // settings["num_samples"])


MIDDLE_TOKENS = 64
"""A middle is scored on at most its first 64 tokens (a removed line rarely has more)."""
LOGIT_BUDGET = 1 << 27
"""Logits computed at once when scoring middles (rows x positions x vocabulary): 512 MiB of fp32."""


def score_middles(loaded: LoadOnce, order: str, pairs: list[tuple[Task, str]]) -> list[float]:
    """The mean loss (nats a token) of each task's removed middle, teacher-forced after the
    prompt that mode asks with: the same target tokens in both modes (the whitespace the
    prompt leaves to the model, then the middle, tokenized on their own), so FIM's loss
    minus prefix-only's is what the suffix tells the model about the middle. Finer than
    exact match or edit similarity of one greedy answer: it sees a suffix that moves the
    right tokens' probability without changing the top one."""
    model, tokenizer = loaded()
    C = model.config.block_size
    device = next(model.parameters()).device
    seqs = []
    for task, mode in pairs:
        read = as_read(task)
        target = tokenizer.encode(back_off(read.prefix)[1] + read.middle)[:MIDDLE_TOKENS] or [tokenizer.eod_id]
        prompt = prompt_ids(tokenizer, task, mode, order, C - len(target)) or [tokenizer.eod_id]
        seqs.append((prompt, target))
    losses: list[float] = []
    step = max(1, LOGIT_BUDGET // (C * model.config.vocab_size))
    with torch.no_grad():
        for i in range(0, len(seqs), step):
            chunk = seqs[i: i + step]
            ids = torch.full((len(chunk), max(len(p) + len(t) for p, t in chunk)), tokenizer.eod_id)
            for b, (p, t) in enumerate(chunk):  # padded on the right: a causal model never reads ahead
                ids[b, : len(p) + len(t)] = torch.tensor(p + t)
            logits = model(ids.to(device))
            for b, (p, t) in enumerate(chunk):
                logp = logits[b, len(p) - 1: len(p) + len(t) - 1].float().log_softmax(-1)
                losses.append(-logp.gather(1, torch.tensor(t, device=device)[:, None]).mean().item())
    return losses


def fill_template(template: str, prefix: str, suffix: str) -> str:
    """`template` with its {prefix} and {suffix} replaced by the code (in one pass: braces in
    the code stay as they are)."""
    return re.sub(r"\{(prefix|suffix)\}", lambda m: prefix if m.group(1) == "prefix" else suffix, template)


@contextmanager
def _endpoint_sampler(endpoint: str, endpoint_model: str | None, api: Api, settings: dict, concurrency: int,
                      template: str | None = None):
    client = Endpoint(endpoint, model=endpoint_model, api=api)

    def one(pair: tuple[Task, str], seed: int) -> list[tuple[str, str]]:
        task, mode = pair
        try:
            if mode == "fim" and template is not None:  # the cursor spelt out, as a templating editor sends it
                return client.complete(fill_template(template, task.prefix, task.suffix), settings["num_samples"],
                                       settings["temperature"], settings["top_p"], settings["max_new_tokens"],
                                       ("\n",) if one_line(task) else (), seed=seed)
            if mode == "fim":  # at the cursor: the server leaves the whitespace to the model, as we do
                return client.complete(task.prefix, settings["num_samples"], settings["temperature"], settings["top_p"],
                                       settings["max_new_tokens"], ("\n",) if one_line(task) else (), seed=seed,
                                       suffix=task.suffix)
            # A plain completion: the whitespace left to the model is dropped here, so the first
            # line is cut here too (a "\n" stop would end inside that whitespace). No server
            # constrains the tokens to agree with it, as a local model's sampling does.
            kept, heal = back_off(task.prefix)
            stop = ("\n",) if one_line(task) and "\n" not in heal else ()
            done = client.complete(kept, settings["num_samples"], settings["temperature"], settings["top_p"],
                                   settings["max_new_tokens"], stop, seed=seed)
            return [(text[len(heal):] if text.startswith(heal) else text, reason) for text, reason in done]
        except Refused as e:
            return [("", f"{FAILED}: {str(e)[:300]}")] * settings["num_samples"]

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            yield (lambda pairs, seed: list(pool.map(one, pairs, [seed] * len(pairs)))), concurrency
    finally:
        client.close()


def fim_capable(options: ModelOptions) -> bool:
    """Whether the tokenizer a local model is loaded with has the FIM sentinels."""
    try:
        return load_tokenizer(options.tokenizer or options.model).fim is not None
    except (PolycoderError, OSError, ValueError):
        return True  # an adapter folder without a tokenizer, say: the loaded model says, or refuses clearly


def make_sources(models: list[str | None], endpoint: str | None, endpoint_model: str | None, api: Api,
             options: ModelOptions, settings: dict, order: str, max_rows: int, concurrency: int,
             template: str | None = None) -> list[Source]:
    """The models to sample from, each identified before any is sampled; none means the bundled model."""
    if not models and endpoint is None:
        models = [None]
    chosen = [replace(options, model=m) for m in dict.fromkeys(models)]
    identities = [model_identity(o) for o in chosen]
    labels = short_names([name_of(o) for o in chosen] + ([endpoint] if endpoint is not None else []))
    sources = []
    for o, identity, label in zip(chosen, identities, labels):
        weights = {"model": identity, "dtype": o.dtype, "quantize": o.quantize}
        key, loaded = digest({**weights, **settings}), LoadOnce(o)
        sources.append(Source(label, f"{describe(o)} (key {key})", key, fim_capable(o),
                              partial(_local_sampler, loaded, settings, order, max_rows),
                              partial(score_middles, loaded, order), digest({**weights, "middle_tokens": MIDDLE_TOKENS}),
                              loaded.close))
    if endpoint is not None:
        client = Endpoint(endpoint, model=endpoint_model, api=api)
        try:
            identity = endpoint_identity(endpoint, endpoint_model, client.served_models())
        finally:
            client.close()
        key = digest({"model": identity, "api": api, **settings, **({"template": template} if template else {})})
        how = f"{api}{f', model {endpoint_model}' if endpoint_model else ''}{f', template {template!r}' if template else ''}"
        sources.append(Source(labels[-1], f"{endpoint} ({how}; key {key})", key, True,
                              partial(_endpoint_sampler, endpoint, endpoint_model, api, settings, concurrency,
                                      template)))
    return sources
