"""The only module that calls torch.distributed.

Model code receives a `Collective` object and never imports torch.distributed itself, so
the same codebook math runs single-process in a unit test and on many ranks.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from tokenizer.fingerprint import fingerprint_int63


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


class CodebookMismatchError(RuntimeError):
    """Ranks hold different codebooks: the tokenizer would be silently wrong."""


def state_fingerprint(module: torch.nn.Module) -> int:
    """fingerprint_int63 of every parameter and buffer of `module`: the release's weight
    hash, as a number ranks can all-gather.

    Parameters partitioned by ZeRO-3 (they carry `ds_id`) hold a different shard on each
    rank and are left out; gradient all-reduce keeps them in sync.
    """
    tensors = {n: p for n, p in module.named_parameters() if not hasattr(p, "ds_id")}
    tensors.update(dict(module.named_buffers()))
    return fingerprint_int63(tensors)


def broadcast_buffers(collective: Collective, module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of `module` with rank src's. DeepSpeed never syncs buffers
    and an EMA codebook lives in buffers, so this runs once at start and on repair."""
    for buffer in module.buffers():
        collective.broadcast(buffer.data, src=src)


def check_same_state(
    collective: Collective, module: torch.nn.Module, step: int, repair: bool
) -> list[int]:
    """Compare `module`'s fingerprint across ranks; returns the ranks that differ from
    rank 0 (empty when all agree). Strict: raise naming them. Repair: re-broadcast rank
    0's buffers (parameters stay in sync through gradient all-reduce)."""
    mine = torch.tensor([state_fingerprint(module)], dtype=torch.int64)
    device = next(module.buffers(), mine).device
    everyone = collective.all_gather_cat(mine.to(device)).cpu().tolist()
    differing = [rank for rank, value in enumerate(everyone) if value != everyone[0]]
    if differing and not repair:
        raise CodebookMismatchError(
            f"step {step}: codebook state of rank(s) {differing} differs from rank 0 "
            f"(fingerprints {everyone}); set distributed.on_mismatch=repair to re-broadcast"
        )
    if differing:
        broadcast_buffers(collective, module)
    return differing


def average_gradients(collective: Collective, module: torch.nn.Module) -> None:
    """Replace every gradient of `module` by its mean over ranks (one all-reduce of all of
    them, flattened), for a module trained outside DDP / DeepSpeed. A parameter without
    a gradient on this rank counts as zero, so every rank joins the same collective."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params or collective.world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = collective.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))  # (P,)
    flat /= collective.world_size
    for param, piece in zip(params, flat.split([p.numel() for p in params]), strict=True):
        param.grad = piece.view_as(param).clone()


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] alone without a
    process group of several ranks. For results of unequal size (per-image records)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
