"""Stream images from webdataset tar shards, deterministically and resumably.

Training is step-based, so every (rank, worker) reads an INFINITE stream: no rank runs
out first, and DDP never hangs at an epoch end. The stream is the one resumable shard
stream (shard_stream.py: per-epoch shard order, rank x worker slots, shuffle buffer,
exact skip) with an image decode: decode, then augment with randomness from
(seed, epoch, slot, raw index).

A stream's position is therefore just (epoch, next raw index): a resumed stream reads
the tar headers of its epoch and seeks past the first next_index samples, neither
reading nor decoding them.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tokenizer.config import DataConfig
from tokenizer.data.images.augment import ColorJitter
from tokenizer.data.images.transforms import eval_transform, train_transform
from tokenizer.data.order import AUGMENT, mix_seed, shard_order
from tokenizer.data.shard_specs import resolve_shards
from tokenizer.data.shard_stream import (
    Place,
    StreamItem,
    StreamPosition,
    StreamSpec,
    iter_shard_stream,
)
from tokenizer.data.slots import reader_slot
from tokenizer.data.tars import IMAGE_EXTENSIONS, DecodeError, RawSample, decode_image

logger = logging.getLogger(__name__)

# Names that moved to tars.py / order.py / transforms.py, still importable from here.
__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageBatch",
    "StreamPosition",
    "StreamTracker",
    "eval_transform",
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
    # (shard index, samples) of shards the stream finished reading while building it
    shard_sizes: tuple[tuple[int, int], ...] = ()


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
class _Image:
    tensor: torch.Tensor  # (3, R, R)
    text: str | None


def _batches(
    items: Iterator[StreamItem[_Image]], batch_size: int, stream: int, keep_last: bool
) -> Iterator[ImageBatch]:
    images: list[torch.Tensor] = []
    keys: list[str] = []
    texts: list[str | None] = []
    skipped = 0
    sizes: list[tuple[int, int]] = []
    last: StreamItem[_Image] | None = None
    for item in items:
        skipped += item.skipped
        sizes += item.shard_sizes
        if item.value is None:
            continue
        images.append(item.value.tensor)
        keys.append(item.key)
        texts.append(item.value.text)
        last = item
        if len(images) == batch_size:
            yield ImageBatch(
                torch.stack(images),
                keys,
                texts,
                stream,
                item.epoch,
                item.index + 1,
                skipped,
                tuple(sizes),
            )
            images, keys, texts, skipped, sizes = [], [], [], 0, []
    if keep_last and last is not None and images:
        yield ImageBatch(
            torch.stack(images),
            keys,
            texts,
            stream,
            last.epoch,
            last.index + 1,
            skipped,
            tuple(sizes),
        )


def train_decode(
    resolution: int, seed: int, random_flip: bool, color_jitter: ColorJitter | None = None
) -> Callable[[RawSample, Place], _Image | None]:
    """The training decode: image -> random crop, flip and jitter seeded by its place."""

    def decode(raw: RawSample, place: Place) -> _Image | None:
        image = _decode(raw, resolution)
        if image is None:
            return None
        rng = random.Random(mix_seed(seed, AUGMENT, place.epoch, place.slot, place.index))
        tensor = train_transform(image, resolution, random_flip, rng, color_jitter)
        return _Image(tensor, _text(raw))

    return decode


def eval_decode(resolution: int) -> Callable[[RawSample, Place], _Image | None]:
    """The evaluation decode: image -> centre crop."""

    def decode(raw: RawSample, place: Place) -> _Image | None:
        image = _decode(raw, resolution)
        return None if image is None else _Image(eval_transform(image, resolution), _text(raw))

    return decode


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
    shard_sizes: dict[int, int] | None = None,
) -> Iterator[ImageBatch]:
    """The infinite batch stream of one logical stream (worker) of one rank;
    `shard_sizes`: what earlier batches reported, for a resume to skip whole shards."""
    spec = StreamSpec(shards, seed, shuffle_buffer=shuffle_buffer, what="image")
    items = iter_shard_stream(
        spec,
        train_decode(resolution, seed, random_flip, color_jitter),
        reader_slot(rank, world_size, stream, num_streams),
        start,
        shard_sizes=shard_sizes,
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
        # Shard index -> samples, as this rank's readers found them: facts about the
        # shards, whatever epoch or reader read them, so one map serves every stream.
        self.shard_sizes: dict[int, int] = {}
        self._layout = layout

    def update(self, batch: ImageBatch) -> None:
        self.positions[batch.stream] = StreamPosition(batch.epoch, batch.next_index)
        self.batches_consumed += 1
        self.bad_samples += batch.skipped
        self.shard_sizes.update(batch.shard_sizes)

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
            "shard_sizes": {str(j): n for j, n in sorted(self.shard_sizes.items())},
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
            self.shard_sizes = {int(j): int(n) for j, n in state.get("shard_sizes", {}).items()}
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
    shards = resolve_shards(shards, "data.train_shards", required=False)
    if not shards:
        raise ValueError("no training shards given (the shard list or pattern is empty)")
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
        "shard_sizes": dict(tracker.shard_sizes),
    }
    dataset = _TrainStream(kwargs, list(tracker.positions), tracker.batches_consumed)
    extra: dict[str, Any] = {}
    if cfg.num_workers > 0:
        # Spawned, not forked: a rank starts its workers once gloo's, DeepSpeed's and its
        # own threads run, and CPython before 3.11.8 can leave a child forked then waiting
        # forever on a runtime lock another thread held (cpython#112275; seen here: a
        # resumed 2-rank run whose first batch never came). A spawned worker is a fresh
        # interpreter (a second or two, once per run: the workers persist), a child of
        # its rank as before (it exits with it); the stream's state travels pickled.
        extra = {
            "persistent_workers": True,
            "prefetch_factor": cfg.prefetch_factor,
            "multiprocessing_context": "spawn",
        }
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.num_workers,
        collate_fn=_identity,
        **extra,
    )
    return loader, tracker


# --------------------------------------------------------------------------- eval


def iter_eval_batches(
    shards: str | Sequence[str],
    resolution: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[ImageBatch]:
    """Every eval sample of this rank once, in shard order, centre-cropped; the last batch
    may be short, and ranks may get different numbers of batches."""
    paths = resolve_shards(shards, "data.eval_shards", required=False)
    # Every rank reports a broken tar it reads, also when every rank reads every shard.
    spec = StreamSpec(paths, shuffle_shards=False, epochs=1, what="image")
    items = iter_shard_stream(
        spec, eval_decode(resolution), reader_slot(rank, world_size), report_errors=True
    )
    return _batches(items, batch_size, stream=0, keep_last=True)
