r"""Evaluate a released tokenizer on held-out shards: PSNR, SSIM, codebook usage, perplexity.

    python tools/eval_tokenizer.py --tokenizer runs/demo/release \
        --shards 'data/demo/eval/{000000..000001}.tar' --grid runs/demo/reconstructions.png
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from tokenizer.api import Tokenizer
from tokenizer.data import check_shards_exist, expand_shards, iter_eval_batches
from tokenizer.evaluate import evaluate_shards
from tokenizer.imaging import save_image_grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="release directory")
    parser.add_argument("--shards", required=True, nargs="+", help="brace patterns or tar paths")
    parser.add_argument("--resolution", type=int, default=0, help="default: the tokenizer's own")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grid", default=None, help="PNG: originals above their reconstructions")
    parser.add_argument("--grid-images", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    tok = Tokenizer.from_pretrained(args.tokenizer, device=args.device)
    resolution = args.resolution or tok.config.data.resolution
    shards = expand_shards(args.shards)
    check_shards_exist(shards)
    result = evaluate_shards(tok.model, shards, resolution, args.batch_size, args.device)
    print(
        f"held-out images: {result.num_images}  PSNR: {result.psnr:.2f} dB  "
        f"SSIM: {result.ssim:.4f}  "
        f"codebook usage: {100 * result.usage:.1f}% of {tok.codebook_size} codes  "
        f"perplexity: {result.perplexity:.1f}"
    )
    print(json.dumps(asdict(result)))
    if args.grid:
        batch = next(iter(iter_eval_batches(shards, resolution, args.grid_images)))
        originals = (batch.images + 1.0) / 2.0  # [0, 1]
        recon = tok.decode(tok.encode(originals.to(args.device)))
        save_image_grid([batch.images, recon.cpu() * 2.0 - 1.0], args.grid)
        print(f"wrote {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
