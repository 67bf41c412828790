"""torch.distributed plumbing for data-parallel training: start from torchrun's environment, and
the few collectives the trainer needs (sum code counts, share re-initialised codes).

Without torchrun (WORLD_SIZE unset or 1) every function is a cheap no-op, so the trainer has one
code path. The backend is gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's environment variables (if any)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `tensor` over ranks, in place (a no-op on one process)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank 0's values, in place."""
    if info.enabled:
        dist.broadcast(tensor, src=0)
    return tensor


def shard_batch(tokens: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (the batch size must divide evenly)."""
    if not info.enabled:
        return tokens
    if tokens.shape[0] % info.world_size:
        raise ValueError(
            f"Batch size {tokens.shape[0]} is not divisible by the world size {info.world_size}."
        )
    per_rank = tokens.shape[0] // info.world_size
    return tokens[info.rank * per_rank : (info.rank + 1) * per_rank]
