"""Shard specs: what a user writes for data.train_shards, data.eval_shards or --input.

A spec is a path, a brace pattern ("d/{000000..000099}.tar"), a glob ("d/*.tar",
"d/**/*.tar") or a list of any of these. Braces are expanded first, then globs; each
glob's matches are sorted (the file system lists them in no fixed order, and every rank
must see the same list), and a shard named twice is kept once (at its first place):
reading it twice per epoch would silently double its weight.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

_GLOB_CHARS = "*?["


class ShardSpecError(FileNotFoundError):
    """A shard spec that names no shard, or shards that do not exist; the message names
    the config key or option (`what`) and the pattern."""


def describe_spec(spec: Any) -> str:
    """The spec as the user wrote it, short enough for one error line."""
    if isinstance(spec, str | Path):
        return repr(str(spec))
    entries = [str(e) for e in spec]
    if len(entries) == 1:  # e.g. one --input pattern (argparse's nargs="+" makes a list)
        return repr(entries[0])
    shown = ", ".join(repr(e) for e in entries[:3])
    return f"[{shown}{', ...' if len(entries) > 3 else ''}]"


def _missing_folder(path: str) -> str:
    """' (no folder X)' when the deepest fixed folder of `path` does not exist."""
    parts = Path(path).parent.parts
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS)), len(parts))
    folder = Path(*parts[:fixed]) if fixed else Path(".")
    return "" if folder.is_dir() else f" (no folder {folder})"


def _glob(pattern: str, what: str) -> list[str]:
    # An existing file is taken as it is, so re-expanding an expanded list is harmless
    # even when a file's name holds glob characters.
    if not any(c in pattern for c in _GLOB_CHARS) or os.path.isfile(pattern):
        return [pattern]
    matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
        raise ShardSpecError(f"{what}: {pattern!r} matches no file{_missing_folder(pattern)}")
    return matches


def expand_shards(spec: str | Sequence[str] | None, what: str = "shards") -> list[str]:
    """Every shard path a spec names, in order, without duplicates; [] for None.

    A glob matching no file raises ShardSpecError naming `what` (the config key or
    option the spec came from) and the pattern; plain paths are not checked here (see
    check_shards_exist)."""
    if spec is None:
        return []
    if isinstance(spec, str | Path):
        entries: list[Any] = [spec]
    elif isinstance(spec, Sequence):
        entries = list(spec)
    else:
        raise TypeError(f"{what}: give a path, a pattern or a list of them, got {spec!r}")
    paths: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, str | Path):
            raise TypeError(f"{what}: shard spec entries must be strings, got {entry!r}")
        for pattern in braceexpand(str(entry)):
            for path in _glob(pattern, what):
                key = os.path.normpath(path)
                if key not in seen:
                    seen.add(key)
                    paths.append(path)
    return paths


def check_shards_exist(paths: Sequence[str], what: str = "shards") -> None:
    """Raise ShardSpecError naming every missing shard. An empty list passes: whether
    shards are required (train) or optional (eval) is the caller's call."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        # When nothing is there, a few names show the pattern; else list what lacks.
        limit = 3 if len(missing) == len(paths) else 10
        shown = ", ".join(missing[:limit])
        more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
        raise ShardSpecError(
            f"{what}: {len(missing)} of {len(paths)} shards missing: {shown}{more}"
            f"{_missing_folder(missing[0])}"
        )


def resolve_shards(spec: Any, what: str, required: bool) -> list[str]:
    """expand_shards + check_shards_exist, the errors naming `what` and the spec;
    `required`: an empty spec is an error too."""
    paths = expand_shards(spec, what)
    if not paths:
        if required:
            raise ShardSpecError(
                f"{what} is empty: give a tar path, a brace pattern "
                f"('data/mine/{{000000..000099}}.tar'), a glob ('data/mine/*.tar') or a list"
            )
        return paths
    check_shards_exist(paths, f"{what}={describe_spec(spec)}")
    return paths
