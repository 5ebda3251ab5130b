"""Index shards, the output of tools/tokenize_dataset.py: file names, code dtypes, records
and the manifest. A folder of index shards looks like this:

    OUT/manifest.json            written last, by rank 0: tokenizer, grids, every shard
    OUT/000042.tar               one per source shard, same base name; a sample is
                                 __key__, tokens.npy ((h, w) integers, np.save bytes) and
                                 every txt/json/cls field of the source, byte-identical
    OUT/000042.tokens.npy        npy format only: (n, h, w) codes in the tar's order
    OUT/000042.samples.jsonl     npy format only: {"__key__", "txt", "json", "cls"} per row
    OUT/records/000042.keys.npy  uint64 digests of the shard's keys, in tar order: the
                                 duplicate check across shards reads these, not the tars
    OUT/records/000042.json      per-shard record with the sha256 of each of its files;
                                 written after the shard's files, so its presence marks
                                 the shard complete (resume)

A run into a folder that already holds an index keeps every shard of it: with --append
its manifest then lists the old inputs and the new; without, the run must list them all.

A model with several code grids (VQ-VAE-2) writes `tokens_<grid>.npy` per grid instead
of `tokens.npy`, and `000042.tokens_<grid>.npy` packed arrays. The manifest's `grids`
lists every grid with its field, [h, w], K and dtype; its top-level codebook_size,
grid_shape and dtype repeat the single grid's, and are null with several grids.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenizer.atomic import write_json

INDEX_FORMAT = "vq-tokenizer-index"
# 2: records carry sha256 checksums and a keys digest file; version 1 folders have neither.
INDEX_VERSION = 2
MANIFEST = "manifest.json"
RECORDS_DIR = "records"
KEYS_SUFFIX = ".keys.npy"
SAMPLES_SIDECAR = "samples.jsonl"
# cls: a class index as text, webdataset's convention (ImageNet shards): class-conditional
# priors train on it (prior.num_classes).
_CARRIED = ("txt", "json", "cls")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest integer type the format allows for K codes: uint16, else int32."""
    if codebook_size <= 0:
        raise ValueError(f"codebook size must be positive, got {codebook_size}")
    if codebook_size <= 2**16:
        return np.dtype(np.uint16)
    if codebook_size <= 2**31:
        return np.dtype(np.int32)
    raise ValueError(f"codebook size {codebook_size} does not fit int32 codes")


def grid_fields(names: list[str]) -> dict[str, str]:
    """Sample field of each code grid: `tokens.npy` for a single grid, `tokens_<name>.npy`
    for each of several (VQ-VAE-2's top and bottom grids)."""
    if len(names) == 1:
        return {names[0]: "tokens.npy"}
    return {name: f"tokens_{name}.npy" for name in names}


def is_carried(ext: str) -> bool:
    """txt, json and cls fields travel to the index shard untouched (also `en.txt`,
    `meta.json`)."""
    return ext.rsplit(".", 1)[-1] in _CARRIED


def carried_fields(fields: dict[str, bytes]) -> dict[str, bytes]:
    return {ext: data for ext, data in fields.items() if is_carried(ext)}


def tokens_bytes(codes: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, codes, allow_pickle=False)
    return buffer.getvalue()


def load_tokens(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def key_digest(key: str) -> int:
    """8 bytes a key: duplicates across hundreds of millions of keys fit in memory."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def key_digests(keys: list[str]) -> np.ndarray:
    return np.array([key_digest(k) for k in keys], dtype=np.uint64)


def output_name(source: str) -> str:
    """`data/000042.tar` (or .tar.gz, .tgz) -> `000042.tar`."""
    name = Path(source).name
    for suffix in _TAR_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)] + ".tar"
    raise ValueError(f"{source}: not a tar shard (expected a .tar, .tar.gz or .tgz name)")


def packed_name(shard: str, what: str) -> str:
    """`000042.tar` + `tokens.npy` -> `000042.tokens.npy`."""
    return f"{shard.removesuffix('.tar')}.{what}"


def sidecar_text(data: bytes) -> str:
    # surrogateescape keeps bytes that are not UTF-8; json escapes them as \udcXX, and
    # sidecar_bytes() turns them back into the very same bytes.
    return data.decode("utf-8", errors="surrogateescape")


def sidecar_bytes(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


@dataclass
class GridSpec:
    name: str
    field: str  # sample field in the tar, e.g. "tokens.npy"
    shape: list[int]  # [h, w]
    codebook_size: int
    dtype: str  # "uint16" or "int32"


@dataclass
class FailedSample:
    key: str  # "" for samples lost in an unreadable part of a tar (see read_error)
    reason: str


@dataclass
class ShardRecord:
    path: str  # output tar, relative to the index folder
    source: str  # the source shard, absolute
    num_samples: int
    num_bytes: int
    failed: list[FailedSample] = field(default_factory=list)
    read_error: str | None = None  # the source tar broke here; later samples are lost
    packed: dict[str, str] | None = None  # grid name or "samples" -> file (npy format)
    settings: str = ""  # settings_digest() of the run that wrote it
    checksums: dict[str, str] = field(default_factory=dict)  # file -> sha256 (tar, packed)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ShardRecord:
        raw = dict(raw)
        raw["failed"] = [FailedSample(**f) for f in raw.get("failed", [])]
        return cls(**raw)


def single_grid_fields(grids: list[GridSpec]) -> dict[str, Any]:
    """The manifest's top-level codebook_size, grid_shape and dtype: those of the one grid
    (what single-grid readers have always read), null with several grids, whose K, shape
    and dtype differ: a reader of a hierarchy reads `grids`."""
    if len(grids) != 1:
        return {"codebook_size": None, "grid_shape": None, "dtype": None}
    [grid] = grids
    return {"codebook_size": grid.codebook_size, "grid_shape": grid.shape, "dtype": grid.dtype}


@dataclass
class IndexManifest:
    tokenizer: dict[str, Any]  # {"sha256": ..., "config": release config.json, "source": ...}
    # The single grid's K, [h, w] and dtype; None with several grids (single_grid_fields).
    codebook_size: int | None
    grid_shape: list[int] | None
    dtype: str | None
    grids: list[GridSpec]  # every grid, coarsest first: the authority on K, shape, dtype
    preprocessing: dict[str, Any]
    storage: str  # "tar" or "npy" (tars plus packed arrays)
    inputs: list[str]  # every source shard of the index (earlier runs' first), in order
    shards: list[ShardRecord]
    num_samples: int
    num_failed: int
    format: str = INDEX_FORMAT
    format_version: int = INDEX_VERSION

    @property
    def failed(self) -> list[tuple[str, FailedSample]]:
        """(source shard, failed sample) for every sample that is not in the index."""
        return [(s.source, f) for s in self.shards for f in s.failed]

    @property
    def grid_names(self) -> list[str]:
        return [g.name for g in self.grids]

    def grid(self, name: str) -> GridSpec:
        """The spec of grid `name`, refusing names the index does not have."""
        for spec in self.grids:
            if spec.name == name:
                return spec
        raise KeyError(f"the index has no grid {name!r}; its grids: {', '.join(self.grid_names)}")

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.tokenizer["sha256"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> IndexManifest:
        if raw.get("format") != INDEX_FORMAT:
            raise ValueError(f"not an index manifest (format {raw.get('format')!r})")
        if raw.get("format_version", 0) > INDEX_VERSION:
            raise ValueError(
                f"index format version {raw['format_version']} is newer than this code "
                f"reads ({INDEX_VERSION})"
            )
        raw = dict(raw)
        raw["grids"] = [GridSpec(**g) for g in raw["grids"]]
        raw["shards"] = [ShardRecord.from_dict(s) for s in raw["shards"]]
        return cls(**raw)


def settings_digest(tokenizer_sha256: str, preprocessing: dict, grids: list[GridSpec]) -> str:
    """What makes two runs' shards interchangeable: same weights, same crops, same grids."""
    body = {
        "tokenizer": tokenizer_sha256,
        "preprocessing": preprocessing,
        "grids": [asdict(g) for g in grids],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    """An index file (record, manifest): indent 1 keeps a manifest of many shards small."""
    write_json(path, data, indent=1)


def record_path(index_dir: Path, shard: str) -> Path:
    return index_dir / RECORDS_DIR / f"{shard.removesuffix('.tar')}.json"


def keys_path(index_dir: Path, shard: str) -> Path:
    return index_dir / RECORDS_DIR / f"{shard.removesuffix('.tar')}{KEYS_SUFFIX}"


def read_record(index_dir: Path, shard: str) -> ShardRecord | None:
    path = record_path(index_dir, shard)
    try:
        return ShardRecord.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def write_record(index_dir: Path, record: ShardRecord) -> None:
    path = record_path(index_dir, record.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(record))


def read_manifest(path: str | os.PathLike) -> IndexManifest:
    """A manifest file, or the index folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index manifest (did the tokenize run finish?)")
    return IndexManifest.from_dict(json.loads(path.read_text()))
