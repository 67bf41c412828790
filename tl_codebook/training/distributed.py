"""torch.distributed plumbing for data-parallel training: start from torchrun's environment, and
the few collectives the trainer needs (sum code counts, share re-initialised codes).

Without torchrun (WORLD_SIZE unset or 1) every function is a cheap no-op, so the trainer has one
code path. The backend is gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

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


def dist_info_from_env() -> DistInfo:
    """This process's rank, world size and local rank from torchrun's environment variables,
    before (or without) joining the process group: who writes the run directory."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _local_rank())
    return DistInfo(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), _local_rank()
    )


def device_for_rank(device: str | None) -> str | None:
    """The device this rank should load its model on: under torchrun each rank owns
    `cuda:{LOCAL_RANK}` (otherwise every rank would land on cuda:0); `device` unchanged alone.

    `None` or `"cuda"` become `cuda:{LOCAL_RANK}` when CUDA is there; a CUDA device naming
    another index than LOCAL_RANK is refused.
    """
    info = dist_info_from_env()
    if not info.enabled:
        return device
    if device is None:
        return f"cuda:{info.local_rank}" if torch.cuda.is_available() else None
    parsed = torch.device(device)
    if parsed.type != "cuda":
        return device
    if parsed.index is not None and parsed.index != info.local_rank:
        raise ValueError(
            f"device {device!r} under torchrun: rank {info.rank} has LOCAL_RANK="
            f"{info.local_rank}, so it trains on cuda:{info.local_rank}; give --device cuda."
        )
    return f"cuda:{info.local_rank}"


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's environment variables (if any).

    On CUDA the model must sit on `cuda:{LOCAL_RANK}` (see `device_for_rank`); that device
    becomes the current one, so NCCL and `torch.cuda` calls use it, not cuda:0. A group this
    function starts is destroyed at interpreter exit (`_destroy_group_at_exit`).
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _local_rank())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = _local_rank()
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise ValueError(
                f"Under torchrun the process with LOCAL_RANK={local_rank} trains on "
                f"cuda:{local_rank}, but the model is on {device}; load it with "
                f"device='cuda:{local_rank}' (tl_codebook.training.distributed.device_for_rank)."
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    atexit.register(_destroy_group_at_exit)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _destroy_group_at_exit() -> None:
    """Destroy the process group while the interpreter is still whole.

    Left to interpreter teardown, gloo's worker threads can still hold tensors whose release
    needs the GIL, and the process dies with SIGABRT ("terminate called without an active
    exception") after training has finished: a rank that did all its work exits non-zero and
    torchrun reports the run failed (seen once in CI, on the 2-rank test).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def ddp_device_kwargs(device: torch.device) -> dict[str, Any]:
    """`DistributedDataParallel` arguments for a model on `device`: on CUDA, this rank's one
    device (`device_ids=[LOCAL_RANK]`, output there too); on CPU none."""
    if device.type != "cuda":
        return {}
    index = _local_rank() if device.index is None else device.index
    return {"device_ids": [index], "output_device": index}


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


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
