"""The only module that calls torch.distributed.

Model code receives a `Collective` object and never imports torch.distributed itself, so
the same codebook math runs single-process in a unit test and on many ranks.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist


class Collective(Protocol):
    world_size: int
    rank: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor: ...

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor: ...


class LocalCollective:
    """Single process: every collective is the identity."""

    world_size = 1
    rank = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class TorchCollective:
    """torch.distributed over the default process group; results are returned, and
    in-place where torch does it in place."""

    def __init__(self) -> None:
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=src)
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        # (n, ...) per rank -> (world * n, ...); every rank must pass the same n.
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)


def current_collective() -> Collective:
    """A TorchCollective when a process group of more than one rank is up, else a no-op."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollective()
    return LocalCollective()
