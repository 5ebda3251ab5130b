"""Write samples into webdataset tar shards (000000.tar, 000001.tar, ...).

A sample is a dict with a "__key__" and one entry per file extension ("png", "txt",
"json", "tokens.npy", ...), each holding bytes (a str is stored as UTF-8).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset import TarWriter

from tokenizer.atomic import AtomicFile, temporary_target
from tokenizer.data.hashing import HashingWriter

# A fixed member mtime makes shards byte-identical across runs with the same input.
_MTIME = 1_700_000_000


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_samples: int
    num_bytes: int
    first_key: str
    last_key: str
    sha256: str = ""  # of the whole tar, hashed as it was written


def shard_name(index: int, prefix: str = "") -> str:
    return f"{prefix}{index:06d}.tar"


def is_shard_file(name: str, prefix: str = "") -> bool:
    """Whether `name` is one this writer makes: a shard, or the temporary file of one
    (left behind by a run that was killed)."""
    return (
        re.fullmatch(re.escape(prefix) + r"\d{6}\.tar", temporary_target(name) or name) is not None
    )


class OutputNotEmpty(RuntimeError):
    """The output folder already holds files; the message names them."""


@dataclass(frozen=True)
class PreparedOutput:
    removed: list[str]  # names of the old shards (and temporary files) deleted
    kept: list[str]  # names of the other entries, left alone


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def prepare_output(directory: str | os.PathLike, replace: bool, prefix: str = "") -> PreparedOutput:
    """Make sure new shards will not mix with old ones in `directory`.

    A missing or empty folder is fine. A folder with anything in it is refused unless
    `replace`; then the shards and temporary files this writer made (see is_shard_file)
    are deleted, and nothing else: the folder may hold a user's own files.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a folder")
    if not out.exists():
        return PreparedOutput([], [])
    entries = sorted(out.iterdir(), key=lambda p: p.name)
    ours = [p for p in entries if p.is_file() and is_shard_file(p.name, prefix)]
    others = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in ours]
    if entries and not replace:
        parts = []
        if ours:
            parts.append(f"{len(ours)} shard files ({_listing([p.name for p in ours])})")
        if others:
            parts.append(f"{len(others)} other entries ({_listing(others)})")
        raise OutputNotEmpty(f"output folder {out} is not empty: it holds {' and '.join(parts)}")
    for path in ours:
        path.unlink()
    return PreparedOutput([p.name for p in ours], others)


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


class TarShardWriter:
    """Writes one shard sample by sample under a hidden temporary name; `commit()` gives it
    its real name. Only a finished shard gets its real name, so a crash never leaves a
    shard that looks complete but is not; leaving the `with` block without a commit
    removes the temporary file.

    The tar is webdataset's TarWriter with every header field fixed (mtime, owner names,
    mode), so the same samples give byte-identical shards in any run.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = AtomicFile(self.path)
        self._hashing = HashingWriter(self._file)
        self._tar: TarWriter | None = TarWriter(
            self._hashing,
            encoder=False,  # fields are bytes already; str is encoded in add()
            keep_meta=True,  # write fields named "_x" too; "__" ones are dropped in add()
            user="",
            group="",
            mode=0o444,
            mtime=_MTIME,
            compress=False,
            format="PAX_FORMAT",  # long keys and non-ASCII names, which ustar cannot hold
        )
        self._seen: set[str] = set()
        self.num_samples = 0
        self.first_key = self.last_key = ""

    def add(self, sample: dict) -> None:
        assert self._tar is not None, "shard already committed or aborted"
        key = _check_key(sample.get("__key__"), self._seen)
        fields: dict[str, bytes | str] = {"__key__": key}
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
            fields[ext] = bytes(value)
        self._tar.write(fields)
        self.first_key = self.first_key or key
        self.last_key = key
        self.num_samples += 1

    def commit(self) -> ShardInfo:
        assert self._tar is not None, "shard already committed or aborted"
        self._tar.close()
        self._tar = None
        self._file.commit()
        return ShardInfo(
            path=str(self.path),
            num_samples=self.num_samples,
            num_bytes=self._hashing.size,
            first_key=self.first_key,
            last_key=self.last_key,
            sha256=self._hashing.hexdigest(),
        )

    def abort(self) -> None:
        if self._tar is not None:
            self._tar = None  # its buffered end of archive is never needed
        self._file.abort()

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _write_one(path: Path, samples: list[dict]) -> ShardInfo:
    with TarShardWriter(path) as writer:
        for sample in samples:
            writer.add(sample)
        return writer.commit()


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
