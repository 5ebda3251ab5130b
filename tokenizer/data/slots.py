"""The one rank x worker split: which share of a list of shards (or jobs) a reader takes.

A reader is one DataLoader worker of one rank. Reader `index` of `count` (index = rank *
workers + worker, count = world_size * workers) takes items index, index + count, ...;
every item goes to exactly one reader, and every rank computes the same split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from torch.utils.data import get_worker_info

T = TypeVar("T")


@dataclass(frozen=True)
class Slot:
    index: int  # this reader, 0 <= index < count
    count: int  # readers over all ranks and workers

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"reader {self.index} of {self.count} does not exist")

    def take(self, items: Sequence[T]) -> list[T]:
        """This reader's share of `items`: items[index::count]."""
        return list(items[self.index :: self.count])

    def owns(self, running: int) -> bool:
        """Whether the running-th item of a list shared item by item falls to this reader."""
        return running % self.count == self.index


def reader_slot(rank: int, world_size: int, worker: int = 0, workers: int = 1) -> Slot:
    """The slot of `worker` (of `workers`) on `rank` (of `world_size`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} does not exist")
    return Slot(rank * workers + worker, world_size * workers)


def current_slot(rank: int = 0, world_size: int = 1) -> Slot:
    """The slot of the calling DataLoader worker on `rank` (worker 0 of 1 outside one)."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return reader_slot(rank, world_size, worker, workers)
