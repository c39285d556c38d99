"""Bringing models in from other formats.

- `polycoder convert neox` (`neox`): PolyCoder's original GPT-NeoX/DeepSpeed pipeline
  checkpoints (`global_stepN/layer_XX-model_YY-model_states.pt`) to our Hugging Face-format
  folder. (Exports, the other direction, are in `polycoder.export`.)
"""
