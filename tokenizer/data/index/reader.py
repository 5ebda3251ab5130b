"""Read index shards (tools/tokenize_dataset.py's output) for prior training.

    data = IndexShards("codes/manifest.json", tokenizer=tok, shuffle=True)
    loader = DataLoader(data, batch_size=64, num_workers=4, collate_fn=collate_tokens)
    for epoch in range(start_epoch, epochs):
        data.set_epoch(epoch)       # before the loader's workers start for this epoch
        for batch in loader:        # batch.grids["tokens"] (B, h, w) int64, batch.keys
            data.update(batch)      # what this rank consumed: data.state_dict() resumes
            ...

Every sample carries all code grids of the index (`sample.grids`, `batch.grids`; for a
single grid also `.tokens`). Streaming splits shards across ranks x workers (the one
shard stream of data/shard_stream.py), and, when asked, shuffles the shard order per
epoch (the same on every rank) and samples through a buffer. With several ranks every
reader emits the same number of samples per epoch (`remainder`, see balance.py), so DDP
ranks run equal batch counts. `state_dict()` / `load_state_dict()` resume mid-epoch
exactly: each reader seeks past what its rank consumed (without reading it), and the
batches that follow are the uninterrupted run's (their order too, with equal counts).
`.packed()` memory-maps the npy format for random access. Nothing here is needed to
read the shards: plain webdataset + numpy read them too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tokenizer.data.index.balance import epoch_share, slot_counts
from tokenizer.data.index.format import (
    IndexManifest,
    load_tokens,
    read_manifest,
    sidecar_bytes,
)
from tokenizer.data.index.progress import IndexProgress
from tokenizer.data.order import shard_order
from tokenizer.data.shard_stream import Place, StreamPosition, StreamSpec, iter_shard_stream
from tokenizer.data.slots import Slot, reader_slot
from tokenizer.data.tars import RawSample
from tokenizer.distributed import current_collective

if TYPE_CHECKING:
    from tokenizer.api import Tokenizer

_DAMAGED = "this index shard is damaged; re-run the tokenizer"


def _one_grid(grids: dict[str, Any], per_grid: str) -> Any:
    if len(grids) != 1:
        raise ValueError(f"this index has grids {', '.join(grids)}: use {per_grid}")
    return next(iter(grids.values()))


@dataclass
class IndexSample:
    key: str
    grids: dict[str, np.ndarray]  # grid name -> (h, w) codes (uint16 or int32)
    fields: dict[str, bytes]  # the source's txt/json fields, byte-identical
    place: Place | None = None  # where a streamed sample sits (resume); None when packed
    readers: int = 0  # slots (ranks x workers) of the stream that emitted it

    @property
    def tokens(self) -> np.ndarray:
        """The code grid (h, w) of a single-grid index."""
        return _one_grid(self.grids, "sample.grids[name]")

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
    grids: dict[str, torch.Tensor]  # grid name -> (B, h, w) int64
    keys: list[str]
    txt: list[str | None]
    samples: list[IndexSample] = field(default_factory=list)

    @property
    def tokens(self) -> torch.Tensor:
        """(B, h, w) codes of a single-grid index."""
        return _one_grid(self.grids, "batch.grids[name]")


def collate_tokens(samples: list[IndexSample]) -> TokenBatch:
    """DataLoader collate_fn: every grid stacked to (B, h, w) int64."""
    grids = {
        name: torch.from_numpy(np.stack([s.grids[name] for s in samples]).astype(np.int64))
        for name in samples[0].grids
    }
    return TokenBatch(grids, [s.key for s in samples], [s.txt for s in samples], samples)


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
        remainder: str | None = None,
    ) -> None:
        """`remainder` ("drop", "wrap" or "keep", see balance.py) evens out the readers'
        shares of an epoch; by default "drop" with several ranks, "keep" with one (whose
        workers need no lockstep)."""
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
        self.remainder = remainder or ("drop" if self.world_size > 1 else "keep")
        epoch_share([1], self.remainder)  # refuse an unknown choice now, not in a worker
        self.progress = IndexProgress(self._layout())

    def _layout(self) -> dict[str, Any]:
        shards = "\n".join(f"{s.path} {s.num_samples}" for s in self.manifest.shards)
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "remainder": self.remainder,
            "shards": hashlib.sha1(shards.encode()).hexdigest()[:16],
        }

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    def set_epoch(self, epoch: int) -> None:
        """Picks the epoch's shuffle; call before iterating (workers copy the dataset)."""
        self.progress.start_epoch(epoch)

    @property
    def grid_names(self) -> list[str]:
        return self.manifest.grid_names

    @property
    def num_samples(self) -> int:
        """Samples in the whole index, over all ranks (no __len__: a DataLoader would take
        it for this rank's share)."""
        return self.manifest.num_samples

    @property
    def shard_paths(self) -> list[str]:
        return [str(self.root / s.path) for s in self.manifest.shards]

    # ------------------------------------------------------------------ resume

    def update(self, batch: TokenBatch | Sequence[IndexSample]) -> None:
        """Record one consumed batch (call in the process that iterates the loader)."""
        samples = batch.samples if isinstance(batch, TokenBatch) else batch
        places = [s.place for s in samples if s.place is not None]
        if places:
            self.progress.update(places, max(s.readers for s in samples))

    def state_dict(self) -> dict[str, Any]:
        """This rank's position in the epoch; JSON-serialisable. Each rank saves its own."""
        return self.progress.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where state_dict() was taken: the next iteration yields the rest of
        that epoch (call it instead of set_epoch for the resumed epoch)."""
        self.progress.load_state_dict(state)

    # ------------------------------------------------------------------ streaming

    def _slot(self) -> Slot:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A resumed DataLoader restarts its round-robin at worker 0 (progress.py).
        local = (worker + self.progress.shift(workers)) % workers
        return reader_slot(self.rank, self.world_size, local, workers)

    def _shares(self, slot: Slot) -> tuple[int, int]:
        """(this slot's own samples this epoch, the samples it emits: see balance.py)."""
        sizes = [s.num_samples for s in self.manifest.shards]
        order = shard_order(self.seed, self.epoch, len(sizes)) if self.shuffle else None
        counts = slot_counts(sizes, order or list(range(len(sizes))), slot.count)
        own = counts[slot.index]
        share = epoch_share(counts, self.remainder)
        return own, own if share is None else share

    def _stream(self, slot: Slot, skip: int, limit: int) -> Iterator[IndexSample]:
        """This slot's samples of the epoch with raw index in [skip, limit)."""
        spec = StreamSpec(
            self.shard_paths,
            self.seed,
            shuffle_shards=self.shuffle,
            shuffle_buffer=self.shuffle_buffer if self.shuffle else 0,
            epochs=1,
            limit=lambda _epoch: limit,
            strict=_DAMAGED,
            what="index sample",
        )

        def decode(raw: RawSample, place: Place) -> IndexSample:
            return self._decode(raw, place, slot.count)

        position = StreamPosition(self.epoch, skip)
        for item in iter_shard_stream(spec, decode, slot, position):
            if item.value is not None:
                yield item.value

    def _decode(self, raw: RawSample, place: Place, readers: int) -> IndexSample:
        grids = {g.name: load_tokens(raw.fields[g.field]) for g in self.manifest.grids}
        code_fields = {g.field for g in self.manifest.grids}
        carried = {k: v for k, v in raw.fields.items() if k not in code_fields}
        return IndexSample(raw.key, grids, carried, place, readers)

    def __iter__(self) -> Iterator[IndexSample]:
        slot = self._slot()
        own, share = self._shares(slot)
        position = self.progress.start(slot.index, slot.count).next_index
        # Position p of the epoch is raw sample p % own of pass p // own: one pass unless
        # "wrap" makes the slot read its own samples again to reach the share.
        while position < share:
            base = position - position % own
            limit = min(own, share - base)
            for sample in self._stream(slot, position - base, limit):
                place = replace(sample.place, index=base + sample.place.index)  # type: ignore[type-var]
                yield replace(sample, place=place)
            position = base + limit

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
        """(h, w) codes of one sample's grid `grid`, read from the memory map; without
        `grid`, those of a single-grid index."""
        if grid is None:
            arrays = _one_grid(self.arrays, "tokens(index, grid)")
        elif grid in self.arrays:
            arrays = self.arrays[grid]
        else:
            raise KeyError(f"the index has no grid {grid!r}; its grids: {', '.join(self.arrays)}")
        shard, row = self.locate(index)
        return arrays[shard][row]

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
