"""A background thread that writes encoded batches into index shards.

The main thread only encodes and hands batches over; tar building, np.save and renames
happen here, so the accelerator never waits on the file system. The queue is bounded:
a slow disk slows the producer down instead of filling memory.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenizer.data.index.format import FailedSample, GridSpec, ShardRecord
from tokenizer.data.index.writer import IndexShardWriter


@dataclass
class EncodedBatch:
    job: int  # which shard (an index into the sink's `names` / `sources`)
    keys: list[str]
    fields: list[dict[str, bytes]]
    codes: dict[str, np.ndarray]  # grid name -> (b, h, w) in the grid's dtype
    failed: list[FailedSample] = field(default_factory=list)
    end: bool = False
    read_error: str | None = None


_STOP = object()


class IndexSink:
    def __init__(
        self,
        index_dir: Path,
        names: list[str],
        sources: list[str],
        grids: list[GridSpec],
        settings: str,
        packed: bool,
        max_pending: int = 16,
    ) -> None:
        self.index_dir = index_dir
        self.names = names
        self.sources = sources
        self.grids = grids
        self.settings = settings
        self.packed = packed
        self.records: list[ShardRecord] = []
        self._open: dict[int, IndexShardWriter] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._run, name="index-sink", daemon=True)
        self._thread.start()

    def put(self, batch: EncodedBatch) -> None:
        self._raise_if_failed()
        # A timeout loop instead of a blocking put: a dead writer must not hang us.
        while True:
            try:
                self._queue.put(batch, timeout=1.0)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> list[ShardRecord]:
        """Wait for every batch to be written; the records of the shards finished."""
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=1.0)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise_if_failed()
        if self._open:
            unfinished = sorted(self.names[j] for j in self._open)
            raise RuntimeError(f"shards never finished (no end batch): {unfinished}")
        return self.records

    def abort(self) -> None:
        """After an error elsewhere: drop queued batches, stop, remove unfinished files."""
        self._aborted = True
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        for writer in self._open.values():
            writer.abort()
        self._open.clear()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError("writing index shards failed") from self._error

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not _STOP:
                if not self._aborted:
                    self._write(item)
        except BaseException as err:  # handed to the main thread by put/close
            self._error = err
            for writer in self._open.values():
                writer.abort()

    def _write(self, batch: EncodedBatch) -> None:
        writer = self._open.get(batch.job)
        if writer is None:
            writer = IndexShardWriter(
                self.index_dir,
                self.names[batch.job],
                self.sources[batch.job],
                self.grids,
                self.settings,
                self.packed,
            )
            self._open[batch.job] = writer
        for i, key in enumerate(batch.keys):
            writer.add(
                key, {name: codes[i] for name, codes in batch.codes.items()}, batch.fields[i]
            )
        for failed in batch.failed:
            writer.fail(failed.key, failed.reason)
        if batch.end:
            record = writer.finish(batch.read_error)
            del self._open[batch.job]
            self.records.append(record)  # list.append is atomic: the main thread polls len()
