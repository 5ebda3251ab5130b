"""Make webdataset image shards.

    python tools/make_shards.py --input photos/ --output data/mine
    python tools/make_shards.py --sample-images --output data/demo

--input stores every jpg/jpeg/png/webp under a folder as it is (no re-encode), with an
optional `name.txt` caption. --sample-images builds the embedded demo set from the
photographs bundled with scikit-image and scikit-learn (reused when already complete).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Runs as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.data import brace_pattern, build_demo_set, folder_samples, write_shards  # noqa: E402
from tokenizer.data.demo import SPLITS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="folder of images (recursive)")
    source.add_argument("--sample-images", action="store_true", help="build the embedded demo set")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        help="default: 1000 for --input, train crops / 8 for --sample-images",
    )
    demo = parser.add_argument_group("--sample-images options")
    demo.add_argument("--resolution", type=int, default=64)
    demo.add_argument("--train-crops", type=int, default=4096)
    demo.add_argument("--eval-crops", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--split",
        choices=SPLITS,
        default="photos",
        help="hold out whole photographs (chelsea, flower) or two quadrants of every other one",
    )
    demo.add_argument("--force", action="store_true", help="rebuild even if complete")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.input:
        infos = write_shards(
            folder_samples(args.input),
            args.output,
            samples_per_shard=args.samples_per_shard or 1000,
        )
        if not infos:
            print(f"no images found under {args.input}", file=sys.stderr)
            return 1
        total = sum(s.num_samples for s in infos)
        print(f"wrote {total} samples in {len(infos)} shards")
        print(f"shards: {brace_pattern(args.output, len(infos))}")
        return 0

    demo = build_demo_set(
        args.output,
        resolution=args.resolution,
        train_crops=args.train_crops,
        eval_crops=args.eval_crops,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        force=args.force,
        split=args.split,
    )
    status = "built" if demo.built else "already complete, reused"
    print(f"demo set {status}: {len(demo.train_shards)} train, {len(demo.eval_shards)} eval shards")
    print(f"data.train_shards: {demo.train_pattern}")
    print(f"data.eval_shards: {demo.eval_pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
