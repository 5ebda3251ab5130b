"""How far one rank's consumer has read an IndexShards epoch: the state that resumes it.

A reader (slot) emits its samples of an epoch in a fixed order (shard_stream.py), so its
position is the raw index of the next sample. The consumer of a rank sees every sample
its workers emit (each carries its Place), records the position of each slot, and
counts the batches of the epoch: a resumed DataLoader restarts its round-robin at
worker 0, and shifting the worker -> slot map by that count makes the resumed batch
order continue the uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenizer.data.shard_stream import Place, StreamPosition

logger = logging.getLogger(__name__)


@dataclass
class IndexProgress:
    layout: dict[str, Any]  # what positions depend on: rank, world size, seed, shards ...
    epoch: int = 0
    positions: dict[int, int] = field(default_factory=dict)  # slot -> next raw index
    batches: int = 0  # batches consumed this epoch
    slots: int | None = None  # readers over all ranks x workers, once a sample was seen

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.positions, self.batches = epoch, {}, 0

    def update(self, places: Iterable[Place], slots: int) -> None:
        """One batch consumed: the places of its samples, from readers of `slots`."""
        for place in places:
            if place.epoch != self.epoch:
                raise ValueError(
                    f"a sample of epoch {place.epoch} consumed in epoch {self.epoch}: call "
                    "set_epoch before iterating the epoch"
                )
            self.positions[place.slot] = max(self.positions.get(place.slot, 0), place.index + 1)
        self.slots = slots
        self.batches += 1

    def start(self, slot: int, slots: int) -> StreamPosition:
        """Where reader `slot` (of `slots`) resumes this epoch."""
        if self.slots is not None and slots != self.slots:
            # Other DataLoader workers: the saved positions belong to other readers.
            logger.warning(
                "index state saved with %d readers, resumed with %d: epoch %d restarts "
                "from its start",
                self.slots,
                slots,
                self.epoch,
            )
            return StreamPosition(self.epoch, 0)
        return StreamPosition(self.epoch, self.positions.get(slot, 0))

    def shift(self, workers: int) -> int:
        """Worker w of the resumed DataLoader reads local slot (w + shift) % workers."""
        return self.batches % workers if self.slots is not None else 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "positions": {str(s): i for s, i in sorted(self.positions.items())},
            "batches": self.batches,
            "slots": self.slots,
            "layout": dict(self.layout),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = dict(state["layout"])
        if saved.get("rank") != self.layout["rank"]:
            raise ValueError(
                f"index state of rank {saved.get('rank')} loaded on rank {self.layout['rank']}: "
                "each rank must restore its own state"
            )
        self.epoch = int(state["epoch"])
        if saved != self.layout:
            # Another seed, shuffle, split or index: the positions mean nothing here.
            # Restarting the saved epoch repeats samples but skips none.
            logger.warning(
                "index layout changed since the state was saved (%s -> %s): epoch %d "
                "restarts from its start",
                saved,
                self.layout,
                self.epoch,
            )
            self.positions, self.batches, self.slots = {}, 0, None
            return
        self.positions = {int(s): int(i) for s, i in state["positions"].items()}
        self.batches = int(state["batches"])
        self.slots = None if state["slots"] is None else int(state["slots"])
