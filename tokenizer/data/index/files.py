"""Which files of an index folder belong to which shard, and their checksums.

Tokenize refuses to start, and --verify fails, when the folder holds shard files or
records that no shard of the index owns: a manifest must describe every shard on disk,
or a later run would silently drop or mix them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizer.data.index.format import (
    RECORDS_DIR,
    SAMPLES_SIDECAR,
    GridSpec,
    keys_path,
    packed_name,
    record_path,
)

# What tokenize writes at the top of a folder; other files (notes, logs) are the user's.
_SHARD_SUFFIXES = (".tar", ".npy", ".jsonl")
_CHUNK = 1 << 20


def packed_files(shard: str, grids: list[GridSpec]) -> dict[str, str]:
    """npy format: grid name or "samples" -> file, beside the shard's tar."""
    files = {grid.name: packed_name(shard, grid.field) for grid in grids}
    files["samples"] = packed_name(shard, SAMPLES_SIDECAR)
    return files


def shard_files(shard: str, grids: list[GridSpec], packed: bool) -> list[str]:
    """Every file of one shard, relative to the index folder: tar, packed arrays, record."""
    files = [shard, *(packed_files(shard, grids).values() if packed else [])]
    for path in (record_path(Path("."), shard), keys_path(Path("."), shard)):
        files.append(str(path))
    return files


def unlisted_files(
    index_dir: Path, shards: list[str], grids: list[GridSpec], packed: bool
) -> list[str]:
    """Shard files and records under index_dir that belong to none of `shards` (sorted)."""
    owned = {f for shard in shards for f in shard_files(shard, grids, packed)}
    found = []
    for folder in (index_dir, index_dir / RECORDS_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            # Hidden names are temporaries of a writer, removed before the next run starts.
            if path.name.startswith(".") or not path.is_file():
                continue
            if folder == index_dir and not path.name.endswith(_SHARD_SUFFIXES):
                continue
            relative = str(path.relative_to(index_dir))
            if relative not in owned:
                found.append(relative)
    return sorted(found)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
