"""Stream images from webdataset tar shards, deterministically and resumably.

Training is step-based, so every (rank, worker) reads an INFINITE stream: no rank runs
out first, and DDP never hangs at an epoch end. For epoch e:

- the shard order is a permutation drawn from (seed, e), the same on every rank;
- slot = rank * W + worker reads order[slot::nslots] (nslots = world_size * W), or, with
  fewer shards than slots, every shard keeping the raw samples whose running index is
  congruent to slot;
- raw samples (bytes) pass a shuffle buffer seeded from (seed, e, slot); the i-th sample
  out of the buffer has raw index i in that epoch;
- only then is a sample decoded and augmented, with randomness from (seed, e, slot, i).

A stream's position is therefore just (epoch, next raw index): a resumed stream re-reads
the tars of its epoch and drops the first next_index samples without decoding them.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tokenizer.config import DataConfig
from tokenizer.data.images.augment import ColorJitter
from tokenizer.data.images.transforms import eval_transform, train_transform
from tokenizer.data.order import AUGMENT, SHUFFLE, buffer_shuffle, mix_seed, shard_order
from tokenizer.data.shard_specs import check_shards_exist, expand_shards
from tokenizer.data.tars import (
    IMAGE_EXTENSIONS,
    DecodeError,
    RawSample,
    decode_image,
    read_tar,
    slot_samples,
)

logger = logging.getLogger(__name__)

# Names that moved to tars.py / order.py / transforms.py, still importable from here.
__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageBatch",
    "StreamPosition",
    "StreamTracker",
    "check_shards_exist",
    "eval_transform",
    "expand_shards",
    "iter_eval_batches",
    "iter_train_batches",
    "make_train_loader",
    "shard_order",
    "train_transform",
]


@dataclass
class ImageBatch:
    images: torch.Tensor  # (B, 3, R, R) float32 in [-1, 1]
    keys: list[str]
    texts: list[str | None]  # the txt field if any
    stream: int  # logical stream (worker) id that produced it
    epoch: int  # epoch of the last sample in the batch
    next_index: int  # raw index (within that epoch) just past the last sample consumed
    skipped: int  # bad samples/tars skipped while building this batch


@dataclass
class StreamPosition:
    epoch: int = 0
    next_index: int = 0


# --------------------------------------------------------------------------- shards


# expand_shards / check_shards_exist live in shard_specs.py (imported above).


# --------------------------------------------------------------------------- raw samples


class _ErrorCount:
    """Tar errors seen since the last emitted sample (they are charged to that sample)."""

    def __init__(self, report: bool) -> None:
        self.report = report
        self.pending = 0

    def __call__(self, message: str) -> None:
        if self.report:
            logger.warning(message)
            self.pending += 1

    def take(self) -> int:
        pending, self.pending = self.pending, 0
        return pending


# --------------------------------------------------------------------------- decoding


def _decode(raw: RawSample, resolution: int) -> Image.Image | None:
    try:
        return decode_image(raw, resolution)
    except DecodeError as err:
        logger.warning("shard %s: sample %r skipped: %s", raw.shard, raw.key, err)
        return None


def _text(raw: RawSample) -> str | None:
    data = raw.fields.get("txt")
    return None if data is None else data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- batching


@dataclass
class _Item:
    epoch: int
    index: int
    key: str
    text: str | None
    image: torch.Tensor | None  # None: the sample was bad
    skipped: int


def _batches(
    items: Iterator[_Item], batch_size: int, stream: int, keep_last: bool
) -> Iterator[ImageBatch]:
    images: list[torch.Tensor] = []
    keys: list[str] = []
    texts: list[str | None] = []
    skipped = 0
    last: _Item | None = None
    for item in items:
        skipped += item.skipped
        if item.image is None:
            continue
        images.append(item.image)
        keys.append(item.key)
        texts.append(item.text)
        last = item
        if len(images) == batch_size:
            yield ImageBatch(
                torch.stack(images), keys, texts, stream, item.epoch, item.index + 1, skipped
            )
            images, keys, texts, skipped = [], [], [], 0
    if keep_last and last is not None and images:
        yield ImageBatch(
            torch.stack(images), keys, texts, stream, last.epoch, last.index + 1, skipped
        )


def _train_items(
    shards: Sequence[str],
    resolution: int,
    seed: int,
    slot: int,
    nslots: int,
    shuffle_buffer: int,
    random_flip: bool,
    start: StreamPosition,
    color_jitter: ColorJitter | None = None,
) -> Iterator[_Item]:
    # In the fallback every slot reads every shard; only slot 0 (rank 0, first worker)
    # reports a broken tar, so it is counted once in all rather than once per slot.
    errors = _ErrorCount(report=len(shards) >= nslots or slot == 0)
    epoch = start.epoch
    while True:
        order = shard_order(seed, epoch, len(shards))
        raws = slot_samples(shards, order, slot, nslots, errors)
        skip = start.next_index if epoch == start.epoch else 0
        emitted = decoded = 0
        shuffled = buffer_shuffle(
            raws, shuffle_buffer, random.Random(mix_seed(seed, SHUFFLE, epoch, slot))
        )
        for i, raw in enumerate(shuffled):
            emitted += 1
            tar_errors = errors.take()
            if i < skip:
                continue  # consumed before the resume: no decode, already counted
            image = _decode(raw, resolution)
            tensor = None
            if image is not None:
                decoded += 1
                rng = random.Random(mix_seed(seed, AUGMENT, epoch, slot, i))
                tensor = train_transform(image, resolution, random_flip, rng, color_jitter)
            yield _Item(epoch, i, raw.key, _text(raw), tensor, tar_errors + (image is None))
        # Without these checks a stream with nothing usable would spin forever.
        if emitted == 0:
            raise RuntimeError(
                f"slot {slot} of {nslots} got no samples in epoch {epoch} from {len(shards)} "
                f"shards (fewer samples than ranks x workers?): {', '.join(shards[:10])}"
            )
        if decoded == 0 and skip == 0:
            raise RuntimeError(
                f"slot {slot} of {nslots}: no decodable image in a whole epoch of shards "
                f"{', '.join(shards[:10])}"
            )
        epoch += 1


def iter_train_batches(
    shards: Sequence[str],
    resolution: int,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    stream: int,
    num_streams: int,
    shuffle_buffer: int = 256,
    random_flip: bool = True,
    start: StreamPosition | None = None,
    color_jitter: ColorJitter | None = None,
) -> Iterator[ImageBatch]:
    """The infinite batch stream of one logical stream (worker) of one rank."""
    slot, nslots = rank * num_streams + stream, world_size * num_streams
    items = _train_items(
        shards,
        resolution,
        seed,
        slot,
        nslots,
        shuffle_buffer,
        random_flip,
        start or StreamPosition(),
        color_jitter,
    )
    return _batches(items, batch_size, stream, keep_last=False)


# --------------------------------------------------------------------------- resume


def _shards_digest(shards: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(shards).encode()).hexdigest()[:16]


class StreamTracker:
    """Lives in the main process; records what the training loop has consumed.

    Its state is per rank: each rank saves and restores its own.
    """

    def __init__(self, num_streams: int, layout: dict[str, Any]) -> None:
        self.positions = [StreamPosition() for _ in range(num_streams)]
        self.batches_consumed = 0
        self.bad_samples = 0
        self._layout = layout

    def update(self, batch: ImageBatch) -> None:
        self.positions[batch.stream] = StreamPosition(batch.epoch, batch.next_index)
        self.batches_consumed += 1
        self.bad_samples += batch.skipped

    @property
    def epoch(self) -> int:
        """The furthest epoch any stream has reached (for logging)."""
        return max(p.epoch for p in self.positions)

    def state_dict(self) -> dict[str, Any]:
        return {
            "positions": [[p.epoch, p.next_index] for p in self.positions],
            "batches_consumed": self.batches_consumed,
            "bad_samples": self.bad_samples,
            "layout": dict(self._layout),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [StreamPosition(int(e), int(i)) for e, i in state["positions"]]
        layout = dict(state.get("layout", {}))
        self.batches_consumed = int(state["batches_consumed"])
        self.bad_samples = int(state.get("bad_samples", 0))

        def without_rank(d: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in d.items() if k != "rank"}

        if layout.get("rank") != self._layout["rank"] and without_rank(layout) == without_rank(
            self._layout
        ):
            raise ValueError(
                f"data stream state of rank {layout['rank']} loaded on rank "
                f"{self._layout['rank']}: each rank must restore its own state"
            )
        if layout == self._layout and len(saved) == len(self.positions):
            self.positions = saved
            return
        # Other workers, ranks, seed or shards: the saved positions mean nothing here.
        # Restart every stream at the start of the earliest saved epoch, which repeats
        # some samples but skips none.
        epoch = min(p.epoch for p in saved) if saved else 0
        logger.warning(
            "data layout changed since the checkpoint (%s -> %s); streams restart at the "
            "start of epoch %d instead of resuming exactly",
            layout,
            self._layout,
            epoch,
        )
        self.positions = [StreamPosition(epoch, 0) for _ in self.positions]


class _TrainStream(IterableDataset):
    def __init__(
        self, kwargs: dict[str, Any], positions: list[StreamPosition], batches_consumed: int
    ) -> None:
        super().__init__()
        self.kwargs = kwargs
        self.positions = positions
        self.batches_consumed = batches_consumed

    def __iter__(self) -> Iterator[ImageBatch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # The DataLoader restarts its round-robin at worker 0; shifting the worker ->
        # stream map by the batches already consumed makes the resumed batch order
        # continue the uninterrupted one.
        stream = (worker + self.batches_consumed) % len(self.positions)
        return iter_train_batches(
            **self.kwargs,
            stream=stream,
            num_streams=len(self.positions),
            start=self.positions[stream],
        )


def _identity(batch: ImageBatch) -> ImageBatch:
    return batch


def make_train_loader(
    cfg: DataConfig,
    shards: list[str],
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    state: dict | None = None,
) -> tuple[DataLoader, StreamTracker]:
    """An infinite loader of ImageBatch for one rank, and the tracker to checkpoint.

    Iterate the loader ONCE (it never ends) and call tracker.update(batch) for every
    batch the training loop consumes; pass tracker.state_dict() back as `state` to
    resume exactly. Do not pass the loader through accelerate's prepare().
    """
    shards = expand_shards(shards)
    if not shards:
        raise ValueError("no training shards given (the shard list or pattern is empty)")
    check_shards_exist(shards)
    num_streams = max(1, cfg.num_workers)
    if len(shards) < world_size * num_streams:
        logger.warning(
            "%d shards for %d ranks x %d workers: every worker reads every shard and keeps "
            "1 sample in %d; use at least as many shards as ranks x workers",
            len(shards),
            world_size,
            num_streams,
            world_size * num_streams,
        )
    layout = {
        "rank": rank,
        "world_size": world_size,
        "num_streams": num_streams,
        "seed": seed,
        "shuffle_buffer": cfg.shuffle_buffer,
        "shards": _shards_digest(shards),
    }
    tracker = StreamTracker(num_streams, layout)
    if state is not None:
        tracker.load_state_dict(state)
    kwargs = {
        "shards": shards,
        "resolution": cfg.resolution,
        "batch_size": batch_size,
        "seed": seed,
        "rank": rank,
        "world_size": world_size,
        "shuffle_buffer": cfg.shuffle_buffer,
        "random_flip": cfg.random_flip,
        "color_jitter": ColorJitter(cfg.color_jitter.hue, cfg.color_jitter.saturation),
    }
    dataset = _TrainStream(kwargs, list(tracker.positions), tracker.batches_consumed)
    extra: dict[str, Any] = {}
    if cfg.num_workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": cfg.prefetch_factor}
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.num_workers,
        collate_fn=_identity,
        **extra,
    )
    return loader, tracker


# --------------------------------------------------------------------------- eval


def _eval_items(
    shards: Sequence[str], resolution: int, rank: int, world_size: int
) -> Iterator[_Item]:
    errors = _ErrorCount(report=True)
    if len(shards) >= world_size:
        raws: Iterable[RawSample] = (
            r for s in shards[rank::world_size] for r in read_tar(s, errors)
        )
    else:
        every = (r for s in shards for r in read_tar(s, errors))
        raws = (r for n, r in enumerate(every) if n % world_size == rank)
    i = -1
    for i, raw in enumerate(raws):
        image = _decode(raw, resolution)
        tensor = None if image is None else eval_transform(image, resolution)
        yield _Item(0, i, raw.key, _text(raw), tensor, errors.take() + (image is None))
    if errors.pending:  # a broken tar after the last good sample still gets counted
        yield _Item(0, i + 1, "", None, None, errors.take())


def iter_eval_batches(
    shards: str | Sequence[str],
    resolution: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[ImageBatch]:
    """Every eval sample of this rank once, in shard order, centre-cropped; the last batch
    may be short, and ranks may get different numbers of batches."""
    paths = expand_shards(shards)
    check_shards_exist(paths)
    return _batches(
        _eval_items(paths, resolution, rank, world_size), batch_size, stream=0, keep_last=True
    )
