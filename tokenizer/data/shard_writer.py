"""Write samples into webdataset tar shards (000000.tar, 000001.tar, ...).

A sample is a dict with a "__key__" and one entry per file extension ("png", "txt",
"json", "tokens.npy", ...), each holding bytes (a str is stored as UTF-8).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# A fixed member mtime makes shards byte-identical across runs with the same input.
_MTIME = 1_700_000_000


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_samples: int
    num_bytes: int
    first_key: str
    last_key: str


def shard_name(index: int, prefix: str = "") -> str:
    return f"{prefix}{index:06d}.tar"


def brace_pattern(directory: str | os.PathLike, num_shards: int, prefix: str = "") -> str:
    """The brace pattern naming `num_shards` shards written by `write_shards`."""
    if num_shards < 1:
        raise ValueError("a shard pattern needs at least one shard")
    if num_shards == 1:
        return str(Path(directory) / shard_name(0, prefix))
    return str(Path(directory) / f"{prefix}{{{0:06d}..{num_shards - 1:06d}}}.tar")


def _chunks(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_key(key: object, seen: set[str]) -> str:
    # Readers group tar members by the basename up to its first dot, so a dot in a key
    # would split one sample into several, and a repeated key would merge two.
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    if "." in key.rsplit("/", 1)[-1]:
        raise ValueError(f"sample key {key!r} contains a dot")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r} in one shard")
    seen.add(key)
    return key


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MTIME
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def _write_one(path: Path, samples: list[dict]) -> ShardInfo:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    seen: set[str] = set()
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                key = _check_key(sample.get("__key__"), seen)
                for ext, value in sample.items():
                    if ext.startswith("__"):
                        continue
                    if isinstance(value, str):
                        value = value.encode("utf-8")
                    if not isinstance(value, bytes | bytearray | memoryview):
                        raise TypeError(
                            f"sample {key!r} field {ext!r}: expected bytes or str, "
                            f"got {type(value).__name__}"
                        )
                    _add_member(tar, f"{key}.{ext}", bytes(value))
        # Only a finished shard gets its real name, so a crash never leaves a shard
        # that looks complete but is not.
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardInfo(
        path=str(path),
        num_samples=len(samples),
        num_bytes=path.stat().st_size,
        first_key=samples[0]["__key__"],
        last_key=samples[-1]["__key__"],
    )


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    prefix: str = "",
    samples_per_shard: int = 1000,
) -> list[ShardInfo]:
    """Write `samples` in order into out_dir/{prefix}000000.tar, ...; return one ShardInfo each.

    Samples are consumed lazily, so a generator over a huge folder never sits in memory
    beyond one shard.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        _write_one(out / shard_name(index, prefix), chunk)
        for index, chunk in enumerate(_chunks(samples, samples_per_shard))
    ]
