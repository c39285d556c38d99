"""Text generation, one job a module (after gpt-fast and nanochat):

- `sampling`: `SamplingParams` and the pure function that draws one token a row from
  logits with per-row seeded generators;
- `penalties`: repetition penalties (llama.cpp's repeat_penalty, presence and frequency),
  off unless asked;
- `text`: a sample's text (`Sequence`): stop strings, the end of the document, UTF-8
  held back until whole, a cursor's trailing whitespace dropped (`heal`); `encode_prompt`
  fits a prompt to the context;
- `suffix_stop`: where a completion at the cursor ends, from the code after the cursor;
- `engine`: `Engine`, continuous batching over one preallocated KV cache with the decode
  step of `polycoder.backend` (native CPU kernels, CUDA graphs or PyTorch);
- `prompt_cache`: recent prompts' KV in a bounded pool, reused by a prompt that shares
  their token prefix (the server's `--prompt-cache-mb`);
- `beam`: beam search on the engine's prefill, decode and cache-row copies;
- `complete`: `generate` and `stream`, the functions to call;
- `cli`: the `polycoder generate` verb.

    from polycoder.checkpoint import load_model
    from polycoder.generation import SamplingParams, generate
    model, tokenizer = load_model("path/to/PolyCoder-160M")
    [samples] = generate(model, tokenizer, ["def is_prime(n):"], SamplingParams(max_new_tokens=64))
"""

import importlib

# The names above resolve on first use (PEP 562), not when the package is imported: the
# `generate` verb's module (`polycoder.generation.cli`) lies in this package, and
# `polycoder generate --help` must not import torch (tests/test_structure.py).
_WHERE = {
    "beam_search": "beam",
    "generate": "complete", "stream": "complete",
    "CacheRows": "engine", "Engine": "engine", "Event": "engine", "prefill": "engine",
    "SamplingParams": "sampling", "resolve_seed": "sampling", "sample_generator": "sampling", "sample_tokens": "sampling",
    "Completion": "text", "FinishReason": "text", "Sequence": "text", "encode_prompt": "text",
    "SuffixStop": "suffix_stop",
    "Penalties": "penalties",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'polycoder.generation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"polycoder.generation.{_WHERE[name]}"), name)
    globals()[name] = value  # asked once
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
