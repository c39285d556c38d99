"""Text generation, one job a module (after gpt-fast and nanochat):

- `sampling`: `SamplingParams` and the pure function that draws one token a row from
  logits with per-row seeded generators;
- `text`: a sample's text (`Sequence`): stop strings, the end of the document, UTF-8
  held back until whole; `encode_prompt` fits a prompt to the context;
- `engine`: `Engine`, continuous batching over one preallocated KV cache with the decode
  step of `polycoder.backend` (native CPU kernels, CUDA graphs or PyTorch);
- `beam`: beam search on the engine's prefill, decode and cache-row copies;
- `complete`: `generate` and `stream`, the functions to call;
- `cli`: the `polycoder generate` verb.

    from polycoder.checkpoint import load_model
    from polycoder.generation import SamplingParams, generate
    model, tokenizer = load_model("path/to/PolyCoder-160M")
    [samples] = generate(model, tokenizer, ["def is_prime(n):"], SamplingParams(max_new_tokens=64))
"""

from polycoder.generation.beam import beam_search
from polycoder.generation.complete import generate, stream
from polycoder.generation.engine import CacheRows, Engine, Event, prefill
from polycoder.generation.sampling import SamplingParams, resolve_seed, sample_generator, sample_tokens
from polycoder.generation.text import Completion, FinishReason, Sequence, encode_prompt

__all__ = ["SamplingParams", "Completion", "FinishReason", "Sequence", "Engine", "Event", "CacheRows", "prefill",
           "generate", "stream", "beam_search", "sample_tokens", "sample_generator", "resolve_seed", "encode_prompt"]
