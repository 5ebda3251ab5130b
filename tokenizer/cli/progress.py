"""A progress bar in images for a corpus whose size is known only in bytes.

Counting the samples of hundreds of millions of images would mean reading every tar
twice, so the total is estimated from the source bytes read so far and refined as the
run goes; it is exact once every shard is done.
"""

from __future__ import annotations

import time

from tqdm import tqdm


class ImageProgress:
    def __init__(self, total_bytes: int, num_shards: int, world_size: int, enabled: bool) -> None:
        self.total_bytes = max(total_bytes, 1)
        self.num_shards = num_shards
        self.world_size = world_size
        self.images = 0
        self.samples = 0  # images plus failed samples: what the bytes account for
        self.bytes = 0
        self.shards_done = 0
        self.started = time.perf_counter()
        self._bar = (
            tqdm(total=None, unit="img", desc=f"rank 0/{world_size}", dynamic_ncols=True)
            if enabled
            else None
        )

    def update(self, images: int, failed: int, source_bytes: int, shards_done: int) -> None:
        self.images += images
        self.samples += images + failed
        self.bytes += source_bytes
        self.shards_done = shards_done
        if self._bar is None:
            return
        if self.bytes:
            estimate = self.samples * self.total_bytes / self.bytes
            self._bar.total = max(int(estimate) - (self.samples - self.images), self.images)
        rate = self.images / max(time.perf_counter() - self.started, 1e-9)
        self._bar.set_postfix_str(
            f"shards {shards_done}/{self.num_shards}, ~{rate * self.world_size:.0f} img/s all ranks",
            refresh=False,
        )
        self._bar.update(images)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.total = self.images
            self._bar.refresh()
            self._bar.close()
