"""How a prompt is continued: the settings, and one token a row from logits.

`SamplingParams` holds a request's settings. `sample_tokens` is a pure function of
logits, per-row settings and per-row uniform draws; the draws come from one seeded
`torch.Generator` per sample (`sample_generator`), so sample j of a request is the same
whatever else shares the batch and however many samples are asked (after nanochat).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polycoder.errors import PolycoderError
from polycoder.generation.penalties import OFF, Penalties
from polycoder.generation.suffix_stop import SuffixStop

MAX_TOP_K = 2**31 - 1
"""Larger k are no different from no limit, and must fit the engine's int64 tensors with room."""


@dataclass
class SamplingParams:
    """How to continue a prompt."""

    max_new_tokens: int = 128
    """Most tokens to generate for each sample."""
    temperature: float = 0.0
    """0 means greedy (argmax); higher is more random."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    num_samples: int = 1
    """Samples per prompt; they share one prefill."""
    num_beams: int = 1
    """Beam search width (1: no beam search). Beam search is deterministic."""
    stop: tuple[str, ...] = ()
    """Stop strings: output is cut before the first occurrence of any of them."""
    stop_at_eod: bool = True
    """End a sample at `<|endoftext|>` (the end of a document)."""
    stop_ids: tuple[int, ...] = ()
    """More token ids that end a sample as the end of the document does (never part of the
    text): the FIM sentinels, when a model fills in the middle."""
    suffix_stop: SuffixStop | None = None
    """At the cursor: end where the code after the cursor says (`polycoder.generation.suffix_stop`)."""
    heal: str = ""
    """At the cursor: whitespace that ended the text before the cursor and was left out of the
    prompt (`polycoder.fim.back_off`); the model writes it again (its first tokens are
    constrained to agree with it: `polycoder.generation.text`), and it is dropped from the
    start of the output."""
    eol: str | None = None
    """At the cursor: the document's line break ("\\n" or "\\r\\n"), which the output's line
    breaks are written as; the model reads CRLF as LF there (`polycoder.line_breaks`), and so
    do the stop strings. None: the text as the model writes it."""
    min_indent: int = 0
    """llama.cpp's `n_indent` (/infill): after the first line break, a line whose code is
    indented by fewer than this many spaces or tabs ends the sample before that code
    (`polycoder.generation.text.under_indented`; 0: off)."""
    max_predict_ms: float = 0
    """llama.cpp's `t_max_predict_ms` (/infill): once this many milliseconds have passed since
    the first generated token, the sample ends after the next token that writes a line break
    (an editor gets whole lines in bounded time; 0: off)."""
    seed: int | None = None
    """Seed for sampling; None draws a fresh one."""
    truncate: bool = False
    """Keep only the last tokens of a prompt too long for the context, instead of an error."""
    length_penalty: float = 1.0
    """Beam search: scores are divided by length ** length_penalty."""
    penalties: Penalties = OFF
    """Repetition penalties (`polycoder.generation.penalties`; off by default)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        self.stop_ids = tuple(self.stop_ids)
        if self.max_new_tokens < 0:
            raise PolycoderError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PolycoderError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise PolycoderError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise PolycoderError(f"top_k must be in [0, {MAX_TOP_K}] (0: no limit), got {self.top_k}")
        if self.eol not in (None, "\n", "\r\n"):
            raise PolycoderError(f"eol must be None, LF or CRLF, got {self.eol!r}")
        if self.max_predict_ms < 0:
            raise PolycoderError(f"max_predict_ms must be >= 0 (0: off), got {self.max_predict_ms}")
        if self.min_indent < 0:
            raise PolycoderError(f"min_indent (n_indent) must be >= 0, got {self.min_indent}")
        if self.num_samples < 1 or self.num_beams < 1:
            raise PolycoderError("num_samples and num_beams must be at least 1")
        if self.num_beams > 1 and self.num_samples > 1:
            raise PolycoderError("beam search returns one sequence a prompt: use num_beams or num_samples, not both")
        if self.num_beams > 1 and self.penalties.active:
            raise PolycoderError("repetition penalties apply to sampling and greedy decoding, not to beam search: "
                                 "leave them out, or use num_beams 1")




def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """One token a row from logits [B, V] with per-row settings and uniform draws [B].

    Rows with temperature 0 take the argmax. Others: softmax(logits / T), keep the top_k
    most likely (if > 0) and the smallest prefix of the sorted distribution whose mass
    reaches top_p, then invert the CDF of what is kept at the row's uniform draw.
    Sorting all 50k logits is the slow part, so only the top candidates are sorted when
    that provably covers every row's top_k and top_p (else the whole vocabulary is).
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    sampling = temperature > 0
    if not bool(sampling.any()):
        return greedy
    V = logits.size(-1)
    probs = F.softmax(logits / temperature.clamp_min(1e-6)[:, None], dim=-1)
    truncating = sampling & ((top_k > 0) | (top_p < 1.0))
    if not bool(truncating.any()):  # plain temperature sampling: no sort at all
        cdf = probs.cumsum(dim=-1)
        choice = torch.searchsorted(cdf, (uniforms.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)
        sampled = choice.clamp_max(V - 1)[:, 0]
        return torch.where(sampling, sampled, greedy)
    C = min(V, max(1024, int(top_k.max())))
    sorted_p, order = probs.topk(C, dim=-1)  # [B, C], descending
    needs_all = sampling & (top_k == 0) & (sorted_p.sum(dim=-1) < top_p)
    if C < V and bool(needs_all.any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    remove = mass_before >= top_p[:, None]  # the first token always stays
    ranks = torch.arange(sorted_p.size(-1), device=logits.device)[None, :]
    remove |= (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    kept = sorted_p.masked_fill(remove, 0.0)
    cdf = kept.cumsum(dim=-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1])[:, None]
    choice = torch.searchsorted(cdf, target, right=True).clamp_max(sorted_p.size(-1) - 1)  # [B, 1]
    sampled = order.gather(1, choice)[:, 0]
    return torch.where(sampling, sampled, greedy)


def sample_generator(seed: int, prompt_index: int, sample_index: int) -> torch.Generator:
    """The generator of sample `sample_index` of prompt `prompt_index` under `seed`."""
    mixed = (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB) % (2**63)
    return torch.Generator().manual_seed(mixed)


def resolve_seed(seed: int | None) -> int:
    return seed if seed is not None else random.SystemRandom().randrange(2**63)

