"""Make webdataset image shards (OUTPUT/000000.tar, 000001.tar, ...).

    python tools/make_shards.py --input photos/ --output data/mine
    python tools/make_shards.py --input photos/ --output data/mine --replace
    python tools/make_shards.py --sample-images --output data/demo

--input packs every image under a folder (recursive, sorted by path) with its optional
`name.txt` caption and `name.json` metadata. Every image is decoded in full first: an
empty, truncated or undecodable file is skipped and reported with its reason, as is every
file that is not an image. jpg/jpeg/png/webp/bmp/gif/tif/tiff are stored as they are
(no re-encode); any other format PIL reads (ppm, tga, ico, qoi, jp2, avif, psd, ...) is
stored as a lossless PNG. The output folder must be empty, or --replace deletes the
shards of an earlier run in it first (other files in it are left alone).

--sample-images builds the embedded demo set from the photographs bundled with
scikit-image and scikit-learn (reused when already complete, rebuilt with --force).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

# Runs as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.cli.status_line import StatusLine  # noqa: E402
from tokenizer.data.demo import (
    SPLITS,  # noqa: E402
    build_demo_set,  # noqa: E402
)
from tokenizer.data.folder import (  # noqa: E402
    BAD_IMAGE,
    BAD_SIDECAR,
    NON_IMAGE,
    FolderPacker,
    PackCounts,
    SkippedFile,
)
from tokenizer.data.writer import OutputNotEmpty, brace_pattern, prepare_output, write_shards  # noqa: E402  # noqa: E402

_DEMO_DEFAULTS = {"resolution": 64, "train_crops": 4096, "eval_crops": 64, "seed": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FOLDER", help="folder of images (recursive)")
    source.add_argument("--sample-images", action="store_true", help="build the embedded demo set")
    parser.add_argument("--output", required=True, metavar="FOLDER", help="output folder")
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        metavar="N",
        help="default: 1000 for --input, train crops / 8 for --sample-images",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress line on stderr (skipped files and the summary are still printed)",
    )
    folder = parser.add_argument_group("--input options")
    folder.add_argument(
        "--replace",
        action="store_true",
        help="the output folder may hold an earlier run: delete its shards (NNNNNN.tar and "
        "their .tmp files) first; other files in it are left alone",
    )
    folder.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="threads decoding images to check them (default: min(8, CPUs) = %(default)s)",
    )
    demo = parser.add_argument_group("--sample-images options")
    demo.add_argument("--resolution", type=int, metavar="PIXELS", help="crop size (default 64)")
    demo.add_argument("--train-crops", type=int, metavar="N", help="default 4096")
    demo.add_argument("--eval-crops", type=int, metavar="N", help="default 64")
    demo.add_argument("--seed", type=int, metavar="N", help="default 0")
    demo.add_argument(
        "--split",
        choices=SPLITS,
        help="hold out whole photographs (chelsea, flower; the default, 'photos') or two "
        "quadrants of every other one ('regions')",
    )
    demo.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    demo_given = [
        f"--{name.replace('_', '-')}"
        for name in (*_DEMO_DEFAULTS, "split")
        if getattr(args, name) is not None
    ] + (["--force"] if args.force else [])
    if args.input and demo_given:
        parser.error(f"{', '.join(demo_given)} only apply to --sample-images")
    if args.sample_images and args.replace:
        parser.error("--replace applies to --input; --sample-images rebuilds with --force")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        parser.error("--samples-per-shard must be at least 1")
    return args


def _by_extension(paths: list[Path]) -> str:
    counts = Counter(p.suffix.lower() or "(no extension)" for p in paths)
    return ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items(), key=lambda c: (-c[1], c[0])))


def _summary(counts: PackCounts, num_shards: int) -> str:
    text = f"wrote {counts.stored} samples in {num_shards} shards"
    if counts.reencoded:
        text += f" ({counts.reencoded} images re-encoded as PNG)"
    kinds = Counter(s.kind for s in counts.skipped)
    if not counts.skipped:
        return text + "; skipped no files"
    parts = []
    if kinds[BAD_IMAGE]:
        parts.append(f"{kinds[BAD_IMAGE]} images that do not decode")
    if kinds[NON_IMAGE]:
        non_images = [s.path for s in counts.skipped if s.kind == NON_IMAGE]
        parts.append(f"{kinds[NON_IMAGE]} non-image files ({_by_extension(non_images)})")
    if kinds[BAD_SIDECAR]:
        parts.append(f"{kinds[BAD_SIDECAR]} unreadable .txt/.json sidecars")
    return text + f"; skipped {len(counts.skipped)} files: " + ", ".join(parts)


def pack_folder(args: argparse.Namespace) -> int:
    status = StatusLine(enabled=not args.no_progress)
    started = time.perf_counter()

    def progress_text(counts: PackCounts) -> str:
        rate = counts.images_done / max(time.perf_counter() - started, 1e-9)
        return (
            f"{counts.images_done}/{counts.images_total} images checked, "
            f"{rate:.1f} img/s, {len(counts.skipped)} files skipped"
        )

    def on_skip(skip: SkippedFile) -> None:
        status.note(f"skipped {skip.path}: {skip.reason}")

    status.update(f"scanning {args.input} ...", force=True)
    packer = FolderPacker(
        args.input,
        workers=args.workers,
        on_skip=on_skip,
        on_progress=lambda counts: status.update(progress_text(counts)),
    )
    scan = packer.scan
    if not scan.images:
        others = f" ({len(scan.non_images)} other files)" if scan.non_images else ""
        print(f"error: no images under {args.input}{others}", file=sys.stderr)
        return 1
    try:
        prepared = prepare_output(args.output, replace=args.replace)
    except OutputNotEmpty as err:
        print(
            f"error: {err}.\nPass --replace to delete the shards in it first "
            "(other files are left alone), or choose an empty folder.",
            file=sys.stderr,
        )
        return 2
    if prepared.removed:
        status.note(f"--replace: deleted {len(prepared.removed)} old shard files in {args.output}")
    if prepared.kept:
        kept = ", ".join(prepared.kept[:5]) + (", ..." if len(prepared.kept) > 5 else "")
        status.note(f"left {len(prepared.kept)} other entries in {args.output} alone: {kept}")
    if scan.non_images:
        first = ", ".join(str(p) for p in scan.non_images[:3])
        more = ", ..." if len(scan.non_images) > 3 else ""
        status.note(
            f"skipping {len(scan.non_images)} non-image files "
            f"({_by_extension(scan.non_images)}): {first}{more}"
        )

    infos = write_shards(
        packer.samples(), args.output, samples_per_shard=args.samples_per_shard or 1000
    )
    status.close(progress_text(packer.counts))
    print(_summary(packer.counts, len(infos)))
    if not infos:
        print(f"error: none of the images under {args.input} decodes", file=sys.stderr)
        return 1
    print(f"shards: {brace_pattern(args.output, len(infos))}")
    return 0


def build_demo(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in _DEMO_DEFAULTS}
    options = {
        name: d if given[name] is None else given[name] for name, d in _DEMO_DEFAULTS.items()
    }
    demo = build_demo_set(
        args.output,
        **options,
        samples_per_shard=args.samples_per_shard,
        force=args.force,
        split=args.split or "photos",
    )
    status = "built" if demo.built else "already complete, reused"
    print(f"demo set {status}: {len(demo.train_shards)} train, {len(demo.eval_shards)} eval shards")
    print(f"data.train_shards: {demo.train_pattern}")
    print(f"data.eval_shards: {demo.eval_pattern}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    return pack_folder(args) if args.input else build_demo(args)


if __name__ == "__main__":
    sys.exit(main())
