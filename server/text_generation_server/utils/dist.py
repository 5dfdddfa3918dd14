"""Tensor-parallel process group: which rank this process is and how the ranks talk.

RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the environment, as the launcher sets them. A world
of one needs no process group at all, and every collective below is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from text_generation_server import device as device_layer

DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    world_size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup when world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., world_size · n], rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def shard_range(self, size: int) -> tuple[int, int]:
        """This rank's [start, stop) of `size` items split evenly; the caller checked divisibility."""
        assert size % self.world_size == 0, f"{size} is not divisible by world size {self.world_size}"
        block = size // self.world_size
        return self.rank * block, (self.rank + 1) * block


SINGLE_RANK = TensorParallelGroup()


def initialize_distributed(device: torch.device) -> TensorParallelGroup:
    """Join the process group described by the environment (gloo on CPU, nccl on CUDA, hccl on Ascend)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK {rank} is outside [0, WORLD_SIZE {world_size})")
    if world_size == 1:
        return SINGLE_RANK
    missing = [name for name in DISTRIBUTED_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"a sharded shard needs the environment variables {', '.join(missing)}")
    dist.init_process_group(
        backend=device_layer.distributed_backend(device),
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=int(os.environ.get("DISTRIBUTED_TIMEOUT_S", "600"))),
    )
    return TensorParallelGroup(rank, world_size, dist.group.WORLD)


def shutdown_distributed() -> None:
    """Leave the process group before exiting: gloo aborts the process if its threads outlive the interpreter.

    No barrier first: a rank must be able to leave while its peers are stopping, stopped already or dead (a
    barrier waited for the slowest of them, up to the group's timeout)."""
    if dist.is_initialized():
        dist.destroy_process_group()
