"""Equal per-reader sample counts per epoch, so that DDP ranks run the same number of steps.

Ranks that read unequal shares of an index run unequal numbers of batches, and DDP hangs
at the epoch's end waiting for the one that stopped. The manifest knows every shard's
sample count, so every reader (slot: one DataLoader worker of one rank) computes every
slot's share of the epoch without reading anything, and all agree on one count:

- "drop": every slot stops at the smallest share; the samples past it are left out of
  this epoch. With shuffling the shard order (and so what is left out) changes every
  epoch; without it the same samples are left out every epoch.
- "wrap": every slot reaches the largest share by reading its own first samples again;
  no sample is left out, a few come twice in the epoch.
- "keep": every slot reads its whole share (a single process, or a consumer that needs
  each sample exactly once and no lockstep).

Equal samples per slot give equal batches per rank whatever the batch size, since every
rank has the same number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence

REMAINDERS = ("drop", "wrap", "keep")


def slot_counts(shard_sizes: Sequence[int], order: Sequence[int], count: int) -> list[int]:
    """Samples each of `count` slots reads in an epoch whose shard order is `order`: the
    split of tars.slot_samples (whole shards order[i::count], or with fewer shards than
    slots every shard, sample by sample over the running index)."""
    if len(shard_sizes) >= count:
        return [sum(shard_sizes[j] for j in order[i::count]) for i in range(count)]
    total = sum(shard_sizes)
    return [len(range(i, total, count)) for i in range(count)]


def epoch_share(counts: Sequence[int], remainder: str) -> int | None:
    """The samples every slot emits this epoch (None: each its own share, "keep")."""
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {', '.join(REMAINDERS)}, got {remainder!r}")
    if remainder == "keep":
        return None
    if remainder == "drop":
        return min(counts)
    if max(counts) and not min(counts):
        raise ValueError(
            f"remainder='wrap': some of the {len(counts)} readers get no sample to repeat "
            f"(the index holds {sum(counts)}); use fewer ranks x workers or remainder='drop'"
        )
    return max(counts)
