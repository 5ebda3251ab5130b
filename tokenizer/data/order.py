"""Seeded orders: per-epoch shard permutations and a shuffle buffer, reproducible from seeds."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Distinct first words keep the seed streams of different purposes independent.
ORDER, SHUFFLE, AUGMENT = 1, 2, 3


def mix_seed(*parts: int) -> int:
    # SeedSequence mixes a tuple into one well-spread seed; masking admits negative seeds.
    words = [p & 0xFFFFFFFFFFFFFFFF for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def shard_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    """The shard permutation of one epoch; every rank computes the same one."""
    order = list(range(num_shards))
    random.Random(mix_seed(seed, ORDER, epoch)).shuffle(order)
    return order


def buffer_shuffle(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """A streaming shuffle through a buffer of `size` items (size <= 1: no shuffle)."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer
