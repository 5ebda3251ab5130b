"""Shared fixtures: small webdataset shards with known keys, written by the package's writer."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenizer.data.writer import write_shards


@dataclass(frozen=True)
class ShardSet:
    paths: list[str]
    keys_by_shard: list[list[str]]

    @property
    def keys(self) -> list[str]:
        return [k for keys in self.keys_by_shard for k in keys]


def png_bytes(rng: np.random.Generator, width: int = 40, height: int = 32) -> bytes:
    # Not square, so the shorter-side resize and the random crop both do something.
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_test_shards(
    directory: Path, num_shards: int, per_shard: int, seed: int = 0, name: str = "s"
) -> ShardSet:
    rng = np.random.default_rng(seed)
    samples = [
        {
            "__key__": f"{name}{shard}_{j:03d}",
            "png": png_bytes(rng),
            "txt": f"caption of {name}{shard}_{j:03d}",
        }
        for shard in range(num_shards)
        for j in range(per_shard)
    ]
    infos = write_shards(samples, directory, samples_per_shard=per_shard)
    keys = [
        [s["__key__"] for s in samples[i * per_shard : (i + 1) * per_shard]]
        for i in range(num_shards)
    ]
    return ShardSet([info.path for info in infos], keys)


@pytest.fixture
def shard_set(tmp_path: Path) -> ShardSet:
    """6 shards x 10 samples of 40x32 noise PNGs, keys s{shard}_{index:03d}, with captions."""
    return write_test_shards(tmp_path / "shards", num_shards=6, per_shard=10)
