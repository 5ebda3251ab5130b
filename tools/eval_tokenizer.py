r"""Evaluate a released tokenizer on held-out shards: PSNR, SSIM, codebook usage, perplexity.

    python tools/eval_tokenizer.py --tokenizer runs/demo/release \
        --shards 'data/demo/eval/{000000..000001}.tar' --grid runs/demo/reconstructions.png

--shards takes tar paths, brace patterns and globs ('data/mine-eval/*.tar'). A progress
bar on stderr counts images against the samples the tar headers list (read without
the images), with images/s and an ETA; --no-progress turns it off.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile

import torch
from tqdm import tqdm

from tokenizer.api import Tokenizer
from tokenizer.data.shard_specs import ShardSpecError, resolve_shards
from tokenizer.data.stream import iter_eval_batches
from tokenizer.data.tars import IMAGE_EXTENSIONS, split_name
from tokenizer.evaluation.evaluate import evaluate_shards
from tokenizer.evaluation.image_grid import save_image_grid


def count_samples(path: str) -> int:
    """Samples with an image field, from the tar headers alone (tarfile seeks past the
    data); a truncated tar counts what comes before the break."""
    keys: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                name = split_name(member.name) if member.isfile() else None
                if name is not None and name[1] in IMAGE_EXTENSIONS:
                    keys.add(name[0])
    except (tarfile.TarError, OSError):
        pass  # the evaluation itself reports the shard; the total is only a guide
    return len(keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="release directory")
    parser.add_argument(
        "--shards", required=True, nargs="+", help="tar paths, brace patterns or globs"
    )
    parser.add_argument("--resolution", type=int, default=0, help="default: the tokenizer's own")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grid", default=None, help="PNG: originals above their reconstructions")
    parser.add_argument("--grid-images", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)

    try:
        shards = resolve_shards(args.shards, "--shards", required=True)
    except ShardSpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tok = Tokenizer.from_pretrained(args.tokenizer, device=args.device)
    resolution = args.resolution or tok.config.data.resolution
    total = None if args.no_progress else sum(count_samples(s) for s in shards)
    with tqdm(
        total=total, unit="img", desc="eval", file=sys.stderr, disable=args.no_progress
    ) as bar:
        result = evaluate_shards(
            tok.model, shards, resolution, args.batch_size, args.device, on_batch=bar.update
        )
        if total is not None and bar.n != total:
            # Samples the headers list but that cannot be decoded (logged as warnings).
            bar.set_postfix_str(f"{total - bar.n} unreadable", refresh=False)
            bar.total = bar.n
    grids = "  ".join(
        f"{'' if len(result.grids) == 1 else f'{name} '}codebook usage: "
        f"{100 * g.usage:.1f}% of {g.codebook_size} codes  perplexity: {g.perplexity:.1f}"
        for name, g in result.grids.items()
    )
    print(
        f"held-out images: {result.num_images}  PSNR: {result.psnr:.2f} dB  "
        f"SSIM: {result.ssim:.4f}  {grids}"
    )
    # psnr, ssim, usage, perplexity, num_images; per grid `usage/<grid>` with several.
    print(json.dumps(result.metrics()))
    if args.grid:
        batch = next(iter(iter_eval_batches(shards, resolution, args.grid_images)))
        originals = (batch.images + 1.0) / 2.0  # [0, 1]
        recon = tok.decode_grids(tok.encode_grids(originals.to(args.device)))
        save_image_grid([batch.images, recon.cpu() * 2.0 - 1.0], args.grid)
        print(f"wrote {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
