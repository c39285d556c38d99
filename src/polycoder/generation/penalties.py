"""Repetition penalties: llama.cpp's and Ollama's `repeat_penalty`, and the `presence_penalty`
and `frequency_penalty` of OpenAI, llama.cpp and Ollama.

One rule, llama.cpp's (`llama_sampler_penalties_apply`): a token that occurs c > 0 times in
the window has its logit l made l / r where l > 0 and l * r otherwise (r = repeat_penalty:
CTRL's penalty, with the sign handled so that r > 1 always lowers the token), then lowered by
c * frequency + presence. The window is the last `last_n` tokens of the prompt and the
output, as llama.cpp's server and Ollama count them (-1: all of them), or of the output alone
(`count_prompt=False`: OpenAI's definition, the tokens sampled so far). The penalized logits
are what temperature, top-k and top-p then see, as in llama.cpp's default chain and vLLM; a
greedy row takes their argmax.

Off by default everywhere: code repeats its identifiers, brackets and indentation by nature,
so a penalty that helps prose hurts completions (transformers and llama.cpp default it off
too). It is there for a small model that loops, and for clients that send it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from polycoder.errors import PolycoderError


@dataclass(frozen=True)
class Penalties:
    """How a row's logits are lowered for the tokens it has seen (see the module docstring)."""

    repeat: float = 1.0
    """Divides a seen token's positive logit and multiplies its negative one (1: off)."""
    presence: float = 0.0
    """Subtracted once from a seen token's logit (0: off; negative raises it)."""
    frequency: float = 0.0
    """Subtracted from a seen token's logit for each time it was seen (0: off)."""
    last_n: int = 64
    """How many of the latest tokens are counted (-1: all; 0: none, every penalty off)."""
    count_prompt: bool = True
    """Whether the prompt's tokens count, or only the output's."""

    def __post_init__(self) -> None:
        for name in ("repeat", "presence", "frequency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PolycoderError(f"the {name} penalty must be a finite number, got {value!r}")
        if self.repeat <= 0:
            raise PolycoderError(f"the repeat penalty must be > 0 (1: off; above 1 lowers repeated tokens), "
                                 f"got {self.repeat}")
        if self.last_n < -1:
            raise PolycoderError(f"the penalty window must be -1 (all tokens), 0 (off) or a count of tokens, "
                                 f"got {self.last_n}")

    @property
    def active(self) -> bool:
        return self.last_n != 0 and (self.repeat != 1.0 or self.presence != 0.0 or self.frequency != 0.0)

    def window(self, prompt_ids: list[int], output_ids: list[int]) -> list[int]:
        """The tokens counted: the latest `last_n` of the prompt and the output, or of the output.
        Called every step of a penalized row: only the tail it needs is copied, not the prompt."""
        if self.last_n == -1:
            return prompt_ids + output_ids if self.count_prompt else list(output_ids)
        out = output_ids[max(0, len(output_ids) - self.last_n):]
        short = self.last_n - len(out)
        if not self.count_prompt or short <= 0:
            return out
        return prompt_ids[max(0, len(prompt_ids) - short):] + out


OFF = Penalties()


def penalize(logits: torch.Tensor, window: list[int], penalties: Penalties) -> None:
    """Lower the logits [V] of the tokens in `window`, in place."""
    counts = Counter(t for t in window if 0 <= t < logits.size(-1))
    if not counts:
        return
    ids = torch.tensor(list(counts), device=logits.device)
    c = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    seen = logits[ids]
    if penalties.repeat != 1.0:
        seen = torch.where(seen > 0, seen / penalties.repeat, seen * penalties.repeat)
    logits[ids] = seen - c * penalties.frequency - penalties.presence
