r"""Tokenize image shards into index shards (codes + captions) for training priors.

    accelerate launch tools/tokenize_dataset.py --tokenizer runs/demo/release \
        --input 'data/{000000..000099}.tar' --output codes/ [--format npy]
    accelerate launch tools/tokenize_dataset.py --tokenizer runs/demo/release \
        --input 'more/{000000..000049}.tar' --output codes/ --append
    python tools/tokenize_dataset.py --verify codes/

One output shard per input shard (same name), a manifest.json at the end; rerun the same
command after a crash and it finishes the work without redoing complete shards. On CPU
ranks launch with `accelerate launch --multi_gpu --num_processes N` (not --cpu).

An output folder that holds an index keeps it: --append adds the inputs to it (same
tokenizer, resolution and --format; shard names must differ), and without --append a
run must list all of its inputs. A key in two input shards (or already in the index)
stops the run before the manifest is written, naming the keys and their shards.
--verify checks every file against the sha256 recorded when it was written, and the
manifest against every shard and record on disk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runs as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.cli.lifecycle import close_distributed, exit_rank, exit_with_launcher  # noqa: E402
from tokenizer.data.index.format import GridSpec  # noqa: E402
from tokenizer.data.index.verify import verify_index  # noqa: E402
from tokenizer.tokenize.corpus import (  # noqa: E402
    TokenizeOptions,
    default_num_workers,
    tokenize_corpus,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", help="release directory (config.json + model.safetensors)")
    parser.add_argument("--input", nargs="+", help="brace patterns or tar paths")
    parser.add_argument("--output", help="index folder to write")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encode, per rank")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="decoding workers per rank (default: min(4, CPU cores available / ranks on "
        f"this machine), {default_num_workers()} here)",
    )
    parser.add_argument(
        "--resolution", type=int, default=0, help="crop size (default: the tokenizer's own)"
    )
    parser.add_argument(
        "--format",
        choices=("tar", "npy"),
        default="tar",
        help="npy: also a packed (n, h, w) array and a keys/captions sidecar per shard",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add the inputs to the index already in --output (its manifest then lists both)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--verify", metavar="OUT_DIR", help="check an index folder against its sources and exit"
    )
    parser.add_argument(
        "--skip-sources", action="store_true", help="with --verify: do not re-read the sources"
    )
    args = parser.parse_args(argv)
    if not args.verify and not (args.tokenizer and args.input and args.output):
        parser.error("--tokenizer, --input and --output are required (or --verify OUT_DIR)")
    return args


def verify(index_dir: str, check_sources: bool) -> int:
    report = verify_index(index_dir, check_sources=check_sources)
    for note in report.notes[:20]:
        print(f"note: {note}")
    for problem in report.problems[:50]:
        print(f"PROBLEM: {problem}")
    if len(report.problems) > 50:
        print(f"... and {len(report.problems) - 50} more problems")
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(
        f"{index_dir}: {status}: {report.num_samples} samples in {report.num_shards} shards, "
        f"{report.num_failed} failed samples listed"
    )
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    exit_with_launcher()  # a rank never outlives its launcher
    args = parse_args(argv)
    if args.verify:
        return verify(args.verify, not args.skip_sources)
    options = TokenizeOptions(
        tokenizer=args.tokenizer,
        inputs=args.input,
        output=args.output,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        resolution=args.resolution,
        storage=args.format,
        progress=not args.no_progress,
        append=args.append,
    )
    try:
        summary = tokenize_corpus(options)
    except (ValueError, FileNotFoundError) as err:  # bad arguments or a foreign output folder
        print(f"error: {err}", file=sys.stderr)
        return 2
    close_distributed()
    manifest = summary.manifest
    if manifest is not None:
        rate = summary.images_encoded / max(summary.seconds, 1e-9)
        earlier = (
            f", {summary.shards_earlier} of them inputs of earlier runs"
            if summary.shards_earlier
            else ""
        )
        print(
            f"index: {Path(args.output) / 'manifest.json'}\n"
            f"shards: {summary.num_shards} ({summary.shards_skipped} complete before this run"
            f"{earlier})\n"
            f"samples: {manifest.num_samples} in the index, {manifest.num_failed} failed "
            f"(listed in the manifest)\n"
            f"this run: {summary.images_encoded} images in {summary.seconds:.1f} s, "
            f"{rate:.1f} images/s\n"
            f"codes: {_grids(manifest.grids)}, tokenizer sha256 {manifest.tokenizer_sha256[:16]}..."
        )
    return 0


def _grids(grids: list[GridSpec]) -> str:
    """`uint16 grid [16, 16], K=512` for one grid; `grid top: uint16 [8, 8], K=512; grid
    bottom: ...` for several (a hierarchy's manifest has no top-level shape or K)."""
    if len(grids) == 1:
        g = grids[0]
        return f"{g.dtype} grid {g.shape}, K={g.codebook_size}"
    return "; ".join(f"grid {g.name}: {g.dtype} {g.shape}, K={g.codebook_size}" for g in grids)


if __name__ == "__main__":
    exit_rank(main())
