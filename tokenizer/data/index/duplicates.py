"""Keys that appear in more than one index shard.

Each shard's keys are 8-byte digests (records/*.keys.npy, or hashed from its tar), so
hundreds of millions of keys fit in memory; a second pass reads only the shards holding
a repeated digest, to name the keys and to tell a real duplicate from a digest collision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenizer.data.index.format import ShardRecord, key_digest
from tokenizer.data.tars import read_tar

_NAMED = 10  # duplicates named in a message; the count covers all


@dataclass
class DuplicateKey:
    key: str
    sources: list[str]  # the source shards whose index shards hold it, in index order


class DuplicateKeysError(ValueError):
    def __init__(self, duplicates: list[DuplicateKey], hint: str) -> None:
        self.duplicates = duplicates
        super().__init__(describe_duplicates(duplicates) + hint)


def describe_duplicates(duplicates: list[DuplicateKey]) -> str:
    named = "; ".join(f"{d.key!r} in {' and '.join(d.sources)}" for d in duplicates[:_NAMED])
    more = f" (and {len(duplicates) - _NAMED} more)" if len(duplicates) > _NAMED else ""
    return f"{len(duplicates)} keys appear in more than one shard: {named}{more}"


def repeated_digests(digests: list[np.ndarray]) -> np.ndarray:
    """The digests that occur more than once over all shards (sorted, unique)."""
    every = np.concatenate([np.zeros(0, np.uint64), *digests])
    every.sort()  # in place: one copy of the digests, not np.unique's several
    same = every[1:] == every[:-1]
    return np.unique(every[1:][same])


def find_duplicates(
    index_dir: Path,
    records: list[ShardRecord],
    digests: list[np.ndarray],
    on_error: Callable[[str], None],
) -> list[DuplicateKey]:
    """Keys in more than one of `records` (digests[i]: shard i's key digests); a tar that
    breaks while its keys are read goes to on_error."""
    repeated = repeated_digests(digests)
    if not repeated.size:
        return []
    wanted = {int(d) for d in repeated}
    holders: dict[str, list[str]] = {}
    for record, keys in zip(records, digests, strict=True):
        if not np.isin(keys, repeated).any():
            continue
        for raw in read_tar(str(index_dir / record.path), on_error):
            if key_digest(raw.key) in wanted:
                holders.setdefault(raw.key, []).append(record.source)
    return [DuplicateKey(k, s) for k, s in sorted(holders.items()) if len(s) > 1]
