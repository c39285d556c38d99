"""Beam search as in transformers: scores are summed log-probabilities / length ** length_penalty.

It runs on the engine's model calls (`Engine.prefill` once, copied to every beam's row;
`Engine.decode` for all beams at each step) and reorders the beams' cache rows with the
cache's row copy, so it takes the same fast decode step as sampling does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polycoder.backend import Backend
from polycoder.generation.engine import Engine
from polycoder.generation.sampling import SamplingParams
from polycoder.generation.text import Completion, Sequence
from polycoder.model import GPTNeoX
from polycoder.tokenizer import Tokenizer


@torch.inference_mode()
def beam_search(model: GPTNeoX, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                backend: Backend | None = None) -> Completion:
    """The best of `params.num_beams` beams continuing `prompt_ids` (deterministic)."""
    nb, eod = params.num_beams, tokenizer.eod_id
    T = len(prompt_ids)
    engine = Engine(model, tokenizer, max_rows=nb, max_len=min(model.config.block_size, T + params.max_new_tokens + 1),
                    backend=backend)
    logits = engine.prefill(prompt_ids, 0, copies=nb).expand(nb, -1)  # [nb, V]
    device = logits.device
    beams: list[list[int]] = [[] for _ in range(nb)]
    scores = torch.full((nb,), -1e9, device=device)
    scores[0] = 0.0  # only the first beam is live at the start: the others are copies
    finished: list[tuple[float, list[int]]] = []
    V = tokenizer.vocab_size

    def normalized(score: float, length: int) -> float:
        return score / (max(length, 1) ** params.length_penalty)

    for step in range(params.max_new_tokens):
        # Normalise over the whole (padded) vocabulary, then rule out the padding ids, as
        # transformers does with suppressed tokens; a trained model gives them ~0 anyway.
        logp = F.log_softmax(logits, dim=-1)[:, :V] + scores[:, None]  # [nb, V]
        top, flat = logp.reshape(-1).topk(2 * nb)
        next_beams, next_scores, parents = [], [], []
        for rank, (score, idx) in enumerate(zip(top.tolist(), flat.tolist())):
            b, tok = divmod(idx, V)
            if tok == eod and params.stop_at_eod:
                if rank < nb:  # only the top nb candidates may finish (as transformers)
                    finished.append((normalized(score, len(beams[b]) + 1), beams[b]))
                continue
            if len(next_beams) < nb:
                next_beams.append(beams[b] + [tok])
                next_scores.append(score)
                parents.append(b)
        finished = sorted(finished, key=lambda f: -f[0])[:nb]
        beams = next_beams
        scores = torch.tensor(next_scores, device=device)
        if len(finished) == nb and normalized(max(next_scores), len(beams[0])) <= finished[-1][0]:
            break  # no running beam can beat the worst kept hypothesis
        engine.cache.copy_rows(parents, list(range(nb)), T + step)  # each beam takes its parent's cache
        if T + step + 1 >= engine.max_len:
            break
        logits = engine.decode([b[-1] for b in beams], [T + step] * nb)
    candidates = finished + [(normalized(s, len(b)), b) for s, b in zip(scores.tolist(), beams)]
    best = max(candidates, key=lambda c: c[0])[1]
    seq = Sequence(prompt_ids, SamplingParams(max_new_tokens=len(best) + 1, stop=params.stop, stop_at_eod=False),
                   tokenizer, torch.Generator())
    for tok in best:
        seq.push(tok)
        if seq.done:
            break
    if not seq.done:  # a stop string already ended (and cut) it otherwise
        seq.finish("eod" if any(best == f[1] for f in finished) else "length")
    return seq.completion()
