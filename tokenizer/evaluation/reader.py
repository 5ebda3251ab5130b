"""The evaluation reader of the report tool: every sample of this rank's share of the
shards once, centre-cropped as the eval stream crops, in batches that carry their keys,
and every sample that could not be used, with its key and the reason."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tokenizer.data.images.transforms import eval_transform
from tokenizer.data.shard_stream import Place, StreamSpec, iter_shard_stream
from tokenizer.data.slots import reader_slot
from tokenizer.data.tars import DecodeError, RawSample, decode_image


@dataclass
class BadSample:
    key: str  # "" for a broken tar, which has no sample to name
    shard: str
    reason: str


@dataclass
class KeyedBatch:
    images: torch.Tensor  # (B, 3, R, R) float32 in [-1, 1]; B may be 0
    keys: list[str]
    bad: list[BadSample] = field(default_factory=list)  # skipped since the last batch
    tar_errors: int = 0  # broken tars met since the last batch (logged by the stream)


@dataclass
class _Decoded:
    image: torch.Tensor | None  # (3, R, R), or None with the reason
    shard: str
    reason: str = ""


def _decode(resolution: int):
    def decode(raw: RawSample, place: Place) -> _Decoded:
        try:
            image = decode_image(raw, resolution)
        except DecodeError as err:
            return _Decoded(None, raw.shard, str(err))
        return _Decoded(eval_transform(image, resolution), raw.shard)

    return decode


def iter_keyed_batches(
    shards: Sequence[str], resolution: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[KeyedBatch]:
    """Rank `rank`'s share, split as evaluate_shards splits it (shards[rank::world_size],
    or samples one by one with fewer shards than ranks), in shard order. The last batch
    may be short, or empty when only bad samples follow the last good one."""
    spec = StreamSpec(list(shards), shuffle_shards=False, epochs=1, what="image")
    items = iter_shard_stream(
        spec, _decode(resolution), reader_slot(rank, world_size), report_errors=True
    )
    images: list[torch.Tensor] = []
    keys: list[str] = []
    bad: list[BadSample] = []
    tar_errors = 0
    for item in items:
        value = item.value
        # Our decode never returns None, so `skipped` counts broken tars only: the stream
        # charges them to the item that follows (a last item of its own at the end).
        tar_errors += item.skipped
        if value is None:
            continue
        if value.image is None:
            bad.append(BadSample(item.key, value.shard, value.reason))
            continue
        images.append(value.image)
        keys.append(item.key)
        if len(images) == batch_size:
            yield KeyedBatch(torch.stack(images), keys, bad, tar_errors)
            images, keys, bad, tar_errors = [], [], [], 0
    if images or bad or tar_errors:
        stacked = torch.stack(images) if images else torch.zeros(0, 3, resolution, resolution)
        yield KeyedBatch(stacked, keys, bad, tar_errors)
