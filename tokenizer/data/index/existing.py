"""What a tokenize run finds in its output folder: the inputs its index must cover.

A folder that holds an index keeps all of it. A run that lists every input of the
existing manifest (a rerun, or the same inputs and more) needs nothing else; a run of
other inputs either appends (--append: the manifest then lists the old inputs, then the
new) or is refused, never silently dropping the old shards from the manifest. Read-only:
every rank calls it before anything is written, so all refuse alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizer.data.index.files import unlisted_files
from tokenizer.data.index.format import MANIFEST, GridSpec, IndexManifest, read_manifest
from tokenizer.data.index.writer import check_settings

_NAMED = 5


@dataclass
class IndexInputs:
    sources: list[str]  # every source shard the index will cover, in manifest order
    earlier: int  # how many of them come from the existing manifest only (not this run)
    existing: IndexManifest | None


def _existing(index_dir: Path) -> IndexManifest | None:
    if not (index_dir / MANIFEST).is_file():
        return None
    try:
        return read_manifest(index_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{index_dir / MANIFEST}: unreadable manifest ({err}); fix or remove it, or use "
            "a new output folder"
        ) from None


def index_inputs(
    index_dir: Path, sources: list[str], settings: str, storage: str, append: bool
) -> IndexInputs:
    """The run's inputs with those of an existing index; raises when they cannot share
    the folder (other settings or format, or other inputs without `append`)."""
    existing = _existing(index_dir)
    if existing is None:
        return IndexInputs(sources, 0, None)
    if existing.storage != storage:
        raise ValueError(
            f"{index_dir}: the index there was written with --format {existing.storage}, "
            f"this run asks for --format {storage}; use the same format or a new output folder"
        )
    for record in existing.shards:
        check_settings(index_dir, record, settings)
    listed = set(sources)
    others = [s for s in existing.inputs if s not in listed]
    if others and not append:
        raise ValueError(
            f"{index_dir} already indexes {len(others)} input shards this run does not list "
            f"(e.g. {', '.join(others[:_NAMED])}); pass --append to add this run's inputs to "
            "that index, or list all its inputs again, or use a new output folder"
        )
    if not append:
        return IndexInputs(sources, 0, existing)
    earlier = set(existing.inputs)
    return IndexInputs(
        existing.inputs + [s for s in sources if s not in earlier], len(others), existing
    )


def check_no_strays(index_dir: Path, names: list[str], grids: list[GridSpec], packed: bool) -> None:
    """Refuses a folder holding shard files or records of none of the planned shards: a
    manifest written at the end would not list them, and --verify would reject it."""
    strays = unlisted_files(index_dir, names, grids, packed)
    if strays:
        raise ValueError(
            f"{index_dir}: {len(strays)} files belong to no input of this run nor of the "
            f"index there ({', '.join(strays[:_NAMED])}): left by a killed or failed run "
            "of other inputs, or another format? Rerun that run, delete them, or use a new "
            "output folder"
        )
