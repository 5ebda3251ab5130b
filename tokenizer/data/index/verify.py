"""Check an index folder against its manifest and its source shards.

The sha256 of every shard file against its record (a flipped bit anywhere is found,
also with check_sources=False); every record and shard file on disk listed by the
manifest, and every manifest entry equal to its record; counts, dtypes, shapes and code
ranges of every sample; packed arrays equal to the tars; each key in one shard only;
every readable source key either in the index exactly once (with its txt/json fields
byte-identical) or listed as failed. Anything else is a problem.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tokenizer.data.index.duplicates import describe_duplicates, find_duplicates
from tokenizer.data.index.files import sha256_file, unlisted_files
from tokenizer.data.index.format import (
    GridSpec,
    IndexManifest,
    ShardRecord,
    carried_fields,
    code_dtype,
    key_digests,
    keys_path,
    load_tokens,
    read_manifest,
    read_record,
    record_path,
    sidecar_bytes,
    single_grid_fields,
)
from tokenizer.data.tars import RawSample, read_tar


@dataclass
class VerifyReport:
    num_shards: int = 0
    num_samples: int = 0
    num_failed: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # listed failures: accounted for, not wrong

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_all(path: Path, problems: list[str]) -> list[RawSample]:
    return list(read_tar(str(path), problems.append))


def _check_codes(key: str, raw: RawSample, grids: list[GridSpec]) -> list[str]:
    problems = []
    for grid in grids:
        data = raw.fields.get(grid.field)
        if data is None:
            problems.append(f"{raw.shard}: sample {key!r} has no {grid.field}")
            continue
        codes = load_tokens(data)
        if codes.dtype != np.dtype(grid.dtype) or list(codes.shape) != grid.shape:
            problems.append(
                f"{raw.shard}: sample {key!r} {grid.field} is {codes.dtype} {codes.shape}, "
                f"the manifest says {grid.dtype} {tuple(grid.shape)}"
            )
        elif codes.size and (codes.min() < 0 or codes.max() >= grid.codebook_size):
            problems.append(
                f"{raw.shard}: sample {key!r} {grid.field} has codes outside "
                f"[0, {grid.codebook_size}): {codes.min()}..{codes.max()}"
            )
    return problems


def _check_packed(
    root: Path, shard: ShardRecord, samples: list[RawSample], grids: list[GridSpec]
) -> list[str]:
    if shard.packed is None:
        return [f"{shard.path}: npy format but no packed arrays recorded"]
    absent = [f for f in shard.packed.values() if not (root / f).is_file()]
    if absent:
        return [f"{shard.path}: packed files missing: {absent}"]
    problems = []
    for grid in grids:
        array = np.load(root / shard.packed[grid.name], mmap_mode="r", allow_pickle=False)
        expected = (len(samples), *grid.shape)
        if array.shape != expected or array.dtype != np.dtype(grid.dtype):
            problems.append(
                f"{shard.packed[grid.name]}: {array.dtype} {array.shape}, expected "
                f"{grid.dtype} {expected}"
            )
            continue
        for row, raw in enumerate(samples):
            if grid.field in raw.fields and not np.array_equal(
                array[row], load_tokens(raw.fields[grid.field])
            ):
                problems.append(f"{shard.packed[grid.name]}: row {row} differs from the tar")
                break
    lines = (root / shard.packed["samples"]).read_text(encoding="ascii").splitlines()
    rows = [json.loads(line) for line in lines]
    if [r["__key__"] for r in rows] != [s.key for s in samples]:
        problems.append(f"{shard.packed['samples']}: keys differ from the tar's")
    else:
        for row, raw in zip(rows, samples, strict=True):
            meta = {k: sidecar_bytes(v) for k, v in row.items() if k != "__key__"}
            if meta != carried_fields(raw.fields):
                problems.append(f"{shard.packed['samples']}: {raw.key!r} fields differ")
                break
    return problems


def _check_source(shard: ShardRecord, index: dict[str, RawSample]) -> list[str]:
    source = Path(shard.source)
    if not source.is_file():
        return [f"{shard.path}: source shard {source} not found, cannot compare"]
    errors: list[str] = []
    raws = _read_all(source, errors)
    problems = []
    if bool(errors) != bool(shard.read_error):
        problems.append(f"{source}: read error now {errors}, recorded {shard.read_error!r}")
    failed = {f.key for f in shard.failed}
    source_keys = set()
    for raw in raws:
        source_keys.add(raw.key)
        out = index.get(raw.key)
        if out is None:
            if raw.key not in failed:
                problems.append(f"{source}: key {raw.key!r} is neither in the index nor failed")
        elif carried_fields(out.fields) != carried_fields(raw.fields):
            problems.append(f"{shard.path}: {raw.key!r} txt/json differ from the source")
    for key in sorted(set(index) - source_keys)[:10]:
        problems.append(f"{shard.path}: key {key!r} is not in the source {source}")
    for key in sorted(failed & set(index))[:10]:
        problems.append(f"{shard.path}: key {key!r} is listed as failed but present")
    return problems


def _check_files(root: Path, manifest: IndexManifest, shard: ShardRecord) -> list[str]:
    """The shard's record on disk equals the manifest's entry; every file hashes to the
    sha256 recorded when it was written."""
    problems = []
    on_disk = read_record(root, shard.path)
    if on_disk is None:
        problems.append(f"{shard.path}: its record is missing (records/)")
    elif asdict(on_disk) != asdict(shard):
        problems.append(f"{shard.path}: its record differs from the manifest's entry")
    if not shard.checksums:
        if manifest.format_version >= 2:
            problems.append(f"{shard.path}: no checksums recorded")
        return problems
    packed = manifest.storage == "npy" and shard.packed is not None
    files = [shard.path, *(shard.packed.values() if packed else [])]  # type: ignore[union-attr]
    for name in files:
        if name not in shard.checksums:
            problems.append(f"{shard.path}: no checksum recorded for {name}")
        elif (root / name).is_file() and sha256_file(root / name) != shard.checksums[name]:
            problems.append(
                f"{shard.path}: {name} has changed since it was written (sha256 differs "
                f"from the record): damaged; delete {record_path(Path(), shard.path)} and "
                "rerun the tokenize command to rewrite the shard"
            )
    return problems


def _check_keys_file(
    root: Path, manifest: IndexManifest, shard: ShardRecord, keys: np.ndarray
) -> list[str]:
    path = keys_path(root, shard.path)
    if not path.is_file():
        return [] if manifest.format_version < 2 else [f"{shard.path}: {path.name} is missing"]
    if not np.array_equal(np.load(path, allow_pickle=False), keys):
        return [f"{shard.path}: {path.name} differs from the tar's keys"]
    return []


def _check_shard(
    root: Path, manifest: IndexManifest, shard: ShardRecord, check_sources: bool
) -> tuple[list[str], np.ndarray]:
    """Problems of one shard, and the 64-bit digests of its keys (for duplicates)."""
    path = root / shard.path
    problems = _check_files(root, manifest, shard)
    if not path.is_file():
        return [*problems, f"{shard.path}: missing"], np.zeros(0, np.uint64)
    samples = _read_all(path, problems)
    if len(samples) != shard.num_samples:
        problems.append(f"{shard.path}: {len(samples)} samples, manifest says {shard.num_samples}")
    index: dict[str, RawSample] = {}
    for raw in samples:
        if raw.key in index:
            problems.append(f"{shard.path}: key {raw.key!r} appears twice")
        index[raw.key] = raw
        problems += _check_codes(raw.key, raw, manifest.grids)
    if manifest.storage == "npy":
        problems += _check_packed(root, shard, samples, manifest.grids)
    if check_sources:
        problems += _check_source(shard, index)
    keys = key_digests([raw.key for raw in samples])  # tar order, as the writer saved them
    problems += _check_keys_file(root, manifest, shard, keys)
    return problems, keys


def _check_header(manifest: IndexManifest) -> list[str]:
    problems = []
    for grid in manifest.grids:
        if np.dtype(grid.dtype) != code_dtype(grid.codebook_size):
            problems.append(f"grid {grid.name}: dtype {grid.dtype} for K={grid.codebook_size}")
    for key, want in single_grid_fields(manifest.grids).items():
        if getattr(manifest, key) != want:
            problems.append(f"{key} is {getattr(manifest, key)!r}, its grids give {want!r}")
    recorded = {s.source for s in manifest.shards}
    missing = [s for s in manifest.inputs if s not in recorded]
    if missing:
        problems.append(f"{len(missing)} input shards have no index shard: {missing[:5]}")
    listed = set(manifest.inputs)
    extra = [s.source for s in manifest.shards if s.source not in listed]
    if extra:
        problems.append(f"{len(extra)} index shards of sources not in the inputs: {extra[:5]}")
    if sum(s.num_samples for s in manifest.shards) != manifest.num_samples:
        problems.append("num_samples differs from the sum over shards")
    if sum(len(s.failed) for s in manifest.shards) != manifest.num_failed:
        problems.append("num_failed differs from the failed samples listed")
    return problems


def verify_index(index_dir: str | Path, check_sources: bool = True) -> VerifyReport:
    root = Path(index_dir)
    report = VerifyReport()
    try:
        manifest = read_manifest(root)
    except (OSError, ValueError, KeyError, TypeError) as err:
        report.problems.append(f"{root}: unreadable manifest ({err})")
        return report
    report.num_shards = len(manifest.shards)
    report.num_samples = manifest.num_samples
    report.num_failed = manifest.num_failed
    report.problems += _check_header(manifest)
    if manifest.format_version < 2:
        report.notes.append(
            f"{root}: index format version {manifest.format_version}: no checksums to "
            "check; rerunning the tokenizer on it rewrites it with them"
        )
    names = [s.path for s in manifest.shards]
    for stray in unlisted_files(root, names, manifest.grids, manifest.storage == "npy"):
        report.problems.append(
            f"{stray}: on disk but not in the manifest (from an unfinished or failed run, "
            "or another index?)"
        )
    digests: list[np.ndarray] = []
    for shard in manifest.shards:
        problems, keys = _check_shard(root, manifest, shard, check_sources)
        report.problems += problems
        digests.append(keys)
        report.notes += [f"{shard.source}: {f.key!r} failed: {f.reason}" for f in shard.failed]
        if shard.read_error:
            report.notes.append(shard.read_error)
    # A tar that breaks is already a problem of its shard; here it only hides keys.
    duplicates = find_duplicates(root, manifest.shards, digests, lambda _known: None)
    if duplicates:
        report.problems.append(describe_duplicates(duplicates))
    return report
