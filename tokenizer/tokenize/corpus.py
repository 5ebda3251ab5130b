"""Tokenize a corpus of image shards into index shards (tools/tokenize_dataset.py).

Three stages overlap on every rank: DataLoader workers decode and crop whole source
shards, the main thread encodes batches on the accelerator, and a background thread
writes each output shard (to a temporary name, renamed when complete, then its record).
Source shards are divided among ranks after leaving out those whose record says they
are complete, so a rerun after a crash redoes only unfinished shards; one output shard
depends only on its source shard, so the result equals one clean run's. Rank 0 checks
that no key is in two shards and merges the records into manifest.json at the end.

A folder that already holds an index keeps all of it (index_existing.py): with
`append` the new inputs are added to it; without, the run must list all its inputs.
An existing manifest stays until the new one replaces it: it still describes the
earlier index if this run dies or fails.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from tokenizer.api import Tokenizer
from tokenizer.cli.progress import ImageProgress
from tokenizer.data.images.transforms import eval_preprocessing
from tokenizer.data.index.duplicates import DuplicateKeysError, find_duplicates
from tokenizer.data.index.existing import check_no_strays, index_inputs
from tokenizer.data.index.format import (
    MANIFEST,
    GridSpec,
    IndexManifest,
    ShardRecord,
    code_dtype,
    grid_fields,
    keys_path,
    output_name,
    read_record,
    settings_digest,
    single_grid_fields,
    write_json_atomic,
)
from tokenizer.data.index.sink import EncodedBatch, IndexSink
from tokenizer.data.index.writer import completed_record, remove_stale_temporaries
from tokenizer.data.shard_specs import check_shards_exist, resolve_shards
from tokenizer.data.slots import reader_slot
from tokenizer.data.source_batches import SourceBatch, SourceShards
from tokenizer.training.engine import make_accelerator

# Ranks finish their last shards at different times; the final barrier must outwait that.
_BARRIER_TIMEOUT = timedelta(hours=12)
_MAX_WORKERS = 4


def default_num_workers() -> int:
    """Decoding workers per rank: min(4, the CPU cores this process may use divided by
    the ranks on this machine), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(_MAX_WORKERS, cores // local_ranks))


@dataclass
class TokenizeOptions:
    tokenizer: str  # release directory
    inputs: list[str]  # brace patterns or tar paths
    output: str
    batch_size: int = 64
    num_workers: int | None = None  # None: default_num_workers()
    resolution: int = 0  # 0: the tokenizer's training resolution
    storage: str = "tar"  # "tar", or "npy": tars plus packed (n, h, w) arrays
    progress: bool = True
    append: bool = False  # add the inputs to an index of other inputs in `output`


@dataclass
class TokenizeSummary:
    num_shards: int  # source shards of the index (earlier inputs included)
    shards_skipped: int  # complete from an earlier run
    shards_earlier: int  # of them, inputs of the existing index that this run does not list
    images_encoded: int  # by this run, all ranks
    seconds: float
    manifest: IndexManifest | None  # on rank 0


@dataclass
class _Plan:
    sources: list[str]  # absolute paths, in manifest order (earlier inputs first)
    names: list[str]  # output tar names
    grids: list[GridSpec]
    preprocessing: dict
    settings: str
    earlier: int  # inputs only the existing manifest lists
    existing: bool  # the folder held a manifest


def _check_names(sources: list[str], names: list[str], earlier: int, out: Path) -> None:
    seen: dict[str, str] = {}
    for i, (source, name) in enumerate(zip(sources, names, strict=True)):
        if os.path.abspath(out / name) == source:
            raise ValueError(f"{source}: its index shard would replace it; use another --output")
        if name in seen:
            where = " (the first already in the index)" if i >= earlier > 0 else ""
            raise ValueError(
                f"{seen[name]} and {source} would both write {name}{where}: output shards "
                "are named after their source shard; rename one"
            )
        seen[name] = source


def _plan(options: TokenizeOptions, tok: Tokenizer, out: Path) -> _Plan:
    requested = [
        os.path.abspath(p) for p in resolve_shards(options.inputs, "--input", required=True)
    ]
    if options.storage not in ("tar", "npy"):
        raise ValueError(f"--format must be 'tar' or 'npy', got {options.storage!r}")
    resolution = options.resolution or tok.resolution
    grids = grid_specs(tok, resolution)
    preprocessing = eval_preprocessing(resolution)
    settings = settings_digest(tok.fingerprint, preprocessing, grids)
    inputs = index_inputs(out, requested, settings, options.storage, options.append)
    names = [output_name(s) for s in inputs.sources]
    _check_names(inputs.sources, names, inputs.earlier, out)
    check_no_strays(out, names, grids, options.storage == "npy")
    return _Plan(
        inputs.sources,
        names,
        grids,
        preprocessing,
        settings,
        inputs.earlier,
        inputs.existing is not None,
    )


def grid_specs(tok: Tokenizer, resolution: int) -> list[GridSpec]:
    """Every code grid of `tok` at a square `resolution`: its sample field, (h, w), K and
    code dtype, in the model's order (coarsest first)."""
    shapes = tok.grid_shapes(resolution, resolution)
    sizes = tok.codebook_sizes
    fields = grid_fields(list(tok.grid_names))
    return [
        GridSpec(name, fields[name], list(shapes[name]), sizes[name], code_dtype(sizes[name]).name)
        for name in tok.grid_names
    ]


def _to_numpy(codes: dict[str, torch.Tensor], grids: list[GridSpec]) -> dict[str, np.ndarray]:
    # Narrow on the device, copy the smaller array: (b, h, w) int32, then the grid's dtype.
    return {
        g.name: codes[g.name].to(torch.int32).cpu().numpy().astype(g.dtype, copy=False)
        for g in grids
    }


def _empty_codes(grids: list[GridSpec]) -> dict[str, np.ndarray]:
    return {g.name: np.zeros((0, *g.shape), np.dtype(g.dtype)) for g in grids}


def _identity(batch: SourceBatch) -> SourceBatch:
    return batch


def _encode_shards(
    tok: Tokenizer,
    plan: _Plan,
    jobs: list[int],
    options: TokenizeOptions,
    out: Path,
    progress: ImageProgress,
) -> None:
    """Encode and write this rank's shards."""
    sources = [plan.sources[j] for j in jobs]
    names = [plan.names[j] for j in jobs]
    resolution = plan.preprocessing["resolution"]
    workers = min(_num_workers(options), len(sources))
    extra = {"prefetch_factor": 4} if workers > 0 else {}
    loader = DataLoader(
        SourceShards(sources, resolution, options.batch_size),
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=tok.device.type == "cuda",
        **extra,
    )
    sink = IndexSink(out, names, sources, plan.grids, plan.settings, options.storage == "npy")
    # One batch in flight: the device encodes batch i+1 while batch i's codes come back.
    pending: tuple[SourceBatch, dict[str, torch.Tensor] | None] | None = None
    try:
        for batch in loader:
            codes = tok.encode_grids(batch.images) if batch.keys else None
            if pending is not None:
                sink.put(_finish(*pending, plan.grids))
            pending = (batch, codes)
            progress.update(
                len(batch.keys), len(batch.failed), batch.source_bytes, len(sink.records)
            )
        if pending is not None:
            sink.put(_finish(*pending, plan.grids))
    except BaseException:
        sink.abort()  # unfinished shards keep no files; the original error propagates
        raise
    progress.update(0, 0, 0, len(sink.close()))


def _finish(
    batch: SourceBatch, codes: dict[str, torch.Tensor] | None, grids: list[GridSpec]
) -> EncodedBatch:
    arrays = _to_numpy(codes, grids) if codes is not None else _empty_codes(grids)
    return EncodedBatch(
        batch.job, batch.keys, batch.fields, arrays, batch.failed, batch.end, batch.read_error
    )


def _num_workers(options: TokenizeOptions) -> int:
    return default_num_workers() if options.num_workers is None else options.num_workers


def _records(plan: _Plan, out: Path) -> list[ShardRecord]:
    records: list[ShardRecord] = []
    for name in plan.names:
        record = read_record(out, name)
        if record is None or record.settings != plan.settings:
            raise RuntimeError(f"{out / name}: no record after every rank finished")
        records.append(record)
    return records


def _duplicates_error(
    plan: _Plan, out: Path, records: list[ShardRecord]
) -> DuplicateKeysError | None:
    """Keys in two shards: the index must not get a manifest."""

    def broken(message: str) -> None:
        raise RuntimeError(f"{message}: an index shard written by this run is unreadable")

    digests = [np.load(keys_path(out, r.path), allow_pickle=False) for r in records]
    duplicates = find_duplicates(out, records, digests, broken)
    if not duplicates:
        return None
    kept = " (the existing one still describes the earlier index)" if plan.existing else ""
    hint = (
        f". Every key must be unique within an index: no manifest written{kept}. Remove "
        "the duplicates from the source shards (or leave a shard out, then delete its "
        f"files in {out}: the tar and records/<name>.*) and rerun: complete shards are "
        "not redone"
    )
    return DuplicateKeysError(duplicates, hint)


def _manifest(
    tok: Tokenizer, options: TokenizeOptions, plan: _Plan, records: list[ShardRecord]
) -> IndexManifest:
    return IndexManifest(
        tokenizer={
            "sha256": tok.fingerprint,
            "config": tok.release_config(),
            "source": os.path.abspath(options.tokenizer),
        },
        **single_grid_fields(plan.grids),
        grids=plan.grids,
        preprocessing=plan.preprocessing,
        storage=options.storage,
        inputs=plan.sources,
        shards=records,
        num_samples=sum(r.num_samples for r in records),
        num_failed=sum(len(r.failed) for r in records),
    )


def tokenize_corpus(
    options: TokenizeOptions, accelerator: Accelerator | None = None
) -> TokenizeSummary:
    accelerator = accelerator or make_accelerator(timeout=_BARRIER_TIMEOUT)
    started = time.perf_counter()
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    tok = Tokenizer.from_pretrained(options.tokenizer, device=accelerator.device)
    out = Path(options.output)
    # Read-only, on every rank, before anything is written: an output folder of another
    # tokenizer or other inputs is refused everywhere, and every rank sees the same
    # pending list.
    plan = _plan(options, tok, out)
    packed = options.storage == "npy"
    pending = [
        j
        for j, name in enumerate(plan.names)
        if completed_record(out, name, plan.sources[j], plan.settings, packed) is None
    ]
    check_shards_exist([plan.sources[j] for j in pending])  # earlier inputs to redo
    if main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
    accelerator.wait_for_everyone()
    jobs = reader_slot(rank, world).take(pending)
    skipped = len(plan.names) - len(pending)
    if main:
        earlier = f", {plan.earlier} from the existing index" if plan.earlier else ""
        print(
            f"tokenizing {len(pending)} of {len(plan.names)} shards ({skipped} already "
            f"complete{earlier}) on {world} rank(s), {_num_workers(options)} decoding "
            f"workers per rank, device {accelerator.device}, "
            f"{plan.preprocessing['resolution']} px -> "
            + ", ".join(f"grid {g.name} {g.shape}" for g in plan.grids),
            file=sys.stderr,
            flush=True,
        )
    total_bytes = sum(os.path.getsize(plan.sources[j]) for j in jobs)
    progress = ImageProgress(total_bytes, len(jobs), world, enabled=main and options.progress)
    try:
        if jobs:
            _encode_shards(tok, plan, jobs, options, out, progress)
    finally:
        progress.close()
    images = torch.tensor([progress.images], device=accelerator.device)
    total = accelerator.reduce(images, "sum")
    accelerator.wait_for_everyone()
    manifest, refused = None, None
    if main:
        records = _records(plan, out)
        refused = _duplicates_error(plan, out, records)
        if refused is None:
            manifest = _manifest(tok, options, plan, records)
            write_json_atomic(out / MANIFEST, manifest.to_dict())
    # Every rank learns rank 0's verdict: all exit alike, none waits on a dead barrier.
    verdict = torch.tensor([0 if refused is None else 1], device=accelerator.device)
    if int(accelerator.reduce(verdict, "sum").item()):
        if refused is not None:
            raise refused
        raise ValueError("rank 0 found keys in more than one shard (it names them)")
    accelerator.wait_for_everyone()
    return TokenizeSummary(
        num_shards=len(plan.names),
        shards_skipped=skipped,
        shards_earlier=plan.earlier,
        images_encoded=int(total.item()),
        seconds=time.perf_counter() - started,
        manifest=manifest,
    )
