"""Moving models out of polycoder.

- `polycoder export gguf` (`gguf`): a Hugging Face-format GPT-NeoX folder to a GGUF file
  that llama.cpp runs (f32, f16, q8_0), with our tokenizer embedded;
- `llamacpp`: a small driver for llama.cpp (through llama-cpp-python) that checks an export
  and that the decode benchmark compares against.

Imports from other formats are in `polycoder.convert`.
"""
