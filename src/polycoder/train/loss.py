"""The training loss: mean next-token cross-entropy, and how micro-batches add up to a batch.

`model_loss` is our GPTNeoX's fused loss (`forward(x, targets=y)`: the output head and the
cross-entropy without the [B*T, V] logits kept) or, for any other model (a transformers
model), cross-entropy of its logits. Targets of -100 are ignored (`IGNORE_INDEX`: the
fill-in-the-middle padding, `polycoder.train.fim_transform`).

`share_weights`: a step's loss is the mean over every counted target of the global batch.
Where micro-batches count different numbers of targets (ignored padding), the mean of their
means would depend on how the batch is split over processes and accumulation steps; each
micro-batch's mean is instead weighted by its share of the global count (summed over ranks;
DDP then averages over ranks, hence the world size), which keeps N processes equal to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polycoder.model import GPTNeoX
from polycoder.train.distributed import Dist

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; `targets` are already shifted, -100 is ignored."""
    # fp32 log-softmax: bf16 logits lose ~3 digits of the loss otherwise.
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def call_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of our model (a tensor) or of a transformers model (an output with .logits)."""
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def takes_targets(model: nn.Module) -> bool:
    """Whether `model` (or the network inside a DDP / peft wrapper) is our GPTNeoX, whose
    forward computes the loss itself from `targets` without materialising the logits."""
    return any(isinstance(m, GPTNeoX) for m in model.modules())


def model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fused: bool) -> torch.Tensor:
    """Mean next-token loss of `model` on inputs `x` and shifted targets `y`."""
    if fused:
        return model(x, targets=y)
    return lm_loss(call_logits(model, x), y)


def share_weights(targets: list[torch.Tensor], dist: Dist) -> list[float]:
    """Weights of this rank's micro-batches' mean losses (targets: one tensor each) that make
    the step's loss the mean over all counted targets of the global batch (see above)."""
    counts = [int((y != IGNORE_INDEX).sum()) for y in targets]
    total = dist.mean(float(sum(counts))) * dist.world_size
    return [dist.world_size * c / max(total, 1.0) for c in counts]
