"""Write one index shard: its tar (streamed), its packed arrays, then its record.

Each file goes to a hidden temporary name and is renamed when complete; the record is
renamed last, so a shard with a record is complete and a shard without one is redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tokenizer.data.index_format import (
    RECORDS_DIR,
    SAMPLES_SIDECAR,
    FailedSample,
    GridSpec,
    ShardRecord,
    carried_fields,
    packed_name,
    read_record,
    sidecar_text,
    tokens_bytes,
    write_record,
)
from tokenizer.data.shard_writer import TarShardWriter


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

    def add(self, key: str, codes: dict[str, np.ndarray], fields: dict[str, bytes]) -> None:
        """codes: grid name -> (h, w) array of the grid's dtype; fields: the source's."""
        carried = carried_fields(fields)
        sample: dict = {"__key__": key, **carried}
        for grid in self.grids:
            sample[grid.field] = tokens_bytes(codes[grid.name])
        self._tar.add(sample)
        if self.packed:
            for grid in self.grids:
                self._codes[grid.name].append(codes[grid.name])
            row = {"__key__": key, **{ext: sidecar_text(v) for ext, v in carried.items()}}
            self._sidecar.append(json.dumps(row, sort_keys=True))

    def fail(self, key: str, reason: str) -> None:
        self.failed.append(FailedSample(key, reason))

    def finish(self, read_error: str | None) -> ShardRecord:
        info = self._tar.commit()
        packed = self._write_packed() if self.packed else None
        record = ShardRecord(
            path=self.name,
            source=self.source,
            num_samples=info.num_samples,
            num_bytes=info.num_bytes,
            failed=self.failed,
            read_error=read_error,
            packed=packed,
            settings=self.settings,
        )
        write_record(self.index_dir, record)
        return record

    def abort(self) -> None:
        self._tar.abort()

    def _write_packed(self) -> dict[str, str]:
        files: dict[str, str] = {}
        for grid in self.grids:
            h, w = grid.shape
            rows = self._codes[grid.name]
            array = np.stack(rows) if rows else np.zeros((0, h, w), np.dtype(grid.dtype))
            files[grid.name] = packed_name(self.name, grid.field)
            _save_atomic(self.index_dir / files[grid.name], array)  # (n, h, w)
        files["samples"] = packed_name(self.name, SAMPLES_SIDECAR)
        text = "".join(line + "\n" for line in self._sidecar)
        _write_atomic(self.index_dir / files["samples"], text.encode("ascii"))
        return files


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def completed_record(index_dir: Path, name: str, settings: str, packed: bool) -> ShardRecord | None:
    """The shard's record if the shard is complete for these settings, else None (redo).

    Raises when the shard was made by another tokenizer or preprocessing: mixing codes
    of two tokenizers in one index would corrupt every prior trained on it.
    """
    record = read_record(index_dir, name)
    if record is None:
        return None
    if record.settings != settings:
        raise ValueError(
            f"{index_dir}: shard {name} was written with other settings (another tokenizer, "
            f"resolution or grids: {record.settings} != {settings}); use a new output folder"
        )
    tar = index_dir / name
    if not tar.is_file() or tar.stat().st_size != record.num_bytes:
        return None
    if packed and (
        record.packed is None or not all((index_dir / f).is_file() for f in record.packed.values())
    ):
        return None
    return record


def remove_stale_temporaries(index_dir: Path) -> int:
    """Temporary files of killed runs (hidden `.name.tmp-PID`); call before any writer starts."""
    stale = [p for p in index_dir.glob(".*.tmp-*") if p.is_file()]
    stale += [p for p in (index_dir / RECORDS_DIR).glob(".*.tmp-*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
