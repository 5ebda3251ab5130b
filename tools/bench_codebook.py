"""Codebook health at scale: a 16k-code demo tokenizer trained plain and healthy.

    python tools/bench_codebook.py [--steps 200] [--codebook-size 16384] [--eval-crops 2048]

Trains the demo model (configs/demo.yaml) twice for the same number of steps through
the real trainer (launch/train.py in a subprocess, run directories under
runs/bench_codebook/), once per recipe:

  plain    random init, no restarts, no l2 normalisation, no low-dimensional lookup
  healthy  k-means init, dead-code restarts (both rules), l2-normalised codes, 8-d lookup

(both keep the demo's EMA codebook), then exports each run as a release and measures
codebook usage (% of codes chosen at least once), perplexity and PSNR with
tokenizer.evaluation.evaluate (evaluate_shards, as tools/eval_tokenizer.py runs it), on two sets of
held-out images, neither sharing a pixel with a training crop:

  held-out regions  the training set is the demo builder's "regions" split: each of the
                    15 training photographs is cut into quadrants, two of which train;
                    this set is --eval-crops crops of the other two. Held-out images from
                    the training distribution, as a validation split is: the target's set.
  held-out photos   crops of the two photographs the demo holds out whole (chelsea,
                    flower): scenes never seen, a test of generalisation, not of dead codes.

Both sets are large on purpose: the demo's own 64 eval crops give 64 x 16 x 16 = 16384
vectors, with which even a perfectly uniform tokenizer hits only ~63% of 16384 codes.

To tell a codebook that misses codes from an eval set that cannot reach them, it also
prints what two photographs reach: the held-out pair against every pair of training
photographs (their held-out regions), all with the same number of crops per photograph.
A healthy codebook serves all 15 training photographs; no two of them use every code.

Everything is built with tokenizer.data's demo builder and reused when present.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Runs as a script from the repository root without installing the package.
sys.path.insert(0, str(ROOT))

from tokenizer.api import Tokenizer  # noqa: E402
from tokenizer.data.demo import build_demo_set  # noqa: E402
from tokenizer.data.stream import iter_eval_batches  # noqa: E402
from tokenizer.evaluation.evaluate import EvalResult, evaluate_shards  # noqa: E402
from tokenizer.training.export import export_release  # noqa: E402

RECIPES = {
    "plain": [
        "quantizer.init=random",
        "quantizer.restart_threshold=0",
        "quantizer.restart_unused_steps=0",
        "quantizer.l2_normalize=false",
        "quantizer.lookup_dim=0",
    ],
    "healthy": [
        "quantizer.init=kmeans",
        "quantizer.kmeans_iters=10",
        "quantizer.l2_normalize=true",
        "quantizer.lookup_dim=8",
        # Restart thresholds are set in main() from the vectors per step and K.
    ],
}


@dataclass
class PairUsage:
    """Codebook usage reached by two photographs, each with the same number of crops."""

    crops_per_photo: int
    held_out: float  # the held-out pair (chelsea + flower)
    train_median: float  # over every pair of training photographs (their held-out regions)
    train_best: float
    best_pair: tuple[str, str]


@dataclass
class Outcome:
    name: str
    train_s: float
    regions: EvalResult  # crops of the held-out quadrants of the training photographs
    photos: EvalResult  # crops of the held-out photographs
    train_usage: float  # codes chosen in the last `window` training steps
    restarts: int
    pairs: PairUsage


def restart_overrides(vectors_per_step: int, codebook_size: int) -> list[str]:
    """Both restart rules, scaled to the mean hits per code per step (0.5 at 16k codes
    and 8192 vectors per step): a code is restarted when no vector chose it in the
    steps that bring a uniformly used code ~10 hits, or when its EMA usage falls under
    a tenth of the uniform rate."""
    rate = vectors_per_step / codebook_size
    return [
        f"quantizer.restart_unused_steps={max(2, round(10 / rate))}",
        "quantizer.restart_threshold=0.1",  # a fraction of the uniform rate
    ]


def train(name: str, overrides: list[str], run_dir: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = run_dir / "train.log"
    started = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{name}: training failed (exit {done.returncode}); {log}:\n{tail}")
    return elapsed


def _codes_by_photo(tok: Tokenizer, shards: list[str], resolution: int) -> dict[str, list]:
    """Per photograph (the demo keys end in _<photo>), the code grid of each crop."""
    grids: dict[str, list] = defaultdict(list)
    for batch in iter_eval_batches(shards, resolution, batch_size=64):
        codes = tok.encode((batch.images + 1.0) / 2.0)  # (B, h, w)
        for key, grid in zip(batch.keys, codes, strict=True):
            grids[key.split("_", 1)[1]].append(grid)
    return grids


def pair_usage(tok: Tokenizer, photos: list[str], regions: list[str]) -> PairUsage:
    """How much of the codebook two photographs can reach at all: the held-out pair
    against every pair of training photographs, each photograph with as many crops as the
    sparsest one has (crop counts differ, and usage grows with them)."""
    resolution = tok.config.data.resolution
    held = _codes_by_photo(tok, photos, resolution)
    train = _codes_by_photo(tok, regions, resolution)
    n = min(len(v) for v in [*held.values(), *train.values()])

    def used(grids: list) -> set[int]:
        return set(torch.stack(grids[:n]).flatten().tolist())

    def pair(a: set[int], b: set[int]) -> float:
        return len(a | b) / tok.codebook_size

    held_sets = [used(g) for g in held.values()]
    train_sets = {name: used(g) for name, g in train.items()}
    scores = {
        (a, b): pair(train_sets[a], train_sets[b])
        for a, b in itertools.combinations(sorted(train_sets), 2)
    }
    best = max(scores, key=scores.get)
    return PairUsage(
        crops_per_photo=n,
        held_out=pair(*held_sets),
        train_median=statistics.median(scores.values()),
        train_best=scores[best],
        best_pair=best,
    )


def measure(
    name: str, run_dir: Path, regions: list[str], photos: list[str], window: int, seconds: float
) -> Outcome:
    release = export_release(run_dir, run_dir / "release").directory
    tok = Tokenizer.from_pretrained(release)
    resolution = tok.config.data.resolution
    stats = tok.model.quantizer.codebook_stats(window)
    return Outcome(
        name=name,
        train_s=seconds,
        regions=evaluate_shards(tok.model, regions, resolution, batch_size=64),
        photos=evaluate_shards(tok.model, photos, resolution, batch_size=64),
        train_usage=stats.usage,
        restarts=stats.restarts,
        pairs=pair_usage(tok, photos, regions),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps per recipe")
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-crops", type=int, default=4096, help="as the demo's")
    parser.add_argument("--eval-crops", type=int, default=2048, help="crops per eval set")
    parser.add_argument("--window", type=int, default=50, help="training usage window, steps")
    parser.add_argument("--seed", type=int, default=0, help="run.seed of both recipes")
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_codebook"))
    parser.add_argument("--only", choices=sorted(RECIPES), default=None)
    parser.add_argument(
        "--healthy",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for the healthy recipe (repeatable), e.g. quantizer.lookup_dim=4",
    )
    args = parser.parse_args(argv)
    out = Path(args.output)

    # Training crops and held-out regions come from one build; the held-out photographs'
    # build also writes a token 8 training crops, unused.
    regions = build_demo_set(
        out / "regions", train_crops=args.train_crops, eval_crops=args.eval_crops, split="regions"
    )
    photos = build_demo_set(out / "photos", train_crops=8, eval_crops=args.eval_crops)
    grid = 64 // 4  # the demo model: 64x64 crops, downsampling factor 4
    vectors_per_step = args.batch_size * grid * grid
    common = [
        f"quantizer.codebook_size={args.codebook_size}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.warmup_steps={max(1, args.steps // 10)}",
        "checkpoint.every=0",
        "logging.every=25",
        "logging.tensorboard=false",
        f"data.train_shards={regions.train_pattern}",
        f"run.seed={args.seed}",
        # Exact either way; faiss (when installed) only makes the 16k-code lookups faster.
        "quantizer.search=auto",
        "data.eval_shards=null",  # evaluation happens here, on the larger sets
        "resume=null",
    ]
    recipes = {
        "plain": RECIPES["plain"],
        "healthy": [
            *RECIPES["healthy"],
            *restart_overrides(vectors_per_step, args.codebook_size),
            *args.healthy,
        ],
    }
    vectors = args.eval_crops * grid * grid
    print(
        f"K = {args.codebook_size} codes; {args.steps} steps x batch {args.batch_size} "
        f"({vectors_per_step} vectors per step) per recipe; {os.cpu_count()} CPU cores"
    )
    print(
        f"eval sets: {args.eval_crops} crops each ({vectors} vectors, "
        f"{vectors / args.codebook_size:.0f} per code)\n"
        f"  held-out regions of the training photos: {regions.eval_pattern}\n"
        f"  held-out photos: {photos.eval_pattern}\n"
        f"  (the demo's own 64 eval crops give {64 * grid * grid} vectors: too few to reach "
        f"95% of {args.codebook_size} codes even with perfectly uniform use)"
    )
    outcomes = []
    for name, overrides in recipes.items():
        if args.only and name != args.only:
            continue
        run_dir = out / name
        print(f"{name}: {' '.join(overrides)}", flush=True)
        seconds = train(name, [*common, f"run.dir={run_dir}", *overrides], run_dir)
        outcomes.append(
            measure(name, run_dir, regions.eval_shards, photos.eval_shards, args.window, seconds)
        )

    print()
    print(
        f"{'':8} {'':>7} | {'held-out regions':^33} | {'held-out photos':^18} | "
        f"{'training':^19}\n"
        f"{'recipe':8} {'train s':>7} | {'codes':>6} {'usage':>7} {'ppl':>7} {'PSNR dB':>9} | "
        f"{'usage':>7} {'PSNR dB':>9} | {'usage':>8} {'restarts':>9}"
    )
    for o in outcomes:
        codes = round(o.regions.usage * args.codebook_size)
        print(
            f"{o.name:8} {o.train_s:7.0f} | {codes:6d} {100 * o.regions.usage:6.1f}% "
            f"{o.regions.perplexity:7.0f} {o.regions.psnr:9.2f} | "
            f"{100 * o.photos.usage:6.1f}% {o.photos.psnr:9.2f} | "
            f"{100 * o.train_usage:7.1f}% {o.restarts:9d}"
        )
    print(f"(training usage: codes chosen in the last {args.window} training steps)")
    print("\nwhat two photographs reach, at equal crops per photograph:")
    for o in outcomes:
        p = o.pairs
        print(
            f"  {o.name:8} {p.crops_per_photo} crops each: held-out pair "
            f"{100 * p.held_out:.1f}%; pairs of training photos (held-out regions): "
            f"median {100 * p.train_median:.1f}%, best {100 * p.train_best:.1f}% "
            f"({' + '.join(p.best_pair)})"
        )
    healthy = next((o for o in outcomes if o.name == "healthy"), None)
    if healthy is not None:
        verdict = "met" if healthy.regions.usage >= 0.95 else "NOT met"
        print(f"target >= 95% of codes used on held-out regions (healthy): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
