"""A process group simulated by threads in one process: blocking collectives with the
semantics of torch.distributed's, for multi-rank codebook tests that need no launcher."""

from __future__ import annotations

import threading

import torch

from tokenizer.quantize import QuantizerOutput, VectorQuantizer


class _World:
    """Shared state of a simulated process group: one thread per rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * size


class ThreadCollective:
    """One rank's view of a _World: blocking collectives, like torch.distributed's.

    Records every call (op, shape) and every result, so tests can compare ranks.
    """

    def __init__(self, world: _World, rank: int) -> None:
        self.world, self.rank, self.world_size = world, rank, world.size
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.results: list[tuple[str, torch.Tensor]] = []
        self.sent: list[tuple[str, torch.Tensor]] = []

    def _exchange(self, op: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.calls.append((op, tuple(tensor.shape)))
        self.sent.append((op, tensor.clone()))
        self.world.slots[self.rank] = tensor.clone()
        self.world.barrier.wait()
        parts = list(self.world.slots)
        self.world.barrier.wait()  # nobody refills a slot before everyone has read it
        assert all(p.shape == tensor.shape and p.dtype == tensor.dtype for p in parts), op
        return parts

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        total = sum(self._exchange("all_reduce_sum", tensor))
        self.results.append(("all_reduce_sum", total.clone()))
        return tensor.copy_(total)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        value = self._exchange("broadcast", tensor)[src]
        self.results.append(("broadcast", value.clone()))
        return tensor.copy_(value)

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        gathered = torch.cat(self._exchange("all_gather_cat", tensor))
        self.results.append(("all_gather_cat", gathered.clone()))
        return gathered


def run_ranks(
    quantizers: list[VectorQuantizer], batches: list[list[torch.Tensor]]
) -> list[list[QuantizerOutput]]:
    """Step every rank's quantizer through its own batches, in lockstep threads; returns
    each rank's outputs. Each quantizer gets a ThreadCollective of one shared world."""
    world = _World(len(quantizers))
    for rank, q in enumerate(quantizers):
        q.collective = ThreadCollective(world, rank)
    errors: list[BaseException] = []
    outputs: list[list[QuantizerOutput]] = [[] for _ in quantizers]

    def work(rank: int) -> None:
        try:
            for z in batches[rank]:
                outputs[rank].append(quantizers[rank](z))
        except BaseException as err:  # re-raised in the main thread
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(quantizers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return outputs
