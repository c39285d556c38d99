"""The fill-in-the-middle transform of training windows, applied at load time.

Bavarian et al. (2022), "Efficient Training of Language Models to Fill in the Middle"
(arXiv:2207.14255), as StarCoder trained it (Li et al. 2023; bigcode-project/Megatron-LM's
`permute` in megatron/data/gpt_dataset.py): a training window is cut at its EOD tokens into
document pieces, and each piece, with probability `fim_rate`, is

1. decoded to text (bytes that are not valid UTF-8 become lone surrogates, so a piece cut
   inside a character, or binary-looking text, survives byte for byte: the tokenizer
   encodes them back to their byte tokens),
2. cut at two character positions drawn uniformly (with replacement, then sorted) into
   prefix, middle and suffix,
3. each part tokenized on its own (as at serving time: `polycoder.fim`),
4. laid out by `polycoder.fim.arrange`, in SPM order with probability `fim_spm_rate`
   (StarCoder's variant), else PSM.

Line spans (`fim_line_rate`, 0 by default, so runs made before it draw as they did): that
share of the rearranged pieces has its middle cut at lines rather than at two uniform
characters, the shape of the middles editors ask for (the removed line of `eval infilling`,
the rest of the line at the cursor). Uniform cuts give middles a third of a piece long on
average; a small model trained only on those learns little of what a one-line gap needs from
the suffix. A line span is 1-3 whole lines from a line drawn uniformly, or, half of the time,
from a character drawn uniformly in that line (the cursor mid-line) to the end of the span's
last line without its newline. Its start then moves back over the whitespace before it, as
`polycoder.fim.back_off` moves a cursor at serving time: the middle starts with the newline
and indentation, which the model is left to write. (Structure-aware spans, as
aiXcoder's "structured FIM" or AST-FIM cut at syntax nodes, are the general form; lines need
no parser for twelve languages.)

Window length. The rearranged piece has three sentinels more and, after re-tokenization,
usually a few tokens more or less than the piece it replaces. As `permute`'s
`truncate_or_pad` mode, the piece keeps its exact length: the suffix loses tokens from its
end, or is followed by `<fim_pad>` tokens; where the suffix is too short to absorb the
excess the piece stays as it was (so pieces of one or two tokens are never rearranged).
Every EOD therefore stays where it was, and the window is exactly `seq_len + 1` tokens.
(bigcode's dataset instead rearranges the pieces freely and cuts or pads the whole window
at its end; keeping each piece's length keeps one document's transform from moving the
next one.) Targets that are `<fim_pad>` are set to -100, so padding is never learnt.

Also left as they are: pieces holding a special token (a FIM sentinel, `<|padding|>`,
`<|separator|>`): their text would re-tokenize as plain characters.

Determinism: the draws for one window come from a generator seeded by (seed, step, row of
the global batch), so a batch is still a pure function of (seed, step): N processes
transform exactly the rows one process would, and a resumed run the rows it would have.

Cost: about one more tokenization of the rearranged pieces (benchmarks/fim_transform.py):
the parts of all of a micro-batch's pieces go to the tokenizer in one `encode_batch` call,
which spreads them over its thread pool. It runs in the training loop, not in a separate
data process, so a fast GPU step can wait for it (a limit of this loader).

Validation windows are not transformed: the validation loss stays the left-to-right loss,
comparable across runs with any fim_rate (Bavarian et al.'s "FIM for free" is measured so).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from polycoder.errors import PolycoderError
from polycoder.fim import FimIds, arrange, back_off
from polycoder.train.loss import IGNORE_INDEX
from polycoder.train.settings import DataSettings

_STREAM = 0xF13  # keeps the FIM generators apart from the window sampler's (seed, step) stream
MAX_SPAN_LINES = 3
"""A line span's middle holds 1 to this many lines (uniformly)."""


class FimTransform:
    """Rearranges the document pieces of training windows into PSM / SPM samples."""

    def __init__(self, tokenizer, fim_rate: float, fim_spm_rate: float, seed: int, fim_line_rate: float = 0.0):
        if tokenizer.fim is None:
            raise PolycoderError(
                f"data.fim_rate is {fim_rate} but the tokenizer has no fill-in-the-middle tokens "
                "(<fim_prefix>, <fim_middle>, <fim_suffix>, <fim_pad>); add them to the model with "
                "`polycoder finetune --fim`, train a tokenizer with `polycoder tokenizer train` (which adds them), "
                "or set --fim-rate 0")
        if not (0.0 <= fim_rate <= 1.0 and 0.0 <= fim_spm_rate <= 1.0 and 0.0 <= fim_line_rate <= 1.0):
            raise PolycoderError(f"fim_rate, fim_spm_rate and fim_line_rate must be in [0, 1], got {fim_rate}, "
                                 f"{fim_spm_rate}, {fim_line_rate}")
        self.tokenizer = tokenizer
        self.fim: FimIds = tokenizer.fim
        self.fim_rate, self.fim_spm_rate, self.fim_line_rate, self.seed = fim_rate, fim_spm_rate, fim_line_rate, seed
        self.eod = tokenizer.eod_id
        self._special = np.array(sorted(tokenizer.special_ids - {self.eod}), dtype=np.int64)

    def rng(self, step: int, row: int) -> np.random.Generator:
        """The generator of row `row` of the global batch of `step`."""
        return np.random.Generator(np.random.PCG64([self.seed, step, row, _STREAM]))

    def window(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`tokens` (one window) with each document piece between EODs maybe rearranged;
        the same length, EODs in place."""
        return self._transform(np.asarray(tokens)[None], [rng])[0]

    def rows(self, windows: np.ndarray, step: int, rows: Sequence[int]) -> np.ndarray:
        """Windows [B, T + 1] of the global batch of `step`, row i being global row rows[i]."""
        return self._transform(windows, [self.rng(step, r) for r in rows])

    def piece(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One document piece, rearranged with probability fim_rate (same length), or as it was."""
        cut = self._cut(ids, rng)
        if cut is None:
            return ids
        *texts, order = cut
        return self._fit(ids, *(self.tokenizer.encode(t) for t in texts), order)

    def _transform(self, windows: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
        """Each window's pieces cut with its own generator (in piece order), then every part of
        the batch tokenized in one call (`encode_batch`: the tokenizer's thread pool)."""
        out = np.array(windows, dtype=np.int64)  # [B, T + 1], a copy
        cuts: list[tuple[int, int, int, str]] = []  # (row, start, end, order) of each rearranged piece
        texts: list[str] = []
        for b, rng in enumerate(rngs):
            start = 0
            for end in [*np.flatnonzero(out[b] == self.eod).tolist(), out.shape[1]]:
                if end > start and (cut := self._cut(out[b, start:end], rng)) is not None:
                    cuts.append((b, start, end, cut[3]))
                    texts += cut[:3]
                start = end + 1
        parts = self.tokenizer.encode_batch(texts) if texts else []
        for k, (b, start, end, order) in enumerate(cuts):
            out[b, start:end] = self._fit(out[b, start:end], *parts[3 * k:3 * k + 3], order)
        return out

    def _cut(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[str, str, str, str] | None:
        """(prefix, middle, suffix, order) texts of a piece to rearrange, or None to leave it."""
        if rng.random() >= self.fim_rate:
            return None
        if np.isin(ids, self._special).any():
            return None
        text = self.tokenizer.decode_bytes(ids.tolist()).decode("utf-8", errors="surrogateescape")
        # The line-span draw only where it is asked for, so that other runs draw as before.
        if self.fim_line_rate and rng.random() < self.fim_line_rate:
            lo, hi = line_span(text, rng)
        else:
            lo, hi = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
        order = "spm" if rng.random() < self.fim_spm_rate else "psm"
        return text[:lo], text[lo:hi], text[hi:], order

    def _fit(self, ids: np.ndarray, prefix: list[int], middle: list[int], suffix: list[int], order: str) -> np.ndarray:
        """The arranged piece at the length of `ids`: the suffix cut or padded, or `ids` where
        the suffix is too short to give up the excess."""
        excess = len(prefix) + len(middle) + len(suffix) + 3 - len(ids)
        if excess > 0:
            if len(suffix) <= excess:
                return ids
            suffix = suffix[: len(suffix) - excess]
        elif excess < 0:
            suffix = suffix + [self.fim.pad] * -excess
        return np.asarray(arrange(self.fim, prefix, middle, suffix, order), dtype=np.int64)

    def mask_pad(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets with every `<fim_pad>` set to the ignored index (-100)."""
        return targets.masked_fill(targets == self.fim.pad, IGNORE_INDEX)


def line_span(text: str, rng: np.random.Generator) -> tuple[int, int]:
    """(start, end) of a middle cut at lines (see the module docstring), start <= end."""
    starts = [0, *(m.end() for m in re.finditer("\n", text[:-1]))]  # each line's first character
    first = int(rng.integers(0, len(starts)))
    last = min(len(starts), first + int(rng.integers(1, MAX_SPAN_LINES + 1))) - 1
    end = starts[last + 1] if last + 1 < len(starts) else len(text)  # after the last line's newline
    if rng.random() < 0.5:  # whole lines
        start = starts[first]
    else:  # from the cursor mid-line to the end of the last line, its newline left to the suffix
        line_end = starts[first + 1] - 1 if first + 1 < len(starts) else len(text)
        start = int(rng.integers(starts[first], line_end + 1))
        if end > start and text[end - 1] == "\n":
            end -= 1
    return len(back_off(text[:start])[0]), end


def make_fim_transform(tokenizer, data: DataSettings) -> FimTransform | None:
    """The transform `data` asks for (its FIM rates and seed), or None for plain left-to-right
    training; `train` and `finetune` both build it here, so a new data setting is one change.

    `data.fim_rate` None means: 0.5 where the tokenizer has the sentinels, else 0 (so existing
    configs and left-to-right tokenizers train as before)."""
    rate = (0.5 if tokenizer is not None and tokenizer.fim is not None else 0.0) if data.fim_rate is None \
        else data.fim_rate
    if rate == 0.0:
        return None
    if tokenizer is None:
        raise PolycoderError("fill-in-the-middle training needs the tokenizer of the token shards; "
                             "tokenize with `polycoder data tokenize`, which copies it to TOKENS_DIR/tokenizer")
    return FimTransform(tokenizer, rate, data.fim_spm_rate, data.seed, data.fim_line_rate)
