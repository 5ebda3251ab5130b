"""Read index shards (tools/tokenize_dataset.py's output) for prior training.

    data = IndexShards("codes/manifest.json", tokenizer=tok, shuffle=True)
    loader = DataLoader(data, batch_size=64, num_workers=4, collate_fn=collate_tokens)
    for epoch in range(epochs):
        data.set_epoch(epoch)       # before the loader's workers start for this epoch
        for batch in loader: ...    # batch.tokens (B, h, w) int64, batch.keys, batch.txt

Streaming splits shards across ranks x workers (every sample once per epoch over all of
them) and, when asked, shuffles the shard order per epoch (the same on every rank) and
samples through a buffer. `.packed()` memory-maps the npy format for random access.
Nothing here is needed to read the shards: plain webdataset + numpy read them too.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from tokenizer.data.index.format import (
    IndexManifest,
    load_tokens,
    read_manifest,
    sidecar_bytes,
)
from tokenizer.data.order import SHUFFLE, buffer_shuffle, mix_seed, shard_order
from tokenizer.data.slots import Slot, current_slot
from tokenizer.data.tars import RawSample, SampleRef, slot_samples
from tokenizer.distributed import current_collective

if TYPE_CHECKING:
    from tokenizer.api import Tokenizer


@dataclass
class IndexSample:
    key: str
    grids: dict[str, np.ndarray]  # grid name -> (h, w) codes (uint16 or int32)
    fields: dict[str, bytes]  # the source's txt/json fields, byte-identical

    @property
    def tokens(self) -> np.ndarray:
        """The code grid (h, w) of a single-grid tokenizer."""
        if len(self.grids) != 1:
            raise ValueError(f"this index has several grids {sorted(self.grids)}: use .grids")
        return next(iter(self.grids.values()))

    @property
    def txt(self) -> str | None:
        data = self.fields.get("txt")
        return None if data is None else data.decode("utf-8", errors="replace")

    @property
    def json(self) -> Any | None:
        data = self.fields.get("json")
        return None if data is None else json.loads(data)


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # (B, h, w) int64
    keys: list[str]
    txt: list[str | None]
    samples: list[IndexSample]


def collate_tokens(samples: list[IndexSample]) -> TokenBatch:
    """DataLoader collate_fn for single-grid indexes."""
    tokens = torch.from_numpy(np.stack([s.tokens for s in samples]).astype(np.int64))
    return TokenBatch(tokens, [s.key for s in samples], [s.txt for s in samples], samples)


def check_tokenizer(manifest: IndexManifest, tokenizer: Tokenizer, source: str) -> None:
    """Refuse codes made by another tokenizer (or another cast of its weights)."""
    if tokenizer.fingerprint != manifest.tokenizer_sha256:
        raise ValueError(
            f"{source}: the index was made by tokenizer {manifest.tokenizer_sha256[:12]}..., "
            f"not by the given one ({tokenizer.fingerprint[:12]}...): its codes mean "
            "something else to this tokenizer"
        )


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    collective = current_collective()
    if collective.world_size > 1:
        return collective.rank, collective.world_size
    # Launchers (torchrun, accelerate) set these before any process group exists.
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class IndexShards(IterableDataset):
    def __init__(
        self,
        manifest_path: str | os.PathLike,
        tokenizer: Tokenizer | None = None,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        path = Path(manifest_path)
        self.manifest = read_manifest(path)
        self.root = path if path.is_dir() else path.parent
        if tokenizer is not None:
            check_tokenizer(self.manifest, tokenizer, str(path))
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Picks the epoch's shuffle; call before iterating (workers copy the dataset)."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples in the whole index, over all ranks (no __len__: a DataLoader would take
        it for this rank's share)."""
        return self.manifest.num_samples

    @property
    def shard_paths(self) -> list[str]:
        return [str(self.root / s.path) for s in self.manifest.shards]

    def _sample(self, raw: RawSample) -> IndexSample:
        grids = {g.name: load_tokens(raw.fields[g.field]) for g in self.manifest.grids}
        code_fields = {g.field for g in self.manifest.grids}
        carried = {k: v for k, v in raw.fields.items() if k not in code_fields}
        return IndexSample(raw.key, grids, carried)

    def _raws(self, shards: Sequence[str], slot: Slot) -> Iterator[RawSample | SampleRef]:
        def broken(message: str) -> None:
            raise RuntimeError(f"{message}: this index shard is damaged; re-run the tokenizer")

        order = shard_order(self.seed, self.epoch, len(shards)) if self.shuffle else None
        order = order if order is not None else list(range(len(shards)))
        yield from slot_samples(shards, order, slot, broken)

    def __iter__(self) -> Iterator[IndexSample]:
        slot = current_slot(self.rank, self.world_size)
        raws = self._raws(self.shard_paths, slot)
        samples = (self._sample(r.load() if isinstance(r, SampleRef) else r) for r in raws)
        if not self.shuffle:
            return samples
        rng = random.Random(mix_seed(self.seed, SHUFFLE, self.epoch, slot.index))
        return buffer_shuffle(samples, self.shuffle_buffer, rng)

    def packed(self) -> PackedIndex:
        """Memory-mapped arrays of the npy format, for random access."""
        if self.manifest.storage != "npy":
            raise ValueError(
                f"{self.root}: written with --format {self.manifest.storage}; "
                "packed arrays need --format npy"
            )
        return PackedIndex(self.root, self.manifest)


class PackedIndex:
    """All samples of an npy-format index by global position; codes are memory-mapped,
    the keys / captions sidecar of a shard is read when one of its rows is first asked."""

    def __init__(self, root: Path, manifest: IndexManifest) -> None:
        self.root = root
        self.manifest = manifest
        self.grid_names = [g.name for g in manifest.grids]
        # grid name -> one (n_shard, h, w) memmap per shard
        self.arrays: dict[str, list[np.ndarray]] = {
            name: [
                np.load(root / s.packed[name], mmap_mode="r", allow_pickle=False)  # type: ignore[index]
                for s in manifest.shards
            ]
            for name in self.grid_names
        }
        counts = [s.num_samples for s in manifest.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._rows = lru_cache(maxsize=8)(self._read_rows)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global position -> (shard, row in that shard)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return shard, index - int(self.offsets[shard])

    def tokens(self, index: int, grid: str | None = None) -> np.ndarray:
        """(h, w) codes of one sample, read from the memory map."""
        shard, row = self.locate(index)
        return self.arrays[grid or self.grid_names[0]][shard][row]

    def _read_rows(self, shard: int) -> list[dict[str, str]]:
        name = self.manifest.shards[shard].packed["samples"]  # type: ignore[index]
        with open(self.root / name, encoding="ascii") as f:
            return [json.loads(line) for line in f]

    def __getitem__(self, index: int) -> IndexSample:
        shard, row = self.locate(index)
        meta = self._rows(shard)[row]
        fields = {k: sidecar_bytes(v) for k, v in meta.items() if k != "__key__"}
        grids = {name: self.arrays[name][shard][row] for name in self.grid_names}
        return IndexSample(meta["__key__"], grids, fields)
