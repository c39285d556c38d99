"""The operations of the model that a backend may run faster.

`GPTNeoX` (polycoder.model) computes everything in plain PyTorch. Four of its operations
are asked of an `Ops` object instead of being written inline, so that a backend can
replace them without touching the model:

    linear(layer, x)                  layer(x), every linear layer and the output head
    qkv_rotary(qkv, n_head, cos, sin) q, k, v from the fused projection, q and k rotated
                                      (whole sequences)
    causal_attention(q, k, v)         softmax(q k^T / sqrt(d), causal) v (whole sequences)
    head_loss(h, weight, targets)     mean cross-entropy of the logits h @ weight^T

`polycoder.model.TorchOps` is the plain PyTorch form the model uses by default. The
backend (`polycoder.backend.choose`) makes the fast ones: `TrainOps` for training (oneDNN
products, native kernels, a fused head and loss) and `FewRowOps` for the engine's prefill
(native products of a few rows). Every implementation must give the same values as
`TorchOps` within the arithmetic's rounding (tests compare them).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Ops(Protocol):
    def linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """layer(x) for one of the model's linear layers (a LoRA or quantized layer included)."""
        ...

    def qkv_rotary(self, qkv: torch.Tensor, n_head: int, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, T, hs] from the fused projection [B, T, 3C] (interleaved per head:
        q, k, v of head 0, then head 1, ...), q and k rotated by cos/sin [T, 1, 1, rot]."""
        ...

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d), causal) v for q, k, v [B, H, T, d]."""
        ...

    def head_loss(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits h @ weight^T [N, V] against targets [N], -100 ignored."""
        ...
