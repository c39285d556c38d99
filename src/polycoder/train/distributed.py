"""One code path from one process to many: torchrun's environment, DDP or FSDP.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set) the process group is
started with NCCL on GPUs and gloo on the CPU; without it, everything below is a no-op and
world_size is 1. The training loop itself never branches on the world size: it asks
`Dist` for its rank's rows, reduces metrics with `mean`, and the wrapped model averages
gradients.

Multi-node (one command per node, same rendezvous):
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --rdzv-backend c10d \
        --rdzv-endpoint HOST0:29500 -m polycoder train --preset polycoder-160m ...

FSDP uses torch's `fully_shard` (FSDP2) on each block and the root; checkpoints gather
full state dicts (`torch.distributed.checkpoint.state_dict`), so a checkpoint written
under FSDP is an ordinary Hugging Face folder. Limit: FSDP is exercised here only on gloo
with 2 CPU processes (tests), not on GPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def mean(self, value: float) -> float:
        """Mean of a scalar over all processes."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def any(self, flag: bool) -> bool:
        """True if `flag` is true on any process (all take the same branch afterwards)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device: str = "auto") -> Dist:
    """Join torchrun's process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, dev)


def wrap_model(model: nn.Module, d: Dist, parallel: str) -> nn.Module:
    """The model as the training step calls it: itself, DDP(model) or FSDP-sharded."""
    if not d.enabled:
        return model
    if parallel == "fsdp":
        # Deferred: only under FSDP
        from torch.distributed.fsdp import fully_shard

        for block in model.gpt_neox.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
