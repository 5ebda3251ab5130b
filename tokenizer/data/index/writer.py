"""Write one index shard: its tar (streamed), its packed arrays, its keys' digests, then
its record with the sha256 of every file (hashed while writing, never read back).

Each file goes to a hidden temporary name and is renamed when complete; the record is
renamed last, so a shard with a record is complete and a shard without one is redone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tokenizer.atomic import AtomicFile, temporary_target, write_bytes
from tokenizer.data.hashing import HashingWriter
from tokenizer.data.index.files import packed_files
from tokenizer.data.index.format import (
    RECORDS_DIR,
    FailedSample,
    GridSpec,
    ShardRecord,
    carried_fields,
    key_digest,
    keys_path,
    read_record,
    record_path,
    sidecar_text,
    tokens_bytes,
    write_record,
)
from tokenizer.data.writer import TarShardWriter


class IndexShardWriter:
    def __init__(
        self,
        index_dir: Path,
        name: str,
        source: str,
        grids: list[GridSpec],
        settings: str,
        packed: bool,
    ) -> None:
        self.index_dir = index_dir
        self.name = name
        self.source = source
        self.grids = grids
        self.settings = settings
        self.packed = packed
        self.failed: list[FailedSample] = []
        self._tar = TarShardWriter(index_dir / name)
        # Kept only for the packed arrays: (h, w) per sample, a few MB per shard.
        self._codes: dict[str, list[np.ndarray]] = {g.name: [] for g in grids}
        self._sidecar: list[str] = []
        self._digests: list[int] = []

    def add(self, key: str, codes: dict[str, np.ndarray], fields: dict[str, bytes]) -> None:
        """codes: grid name -> (h, w) array of the grid's dtype; fields: the source's."""
        carried = carried_fields(fields)
        sample: dict = {"__key__": key, **carried}
        for grid in self.grids:
            sample[grid.field] = tokens_bytes(codes[grid.name])
        self._tar.add(sample)
        self._digests.append(key_digest(key))
        if self.packed:
            for grid in self.grids:
                self._codes[grid.name].append(codes[grid.name])
            row = {"__key__": key, **{ext: sidecar_text(v) for ext, v in carried.items()}}
            self._sidecar.append(json.dumps(row, sort_keys=True))

    def fail(self, key: str, reason: str) -> None:
        self.failed.append(FailedSample(key, reason))

    def finish(self, read_error: str | None) -> ShardRecord:
        info = self._tar.commit()
        checksums = {self.name: info.sha256}
        packed = self._write_packed(checksums) if self.packed else None
        keys = keys_path(self.index_dir, self.name)
        keys.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(keys, np.array(self._digests, dtype=np.uint64))
        record = ShardRecord(
            path=self.name,
            source=self.source,
            num_samples=info.num_samples,
            num_bytes=info.num_bytes,
            failed=self.failed,
            read_error=read_error,
            packed=packed,
            settings=self.settings,
            checksums=checksums,
        )
        write_record(self.index_dir, record)
        return record

    def abort(self) -> None:
        self._tar.abort()

    def _write_packed(self, checksums: dict[str, str]) -> dict[str, str]:
        """Writes the packed arrays and the sidecar; adds their sha256 to `checksums`."""
        files = packed_files(self.name, self.grids)
        for grid in self.grids:
            h, w = grid.shape
            rows = self._codes[grid.name]
            array = np.stack(rows) if rows else np.zeros((0, h, w), np.dtype(grid.dtype))
            checksums[files[grid.name]] = _save_atomic(self.index_dir / files[grid.name], array)
        text = "".join(line + "\n" for line in self._sidecar)
        checksums[files["samples"]] = _write_atomic(
            self.index_dir / files["samples"], text.encode("ascii")
        )
        return files


def _save_atomic(path: Path, array: np.ndarray) -> str:
    """np.save under a temporary name, then renamed; the file's sha256."""
    with AtomicFile(path) as f:
        hashing = HashingWriter(f)
        np.save(hashing, array, allow_pickle=False)  # type: ignore[arg-type]
        f.commit()
    return hashing.hexdigest()


def _write_atomic(path: Path, data: bytes) -> str:
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def check_settings(index_dir: Path, record: ShardRecord, settings: str) -> None:
    """Raises when the shard was made by another tokenizer or preprocessing: mixing codes
    of two tokenizers in one index would corrupt every prior trained on it."""
    if record.settings != settings:
        raise ValueError(
            f"{index_dir}: shard {record.path} was written with other settings (another "
            f"tokenizer, resolution or grids: {record.settings} != {settings}); use a new "
            "output folder"
        )


def completed_record(
    index_dir: Path, name: str, source: str, settings: str, packed: bool
) -> ShardRecord | None:
    """The shard's record if the shard is complete for this source and these settings,
    else None (redo). Raises for another tokenizer's shard (check_settings) and for a
    shard of the same name written from another source shard."""
    record = read_record(index_dir, name)
    if record is None:
        return None
    check_settings(index_dir, record, settings)
    if record.source != source:
        raise ValueError(
            f"{record_path(index_dir, name)}: shard {name} was written from {record.source}, "
            f"but this run's input of that name is {source}: two source shards of one name "
            "cannot share an index folder; use a new output folder"
        )
    tar = index_dir / name
    if not tar.is_file() or tar.stat().st_size != record.num_bytes:
        return None
    if packed and (
        record.packed is None or not all((index_dir / f).is_file() for f in record.packed.values())
    ):
        return None
    # Records of format version 1 have no checksums: redone, so every shard can be checked.
    if not record.checksums or not keys_path(index_dir, name).is_file():
        return None
    return record


def remove_stale_temporaries(index_dir: Path) -> int:
    """Temporary files of killed runs (see tokenizer/atomic.py); call before any writer
    starts."""
    folders = (index_dir, index_dir / RECORDS_DIR)
    stale = [
        p
        for folder in folders
        for p in folder.glob(".*")
        if p.is_file() and temporary_target(p.name) is not None
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
