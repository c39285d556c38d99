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
from typing import TYPE_CHECKING, Literal

from polycoder.errors import PolycoderError
from polycoder.options import ModelOptions

if TYPE_CHECKING:  # they import torch, which `polycoder generate --help` must not
    from polycoder.generation.sampling import SamplingParams
    from polycoder.tokenizer import Tokenizer


def cli_generate(
    prompt: str | None = None,
    prompt_file: Path | None = None,
    suffix: str | None = None,
    suffix_file: Path | None = None,
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
    fim_order: Literal["spm", "psm"] = "spm",
    stop_at_suffix: bool = True,
    suffix_fallback: Literal["off", "prefix-only"] = "off",
) -> None:
    """Complete a prompt, or fill the middle up to a --suffix, and print the completion (streamed for one sample).

    Args:
        prompt: the prompt text, taken exactly (tabs, newlines, spaces kept).
        prompt_file: read the prompt from this file; `-` or no prompt at all reads stdin.
        suffix: the code after the cursor: the model fills the middle between the prompt and it, as an editor asks
            (a model with fill-in-the-middle tokens, such as the bundled one); empty: a plain completion.
        suffix_file: read the suffix from this file.
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
        compile: torch.compile the decode step, on a GPU (refused on a CPU, with a warning saying why).
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
        fim_order: with a suffix, how the prompt lays out prefix and suffix (spm: the prefix last, as the server).
        stop_at_suffix: with a suffix, end where the code around the cursor says: mid-line, at the line's end
            less what repeats the rest of the line; at the start of a line of code, before that code; on a line
            of its own, before the code below; and a line written three times in a row after its first copy (the
            server's rule).
        suffix_fallback: a model without FIM tokens given a suffix: off refuses it; prefix-only completes the
            prompt alone, with the suffix's stop rule, and says on stderr that the suffix was ignored (as the server).
    """
    from polycoder.backend import set_threads
    from polycoder.checkpoint import device_of, load
    from polycoder.generation.complete import generate, stream
    from polycoder.generation.penalties import Penalties
    from polycoder.generation.sampling import SamplingParams

    text = read_prompt(prompt, prompt_file)
    after = read_suffix(suffix, suffix_file)
    if after and num_beams > 1:
        raise PolycoderError("beam search does not fill in the middle: leave out --num-beams, or --suffix")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            num_samples=num_samples, num_beams=num_beams, stop=tuple(stop or ()), seed=seed,
                            truncate=truncate, stop_at_eod=stop_at_eod,
                            penalties=Penalties(repeat=repeat_penalty, presence=presence_penalty,
                                                frequency=frequency_penalty, last_n=repeat_last_n))
    model_options = model_options or ModelOptions()
    if device_of(model_options.device) == "cpu":
        set_threads(threads or None)
    net, tok = load(model_options)
    asked: str | list[int] = text
    if after:
        asked, params = at_cursor(tok, net.config.block_size, text, after, params, fim_order, stop_at_suffix,
                                  model_options.model or "the bundled model", suffix_fallback == "prefix-only")
    draft = None
    if draft_model is not None:
        draft, _ = load(replace(model_options, model=draft_model, quantize=None, random_init=False))
    out = sys.stdout
    if json_output:
        completions = generate(net, tok, [asked], params, compile=compile, speculate=speculate, draft_model=draft)[0]
        out.write(json.dumps([{"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)}
                              for c in completions], ensure_ascii=False) + "\n")
        return
    if echo:
        out.flush()
        sys.stdout.buffer.write(text.encode("utf-8", errors="surrogateescape"))
        sys.stdout.buffer.flush()
    if num_samples == 1 and num_beams == 1:
        for piece in stream(net, tok, asked, params, compile=compile, speculate=speculate, draft_model=draft):
            out.write(piece)
            out.flush()
    else:
        for i, c in enumerate(generate(net, tok, [asked], params, compile=compile, speculate=speculate,
                                       draft_model=draft)[0]):
            out.write(f"\n===== sample {i + 1} ({c.finish_reason}) =====\n{c.text}\n" if num_samples > 1 else c.text)
    if echo and after:
        out.write(after)
    if num_samples == 1:
        _end_line(out)


def at_cursor(tok: Tokenizer, context: int, prefix: str, suffix: str, params: SamplingParams, order: str, stop_at_suffix: bool,
              model_name: str, fallback: bool = False) -> tuple[list[int], SamplingParams]:
    """The prompt ids and settings that fill the middle between `prefix` and `suffix`, as the
    server's at-cursor routes build them (`polycoder.serve.at_cursor`): the FIM prompt of
    `polycoder.fim.cursor_ids`, the sentinels ending a sample, the whitespace before the
    cursor left to the model, the suffix's stop rule, and CRLF read as LF, the output written
    with the document's line break (`polycoder.line_breaks`). A model without FIM tokens is
    refused, or with `fallback` asked the prefix alone (the server's --suffix-fallback)."""
    from polycoder.fim import ORDERS, back_off, cursor_ids, fit_around_cursor
    from polycoder.generation.suffix_stop import SuffixStop
    from polycoder.line_breaks import lf_around_cursor

    prefix, suffix, eol = lf_around_cursor(prefix, suffix)  # the model reads LF; the output gets `eol`
    params = replace(params, eol=eol)
    rule = SuffixStop.of(prefix, suffix) if stop_at_suffix else None
    if tok.fim is None and not fallback:
        raise PolycoderError(f"{model_name}: its tokenizer has no fill-in-the-middle tokens (<fim_prefix>, <fim_middle>, "
                             "<fim_suffix>, <fim_pad>), so it cannot fill between the prompt and --suffix; teach it "
                             "with `polycoder finetune --fim`, give --suffix-fallback prefix-only to complete the prompt "
                             "alone, or leave out --suffix")
    if tok.fim is None:
        print(f"polycoder generate: the suffix was ignored: {model_name} has no fill-in-the-middle tokens, so it "
              "completes the prompt alone (--suffix-fallback prefix-only)", file=sys.stderr)
        kept, heal = back_off(prefix)
        ids, _, cut = fit_around_cursor(tok.encode, kept, "", context - params.max_new_tokens, tok.max_token_bytes)
        if cut and not params.truncate:
            raise PolycoderError(f"the prompt does not fit the model's context of {context} tokens with "
                                 f"--max-new-tokens {params.max_new_tokens}: give --truncate to cut its start, or lower "
                                 "--max-new-tokens")
        return ids or [tok.eod_id], replace(params, suffix_stop=rule, heal=heal)
    if order not in ORDERS:
        raise PolycoderError(f"--fim-order must be one of {', '.join(ORDERS)}, got {order!r}")
    room = context - params.max_new_tokens
    if room <= 3:  # the three sentinels
        raise PolycoderError(f"--max-new-tokens {params.max_new_tokens} leaves no room for the code around the cursor "
                             f"in the model's context of {context} tokens; lower it")
    prompt = cursor_ids(tok.encode, tok.fim, prefix, suffix, room, order, tok.max_token_bytes)
    if prompt.cut and not params.truncate:
        raise PolycoderError(f"the prompt and the suffix do not fit the model's context of {context} tokens with "
                             f"--max-new-tokens {params.max_new_tokens}: give --truncate to cut the prompt's start and "
                             "the suffix's end away from the cursor (as the server does), or lower --max-new-tokens")
    return prompt.ids, replace(params, stop_ids=(*params.stop_ids, *tok.fim.all), suffix_stop=rule, heal=prompt.heal)


def _end_line(out) -> None:
    """A terminal gets a newline after the completion so the shell's prompt starts on its own
    line; a pipe or file gets the completion exactly, with nothing added."""
    if out.isatty():
        out.write("\n")


def read_suffix(suffix: str | None, suffix_file: Path | None) -> str:
    """The code after the cursor from --suffix or --suffix-file, exactly ("" for none)."""
    if suffix is not None and suffix_file is not None:
        raise PolycoderError("give either --suffix or --suffix-file, not both")
    if suffix_file is None:
        return suffix or ""
    return _read_text(suffix_file, "suffix")


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from --prompt, --prompt-file or stdin, exactly (invalid UTF-8 kept as surrogates)."""
    if prompt is not None and prompt_file is not None:
        raise PolycoderError("give either --prompt or --prompt-file, not both")
    if prompt is not None:
        return prompt
    if prompt_file is not None and str(prompt_file) != "-":
        return _read_text(prompt_file, "prompt")
    if sys.stdin is None or sys.stdin.isatty():
        raise PolycoderError("no prompt: give --prompt TEXT, --prompt-file F, or pipe it on stdin")
    return sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")


def _read_text(path: Path, what: str) -> str:
    """A prompt or suffix file, exactly (invalid UTF-8 kept as surrogates), or a clear error."""
    try:
        return Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise PolycoderError(f"{what} file not found: {path}") from None
    except OSError as e:  # a folder, no permission
        raise PolycoderError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
