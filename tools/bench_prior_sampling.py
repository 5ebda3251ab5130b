"""Benchmark the transformer prior's sampling with and without the key/value cache, beside
the gated PixelCNN's.

    python tools/bench_prior_sampling.py                     # 8 grids of 16x16, K=512, 4x128
    python tools/bench_prior_sampling.py --prefix 8 8        # a bottom prior on 8x8 top codes
    python tools/bench_prior_sampling.py --threads 1 --repeats 5

Both modes run in the same process on the same randomly initialised model (eval mode,
no_grad), interleaved repeat by repeat so that a noisy shared machine slows both alike,
each with a generator seeded the same: it prints the median samples/s of each, the
cached / uncached ratio, and whether the two drew the same codes (they should).
Uncached sampling recomputes the whole sequence at every one of the h*w steps; cached
sampling feeds one position a step and reuses every layer's keys and values. The gated
PixelCNN (--pixelcnn-dim, --pixelcnn-layers; 0 layers skips it) has no cache: each code is
one forward over the rows drawn so far; it is timed in the same loop on the same grids.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.priors.pixelcnn import GatedPixelCNN  # noqa: E402
from tokenizer.priors.transformer import TransformerPrior  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=8, help="grids drawn per call")
    parser.add_argument("--grid", type=int, nargs=2, default=[16, 16], metavar=("H", "W"))
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument(
        "--prefix", type=int, nargs=2, default=None, metavar=("H", "W"), help="a condition grid"
    )
    parser.add_argument("--pixelcnn-dim", type=int, default=64)
    parser.add_argument(
        "--pixelcnn-layers",
        type=int,
        default=15,
        help="0: no PixelCNN (15, dim 64: the bench_prior size)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per mode")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    prefix = tuple(args.prefix) if args.prefix else None
    model = TransformerPrior(
        args.codebook_size,
        tuple(args.grid),
        dim=args.dim,
        layers=args.layers,
        heads=args.heads,
        condition_codebook_size=args.codebook_size if prefix else 0,
        condition_shape=prefix,
    )
    model = model.to(device).eval()
    pixelcnn = None
    if args.pixelcnn_layers:
        # The PixelCNN's condition stack upsamples the coarser grid x2 (VQ-VAE-2's grids).
        if prefix and (args.grid[0] != 2 * prefix[0] or args.grid[1] != 2 * prefix[1]):
            raise SystemExit(
                "--prefix must be half of --grid for the PixelCNN (or --pixelcnn-layers 0)"
            )
        pixelcnn = GatedPixelCNN(
            args.codebook_size,
            dim=args.pixelcnn_dim,
            layers=args.pixelcnn_layers,
            condition_codebook_size=args.codebook_size if prefix else 0,
        )
        pixelcnn = pixelcnn.to(device).eval()
    condition = None
    if prefix:
        condition = torch.randint(0, args.codebook_size, (args.n, *prefix), device=device)

    def run(mode: str) -> tuple[float, torch.Tensor]:
        g = torch.Generator(device).manual_seed(args.seed)
        _sync(device)
        start = time.perf_counter()
        if mode == "pixelcnn":
            assert pixelcnn is not None
            codes = pixelcnn.sample(args.n, tuple(args.grid), condition=condition, generator=g)
        else:
            use_cache = mode == "cached"
            codes = model.sample(args.n, condition=condition, generator=g, use_cache=use_cache)
        _sync(device)
        return time.perf_counter() - start, codes

    h, w = args.grid
    params = sum(p.numel() for p in model.parameters())
    print(
        f"device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"n={args.n}, grid {h}x{w}, K={args.codebook_size}, {args.layers} layers, dim {args.dim}, "
        f"{args.heads} heads, prefix {'x'.join(map(str, prefix)) if prefix else 'none'}; "
        f"{params / 1e6:.2f}M parameters",
        flush=True,
    )
    modes = ["uncached", "cached"] + (["pixelcnn"] if pixelcnn is not None else [])
    if pixelcnn is not None:
        pixelcnn_params = sum(p.numel() for p in pixelcnn.parameters())
        print(
            f"PixelCNN: {args.pixelcnn_layers} layers, dim {args.pixelcnn_dim}; "
            f"{pixelcnn_params / 1e6:.2f}M parameters",
            flush=True,
        )
    for mode in modes[1:]:  # the slow uncached mode is not worth a warm-up call
        run(mode)  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    same = True
    for r in range(args.repeats):
        codes = {}
        for mode in modes:
            seconds, codes[mode] = run(mode)
            times[mode].append(seconds)
            print(f"  repeat {r}: {mode:<8} {seconds:8.3f} s")
        same = same and torch.equal(codes["uncached"], codes["cached"])
    rate = {mode: args.n / statistics.median(t) for mode, t in times.items()}
    for mode in modes:
        print(f"{mode + ':':<9} {rate[mode]:8.2f} samples/s (median of {args.repeats})")
    print(f"cached / uncached samples/s: {rate['cached'] / rate['uncached']:.1f}x")
    if pixelcnn is not None:
        print(f"pixelcnn / cached transformer samples/s: {rate['pixelcnn'] / rate['cached']:.2f}x")
    print(f"same codes in both transformer modes: {same}")


if __name__ == "__main__":
    main()
