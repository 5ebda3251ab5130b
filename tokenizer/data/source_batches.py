"""Source shards -> preprocessed uint8 batches, for the corpus tokenizer's DataLoader.

Each DataLoader worker reads whole shards, so batches never mix shards and every batch
names its shard: the main process can write one output shard per source shard while
the workers decode the next ones. Images travel as uint8 (a quarter of float32's
bytes); the tokenizer converts them on its device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import IterableDataset

from tokenizer.data.images.transforms import eval_crop, to_uint8_tensor
from tokenizer.data.index.format import FailedSample, carried_fields
from tokenizer.data.slots import current_slot
from tokenizer.data.tars import DecodeError, decode_image, read_tar


@dataclass
class SourceBatch:
    job: int  # index of the shard in the list the dataset was given
    images: torch.Tensor  # (b, 3, R, R) uint8; b may be 0 (a shard's last, empty batch)
    keys: list[str]
    fields: list[dict[str, bytes]]  # the txt/json fields of each image's sample
    failed: list[FailedSample] = field(default_factory=list)  # since the previous batch
    end: bool = False  # the shard's last batch
    read_error: str | None = None  # with end: the tar broke; samples after it are lost
    source_bytes: int = 0  # tar bytes behind this batch's samples (for progress estimates)

    def pin_memory(self) -> SourceBatch:
        # Called by DataLoader(pin_memory=True): pinned pages copy to the GPU asynchronously.
        return replace(self, images=self.images.pin_memory())


def _tar_bytes(fields: dict[str, bytes]) -> int:
    # A tar member is a 512-byte header plus its data padded to 512 bytes.
    return sum(512 + -(-len(data) // 512) * 512 for data in fields.values())


def _empty(resolution: int) -> torch.Tensor:
    return torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)


def iter_shard_batches(
    job: int, source: str, resolution: int, batch_size: int
) -> Iterator[SourceBatch]:
    """Every sample of one source shard in file order, in batches; the last has end=True."""
    errors: list[str] = []
    seen: set[str] = set()
    images: list[torch.Tensor] = []
    keys: list[str] = []
    fields: list[dict[str, bytes]] = []
    failed: list[FailedSample] = []
    consumed = 0
    for raw in read_tar(source, errors.append):
        consumed += _tar_bytes(raw.fields)
        if raw.key in seen:
            failed.append(FailedSample(raw.key, "duplicate key in the source shard"))
            continue
        seen.add(raw.key)
        try:
            image = eval_crop(decode_image(raw, resolution), resolution)
        except DecodeError as err:
            failed.append(FailedSample(raw.key, str(err)))
            continue
        images.append(to_uint8_tensor(image))  # (3, R, R)
        keys.append(raw.key)
        fields.append(carried_fields(raw.fields))
        if len(images) == batch_size:
            yield SourceBatch(job, torch.stack(images), keys, fields, failed, source_bytes=consumed)
            images, keys, fields, failed, consumed = [], [], [], [], 0
    stacked = torch.stack(images) if images else _empty(resolution)
    read_error = errors[0] if errors else None
    yield SourceBatch(job, stacked, keys, fields, failed, True, read_error, source_bytes=consumed)


class SourceShards(IterableDataset):
    """Worker w of W reads shards w, w + W, ...; each batch carries its shard's index."""

    def __init__(self, sources: list[str], resolution: int, batch_size: int) -> None:
        super().__init__()
        self.sources = sources
        self.resolution = resolution
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[SourceBatch]:
        # The rank split is the caller's (it hands each rank its own sources).
        for job in current_slot().take(range(len(self.sources))):
            yield from iter_shard_batches(job, self.sources[job], self.resolution, self.batch_size)
