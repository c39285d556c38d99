"""Products of a few rows on the CPU through the native weight-streaming kernel.

A product of up to `kernels.MAX_ROWS` rows without gradients is bound by reading the
weight once; `polycoder.kernels.linear` streams fp32, bf16 and int8 weights (int8 without
rounding the activations to bf16, as `torch._weight_int8pack_mm` does). It is the product
the native decode step's head has always used, and the one the prefill used before the
restructuring; its speed is measured within whole steps (benchmarks/decode.py), not alone.
`FewRowOps` (`polycoder.ops.Ops`) sends those products there and everything else to
PyTorch. It serves the engine's prefill (every prompt's output head, which is one row; all
products of a prompt of up to 8 tokens) and the decode steps of a few rows that the
whole-stack native call does not take.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from polycoder import kernels
from polycoder.model import TorchOps
from polycoder.quantize import Int8Linear


def tensor_of(module: nn.Module, name: str) -> torch.Tensor | None:
    """A parameter or buffer, straight from the module's dicts (nn.Module.__getattr__ is
    slow on a per-token path)."""
    t = module._parameters.get(name)
    return t if t is not None else module._buffers.get(name)


def kernel_linear(layer: nn.Module) -> tuple | None:
    """(weight, fp32 scale or None, bias or None) of a layer the native kernels can run."""
    if type(layer) is Int8Linear:
        return tensor_of(layer, "weight"), tensor_of(layer, "scale32"), tensor_of(layer, "bias")
    if type(layer) is nn.Linear:
        return tensor_of(layer, "weight"), None, tensor_of(layer, "bias")
    return None


class FewRowOps(TorchOps):
    """`TorchOps` whose linear layers of a few rows without gradients run natively."""

    def linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        spec = kernel_linear(layer)
        if spec is not None and kernels.usable(x, spec[0]):
            weight, scale, bias = spec
            return kernels.linear(x, weight, bias, scale)
        return layer(x)

    def __repr__(self) -> str:
        return "FewRowOps()"


FEW_ROW_OPS = FewRowOps()
