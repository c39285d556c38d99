"""The public generation functions: `generate` (many prompts, many samples) and `stream` (one).

Both feed the batching engine (`polycoder.generation.engine.Engine`): prompts join as rows
free up, a prompt's samples share one prefill, and sample j of prompt p draws from
`sample_generator(seed, p, j)`, so results do not depend on the batch they shared.
"""

from __future__ import annotations

from collections.abc import Iterator

from polycoder.backend import Backend
from polycoder.errors import PolycoderError
from polycoder.generation.beam import beam_search
from polycoder.generation.engine import Engine
from polycoder.generation.sampling import SamplingParams, resolve_seed, sample_generator
from polycoder.generation.text import Completion, Sequence, encode_prompt
from polycoder.model import GPTNeoX
from polycoder.tokenizer import Tokenizer


def generate(
    model: GPTNeoX,
    tokenizer: Tokenizer,
    prompts: str | list[str] | list[list[int]],
    params: SamplingParams | None = None,
    max_rows: int = 64,
    compile: bool = False,
    backend: Backend | None = None,
    speculate: int = 0,
    draft_model: GPTNeoX | None = None,
) -> list[list[Completion]]:
    """Complete each prompt `params.num_samples` times; one list of completions a prompt.
    `speculate`: draft tokens verified a step, guessed by prompt lookup or by `draft_model`
    (a small model with the same tokenizer; `polycoder.generation.speculative`)."""
    params = params or SamplingParams()
    if isinstance(prompts, str):
        prompts = [prompts]
    block = model.config.block_size
    ids = [encode_prompt(tokenizer, p, block, params) for p in prompts]
    if params.num_beams > 1:
        return [[beam_search(model, tokenizer, p, params, backend)] for p in ids]
    seed = resolve_seed(params.seed)
    max_len = min(block, max(len(p) for p in ids) + params.max_new_tokens + 1)
    total = len(ids) * params.num_samples
    engine = Engine(model, tokenizer, max_rows=max(1, min(max_rows, total)), max_len=max_len, compile=compile,
                    backend=backend, speculate=speculate, draft_model=draft_model)
    pending = [(p, j) for p in range(len(ids)) for j in range(params.num_samples)]
    done: list[Sequence] = []
    while pending or engine.rows:
        while pending and engine.free_rows:
            p = pending[0][0]
            group = []
            while pending and pending[0][0] == p and len(group) < engine.free_rows:
                _, j = pending.pop(0)
                group.append(Sequence(ids[p], params, tokenizer, sample_generator(seed, p, j), tag=(p, j)))
            if params.max_new_tokens == 0:
                for s in group:
                    s.finish("length")
                done.extend(group)
                continue
            engine.add(group)
        done.extend(e.sequence for e in engine.step() if e.finished)
    results: list[list[Completion]] = [[None] * params.num_samples for _ in ids]  # type: ignore[list-item]
    for s in done:
        p, j = s.tag
        results[p][j] = s.completion()
    return results


def stream(model: GPTNeoX, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams | None = None,
           compile: bool = False, backend: Backend | None = None, speculate: int = 0,
           draft_model: GPTNeoX | None = None) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece (whole UTF-8 characters only)."""
    params = params or SamplingParams()
    if params.num_samples != 1 or params.num_beams != 1:
        raise PolycoderError("streaming produces one sample; set num_samples and num_beams to 1")
    ids = encode_prompt(tokenizer, prompt, model.config.block_size, params)
    if params.max_new_tokens == 0:
        return
    engine = Engine(model, tokenizer, max_rows=1, max_len=min(model.config.block_size, len(ids) + params.max_new_tokens + 1),
                    compile=compile, backend=backend, speculate=speculate, draft_model=draft_model)
    engine.add([Sequence(ids, params, tokenizer, sample_generator(resolve_seed(params.seed), 0, 0))])
    while engine.rows:
        for event in engine.step():
            if event.text:
                yield event.text
