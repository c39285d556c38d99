"""`polycoder generate`: complete a prompt from the command line (streamed for one sample).

The verb's module: what runs the model (torch and our modules that import it) is imported
inside `cli_generate`, so that `polycoder generate --help` reads the options without
importing torch (about 2 s); tests/test_structure.py allows this for the verb modules only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from polycoder.errors import PolycoderError
from polycoder.options import ModelOptions


def cli_generate(
    prompt: str | None = None,
    prompt_file: Path | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | None = None,
    num_samples: int = 1,
    num_beams: int = 1,
    echo: bool = False,
    json_output: bool = False,
    truncate: bool = False,
    stop_at_eod: bool = True,
    model_options: ModelOptions | None = None,
    threads: int = 0,
    compile: bool = False,
    speculate: int = 0,
    draft_model: str | None = None,
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> None:
    """Complete a prompt with a model and print the completion (streamed for one sample).

    Args:
        prompt: the prompt text, taken exactly (tabs, newlines, spaces kept).
        prompt_file: read the prompt from this file; `-` or no prompt at all reads stdin.
        max_new_tokens: most tokens to generate.
        temperature: sampling temperature; 0 means greedy.
        top_p: nucleus sampling threshold.
        top_k: keep only the k most likely tokens (0: no limit).
        seed: random seed for reproducible sampling.
        stop: stop string(s): the output is cut before the first one (repeatable).
        num_samples: how many completions to draw (they share one prefill).
        num_beams: beam search width (1: none).
        echo: print the prompt before the completion.
        json_output: print a JSON list of completions (text, finish_reason, tokens).
        truncate: keep the last tokens of a prompt too long for the context instead of failing.
        stop_at_eod: stop at <|endoftext|> (the end of a document).
        model_options: the model and how to load it (--model, --dtype, ...).
        threads: CPU threads (0: one a physical core).
        compile: torch.compile the decode step (minutes to compile on a CPU; pays only for long runs, if at all).
        speculate: guess up to N tokens a step from the prompt and the text so far (prompt lookup) and verify
            them in one forward pass: the same output (greedy, or sampled: the same sample for a seed), faster where
            the text repeats its context (0: off).
        draft_model: with --speculate, guess with this small model of the same tokenizer (a folder, hub id, run or
            adapter folder, polycoder-tiny) instead of prompt lookup, e.g. PolyCoder-160M for PolyCoder-2.7B.
        repeat_penalty: lower the tokens seen among the last --repeat-last-n (llama.cpp's repeat_penalty: a
            positive logit divided by it, a negative one multiplied; 1: off). For a small model that loops; code
            repeats itself by nature, so keep it near 1 (1.1-1.3).
        repeat_last_n: how many of the latest tokens (prompt and output) the penalties count (-1: all).
        presence_penalty: subtracted from the logit of each token seen among them (0: off).
        frequency_penalty: subtracted from a seen token's logit for each time it was seen (0: off).
    """
    from polycoder.backend import set_threads
    from polycoder.checkpoint import device_of, load
    from polycoder.generation.complete import generate, stream
    from polycoder.generation.penalties import Penalties
    from polycoder.generation.sampling import SamplingParams

    text = read_prompt(prompt, prompt_file)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            num_samples=num_samples, num_beams=num_beams, stop=tuple(stop or ()), seed=seed,
                            truncate=truncate, stop_at_eod=stop_at_eod,
                            penalties=Penalties(repeat=repeat_penalty, presence=presence_penalty,
                                                frequency=frequency_penalty, last_n=repeat_last_n))
    model_options = model_options or ModelOptions()
    if device_of(model_options.device) == "cpu":
        set_threads(threads or None)
    net, tok = load(model_options)
    draft = None
    if draft_model is not None:
        draft, _ = load(replace(model_options, model=draft_model, quantize=None, random_init=False))
    out = sys.stdout
    if json_output:
        completions = generate(net, tok, [text], params, compile=compile, speculate=speculate, draft_model=draft)[0]
        out.write(json.dumps([{"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)}
                              for c in completions], ensure_ascii=False) + "\n")
        return
    if echo:
        out.flush()
        sys.stdout.buffer.write(text.encode("utf-8", errors="surrogateescape"))
        sys.stdout.buffer.flush()
    if num_samples == 1 and num_beams == 1:
        for piece in stream(net, tok, text, params, compile=compile, speculate=speculate, draft_model=draft):
            out.write(piece)
            out.flush()
        _end_line(out)
        return
    for i, c in enumerate(generate(net, tok, [text], params, compile=compile, speculate=speculate, draft_model=draft)[0]):
        if num_samples > 1:
            out.write(f"\n===== sample {i + 1} ({c.finish_reason}) =====\n{c.text}\n")
        else:
            out.write(c.text)
            _end_line(out)


def _end_line(out) -> None:
    """A terminal gets a newline after the completion so the shell's prompt starts on its own
    line; a pipe or file gets the completion exactly, with nothing added."""
    if out.isatty():
        out.write("\n")


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from --prompt, --prompt-file or stdin, exactly (invalid UTF-8 kept as surrogates)."""
    if prompt is not None and prompt_file is not None:
        raise PolycoderError("give either --prompt or --prompt-file, not both")
    if prompt is not None:
        return prompt
    if prompt_file is not None and str(prompt_file) != "-":
        try:
            return Path(prompt_file).read_bytes().decode("utf-8", errors="surrogateescape")
        except FileNotFoundError:
            raise PolycoderError(f"prompt file not found: {prompt_file}") from None
    if sys.stdin is None or sys.stdin.isatty():
        raise PolycoderError("no prompt: give --prompt TEXT, --prompt-file F, or pipe it on stdin")
    return sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
