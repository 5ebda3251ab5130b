"""The one resumable shard stream: tar shards -> decoded samples, for one reader (slot).

For epoch e of a reader (a Slot: one DataLoader worker of one rank):

- the shard order is a permutation drawn from (seed, e), the same on every rank (or the
  listed order, without shard shuffling);
- the slot reads slot.take(order), or, with fewer shards than slots, every shard keeping
  the raw samples whose running index falls to it (tars.slot_samples);
- raw samples (bytes) pass a shuffle buffer seeded from (seed, e, slot); the i-th sample
  out of the buffer has raw index i in that epoch;
- only then is a sample decoded, by the function the caller passes (images for the
  tokenizers, index-shard codes for the priors), which gets the sample's Place to seed
  any randomness from.

A reader's position is therefore just (epoch, next raw index). A resumed stream neither
reads nor decodes the samples already consumed: it skips the shards whose sizes earlier
items reported (StreamItem.shard_sizes, kept in the checkpoint) without opening them, and
in the others reads the tar headers and seeks past the payloads. The shuffle buffer's draws do not depend
on the samples, so the order that follows is the uninterrupted one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from tokenizer.data.order import SHUFFLE, buffer_shuffle, mix_seed, shard_order
from tokenizer.data.slot_samples import slot_samples
from tokenizer.data.slots import Slot
from tokenizer.data.tars import RawSample, SampleRef

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class StreamPosition:
    epoch: int = 0
    next_index: int = 0  # raw index (within the epoch) of the next sample to emit


@dataclass(frozen=True)
class Place:
    """Where a sample sits in a stream: what a decode function seeds randomness from."""

    epoch: int
    slot: int
    index: int  # raw index within the epoch


@dataclass
class StreamItem(Generic[T]):
    epoch: int
    index: int  # raw index within the epoch
    key: str
    value: T | None  # None: a bad sample (decode refused it), or only errors to report
    skipped: int  # bad samples and tar errors charged to this item
    # (shard index, samples) of the shards this slot finished reading since the last item:
    # what a resume needs to skip them whole (see slot_samples).
    shard_sizes: tuple[tuple[int, int], ...] = ()


# decode(raw, place) -> value, or None for a bad sample (the function logs why).
Decode = Callable[[RawSample, Place], "T | None"]


@dataclass(frozen=True)
class StreamSpec:
    shards: Sequence[str]
    seed: int = 0
    shuffle_shards: bool = True  # a new shard order per epoch; else the listed order
    shuffle_buffer: int = 0  # <= 1: no sample shuffle
    epochs: int | None = None  # epochs to run from the start position; None: endless
    # Samples per epoch of every slot (equal counts); None: all the slot's samples.
    limit: Callable[[int], int] | None = None  # epoch -> samples
    # None: a broken tar is logged and counted as a bad sample; else it raises
    # RuntimeError with this hint (an index shard must not lose samples silently).
    strict: str | None = None
    what: str = "sample"  # for the error when nothing in an epoch decodes


class _TarErrors:
    """Tar errors seen since the last emitted sample (they are charged to that sample)."""

    def __init__(self, report: bool, strict: str | None) -> None:
        self.report = report
        self.strict = strict
        self.pending = 0

    def __call__(self, message: str) -> None:
        if self.strict is not None:
            raise RuntimeError(f"{message}: {self.strict}")
        if self.report:
            logger.warning(message)
            self.pending += 1

    def take(self) -> int:
        pending, self.pending = self.pending, 0
        return pending


def _order(spec: StreamSpec, epoch: int) -> list[int]:
    if spec.shuffle_shards:
        return shard_order(spec.seed, epoch, len(spec.shards))
    return list(range(len(spec.shards)))


def _lazy_until(skip: int, buffer: int) -> int:
    # Output i of the buffer leaves when input i + buffer arrives: inputs from
    # skip + buffer on come after every skipped output and are read at once; earlier
    # ones are only located, and those still in the buffer are loaded when they leave.
    if skip == 0:
        return 0
    return skip + buffer if buffer > 1 else skip


def iter_shard_stream(
    spec: StreamSpec,
    decode: Decode[T],
    slot: Slot,
    start: StreamPosition | None = None,
    report_errors: bool | None = None,
    shard_sizes: Mapping[int, int] | None = None,
) -> Iterator[StreamItem[T]]:
    """The decoded samples of one slot from `start` on; see the module docstring.

    `report_errors`: whether this slot logs and counts broken tars; by default every
    slot does when shards are split whole, and only slot 0 when every slot reads every
    shard (then a broken tar is counted once in all rather than once per slot).
    `shard_sizes`: shard index -> samples, as earlier items reported them: a resume skips
    those shards without opening them."""
    start = start or StreamPosition()
    learned: list[tuple[int, int]] = []
    if report_errors is None:
        report_errors = len(spec.shards) >= slot.count or slot.index == 0
    errors = _TarErrors(report_errors, spec.strict)
    epoch = start.epoch
    while spec.epochs is None or epoch < start.epoch + spec.epochs:
        skip = start.next_index if epoch == start.epoch else 0
        limit = spec.limit(epoch) if spec.limit is not None else None
        buffer = spec.shuffle_buffer
        raws = slot_samples(
            spec.shards,
            _order(spec, epoch),
            slot,
            errors,
            _lazy_until(skip, buffer),
            sizes=shard_sizes if epoch == start.epoch else None,
            on_size=lambda j, n: learned.append((j, n)),
        )
        rng = random.Random(mix_seed(spec.seed, SHUFFLE, epoch, slot.index))
        emitted = decoded = 0
        i = -1
        for i, raw in enumerate(buffer_shuffle(raws, buffer, rng)):
            if limit is not None and i >= limit:
                break
            emitted += 1
            tar_errors = errors.take()
            if i < skip:
                continue  # consumed before the resume: not read, already counted
            sample = raw.load() if isinstance(raw, SampleRef) else raw
            value = decode(sample, Place(epoch, slot.index, i))
            decoded += value is not None
            sizes = tuple(learned)
            learned.clear()
            yield StreamItem(epoch, i, sample.key, value, tar_errors + (value is None), sizes)
        if spec.epochs is not None and errors.pending:
            # A broken tar after the last sample of a finite stream still gets counted.
            yield StreamItem(epoch, i + 1, "", None, errors.take())
        # Without these checks an endless stream with nothing usable would spin forever.
        if spec.epochs is None and emitted == 0:
            raise RuntimeError(
                f"slot {slot.index} of {slot.count} got no samples in epoch {epoch} from "
                f"{len(spec.shards)} shards (fewer samples than ranks x workers?): "
                f"{', '.join(spec.shards[:10])}"
            )
        if spec.epochs is None and decoded == 0 and skip == 0:
            raise RuntimeError(
                f"slot {slot.index} of {slot.count}: no decodable {spec.what} in a whole "
                f"epoch of shards {', '.join(spec.shards[:10])}"
            )
        epoch += 1
