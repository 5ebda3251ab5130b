r"""Sample code grids from a trained prior, decode them with its tokenizer, save a PNG grid.

python tools/sample_prior.py --prior runs/demo_prior --tokenizer runs/demo/release \\
    --n 16 --out samples.png [--temperature 1.0 --top-k 0 --top-p 1.0 --seed 0]

With several grids (VQ-VAE-2) the top grid is sampled first, then each grid below given
the one above it. A class-conditional prior (prior.num_classes) draws the classes --label
gives (repeat it), or 0, 1, ... in turn. The tokenizer must be the one whose codes the prior learnt (the index's
fingerprint, kept in the run's prior.json); another is refused.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokenizer.api import Tokenizer
from tokenizer.evaluation.image_grid import save_image_grid
from tokenizer.training.prior_run import load_prior_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prior", required=True, help="the prior's run directory or release (export_prior.py)"
    )
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: newest)")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer's release directory")
    parser.add_argument("--n", type=int, default=16, help="samples")
    parser.add_argument("--out", default="samples.png", help="PNG grid of the decoded samples")
    parser.add_argument(
        "--codes", default=None, help="also save the codes (.npz, one array a grid)"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--top-k", type=int, default=0, help="keep the k most likely codes (0: all)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1: all)")
    parser.add_argument(
        "--label",
        type=int,
        action="append",
        default=None,
        help="a class-conditional prior's class (repeat for several, cycled over the "
        "samples; default: classes 0, 1, ... in turn)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")

    run = load_prior_run(args.prior, args.checkpoint, device=args.device)
    tok = Tokenizer.from_pretrained(args.tokenizer, device=args.device)
    if tok.fingerprint != run.tokenizer_sha256:
        print(
            f"error: {args.tokenizer} is tokenizer {tok.fingerprint[:12]}..., but the prior in "
            f"{args.prior} learnt the codes of {run.tokenizer_sha256[:12]}...",
            file=sys.stderr,
        )
        return 2
    num_classes = next(iter(run.model.priors.values())).num_classes
    if args.label and not num_classes:
        parser.error(f"--label: the prior in {args.prior} is not class-conditional")
    bad = [c for c in args.label or [] if not 0 <= c < num_classes]
    if bad:
        parser.error(f"--label {bad[0]}: the prior knows classes 0 to {num_classes - 1}")
    labels = None
    if num_classes:
        classes = torch.tensor(args.label or list(range(num_classes)), device=args.device)
        labels = classes[torch.arange(args.n, device=args.device) % len(classes)]  # (n,)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    codes = run.model.sample(
        args.n,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p if args.top_p < 1.0 else None,
        generator=generator,
        class_labels=labels,
    )
    seconds = time.perf_counter() - start
    images = tok.decode_grids(codes)  # (n, 3, H, W) in [0, 1]
    per_row = max(1, round(math.sqrt(args.n)))
    rows = [images[i : i + per_row] * 2 - 1 for i in range(0, args.n, per_row)]
    if rows[-1].shape[0] < per_row:  # pad the last row with black
        pad = torch.full_like(rows[0][: per_row - rows[-1].shape[0]], -1.0)
        rows[-1] = torch.cat([rows[-1], pad])
    out = save_image_grid(rows, Path(args.out))
    if args.codes:
        np.savez(args.codes, **{name: c.cpu().numpy() for name, c in codes.items()})
    shapes = ", ".join(f"{n} {tuple(c.shape[1:])}" for n, c in codes.items())
    print(
        f"wrote {out}: {args.n} samples ({shapes}) from {run.checkpoint} in {seconds:.1f} s "
        f"({args.n / seconds:.2f} samples/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
