"""The model's whole-sequence operations for training, with the fast paths a backend turns on.

`TrainOps` implements `polycoder.ops.Ops`. What it adds to the model's plain PyTorch
(`polycoder.model.TorchOps`), each only where it applies and PyTorch's otherwise:

- `head_loss`: the output head and the cross-entropy fused, gradients computed in the
  forward pass (`polycoder.backend.fused_loss`), always: the [B*T, V] logits are one buffer
  instead of five;
- with `onednn_fp32`: fp32 CPU products of training through oneDNN instead of MKL
  (`polycoder.backend.onednn`; faster on non-Intel CPUs);
- with `native`: the QKV split + rotary as one native pass each way, and the bf16 causal
  attention backward as one native pass (`polycoder.backend.attention`, built on
  `polycoder.kernels`).

`polycoder.backend.Backend.train_ops` makes one from the backend's choice; tests build
them with every combination and compare with `TorchOps`.
"""

from __future__ import annotations

import torch
from torch import nn

from polycoder.backend import attention, onednn
from polycoder.backend.fused_loss import linear_cross_entropy
from polycoder.model import TorchOps


class TrainOps(TorchOps):
    """`TorchOps` with the fused head and loss, and optionally oneDNN and the native kernels."""

    def __init__(self, native: bool = False, onednn_fp32: bool = False):
        self.native = native
        self.onednn_fp32 = onednn_fp32 and onednn.available()

    def __repr__(self) -> str:
        return f"TrainOps(native={self.native}, onednn_fp32={self.onednn_fp32})"

    def linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # A plain nn.Linear only: LoRA and quantized layers run their own forward.
        if self.onednn_fp32 and type(layer) is nn.Linear and onednn.applies(x, layer.weight):
            return onednn.linear(x, layer.weight, layer.bias)
        return layer(x)

    def qkv_rotary(self, qkv: torch.Tensor, n_head: int, cos: torch.Tensor, sin: torch.Tensor):
        if self.native:
            T = qkv.size(1)
            split = attention.rotary_qkv(qkv, n_head, cos.view(T, -1), sin.view(T, -1))  # None where it does not apply
            if split is not None:
                return split
        return super().qkv_rotary(qkv, n_head, cos, sin)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.native:
            return attention.causal_attention(q, k, v)  # SDPA where its native backward does not apply
        return super().causal_attention(q, k, v)

    def head_loss(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h, weight, targets, native=self.native, onednn=self.onednn_fp32)
