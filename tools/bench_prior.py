r"""Held-out bits per code of our gated PixelCNN prior, trained on index shards, beside the
unigram and uniform baselines and (with --reference) a public gated PixelCNN trained the
same way in the same run.

    python tools/bench_prior.py --train-index codes/demo_train --eval-index codes/demo_eval
    python tools/bench_prior.py --train-index ... --eval-index ... \\
        --reference ../pytorch-vqvae/modules.py      # ritheshkumar95/pytorch-vqvae

Both priors see the same batches in the same order (batch --batch, --steps Adam steps at
--lr, no schedule, as that repository's pixelcnn_prior.py trains) at the size of
--dim / --layers (its defaults: dim 64, 15 layers). Its GatedPixelCNN is class-conditioned:
it gets class 0 for every grid (an index has no labels). Bring the checkout: its
modules.py imports functions.py beside it. One grid (a single-grid tokenizer's index).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizer.data.index.reader import IndexShards  # noqa: E402
from tokenizer.priors.pixelcnn import GatedPixelCNN  # noqa: E402


def _codes(index: str) -> tuple[torch.Tensor, int]:
    """Every sample's codes (N, h, w) int64 of a one-grid index, and its K."""
    data = IndexShards(index, rank=0, world_size=1)
    if len(data.grid_names) != 1:
        raise SystemExit(f"{index}: grids {data.grid_names}; this bench takes one grid")
    data.set_epoch(0)
    codes = np.stack([s.tokens for s in data]).astype(np.int64)
    return torch.from_numpy(codes), data.manifest.grids[0].codebook_size


def _reference(path: Path, k: int, dim: int, layers: int) -> torch.nn.Module:
    sys.path.insert(0, str(path.parent))  # its modules.py imports functions.py
    spec = importlib.util.spec_from_file_location("reference_modules", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--reference {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GatedPixelCNN(k, dim, layers, n_classes=1)


class _Ours(torch.nn.Module):
    def __init__(self, k: int, dim: int, layers: int, kernel: int) -> None:
        super().__init__()
        self.prior = GatedPixelCNN(k, dim=dim, layers=layers, kernel_size=kernel)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.prior(codes)  # (B, K, h, w)


class _Theirs(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        labels = torch.zeros(codes.shape[0], dtype=torch.int64, device=codes.device)
        return self.model(codes, labels)  # (B, K, h, w)


def _train_and_score(
    model: torch.nn.Module,
    train: torch.Tensor,
    held_out: torch.Tensor,
    args: argparse.Namespace,
    seed: int,
) -> tuple[float, float]:
    """(held-out bits per code, seconds per training step)."""
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    perm, at = torch.randperm(len(train), generator=order), 0
    start = time.perf_counter()
    for _ in range(args.steps):
        if at + args.batch > len(perm):
            perm, at = torch.randperm(len(train), generator=order), 0
        batch = train[perm[at : at + args.batch]]
        at += args.batch
        loss = F.cross_entropy(model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = (time.perf_counter() - start) / args.steps
    model.eval()
    nats, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held_out), 64):
            batch = held_out[i : i + 64]
            nats += F.cross_entropy(model(batch), batch, reduction="sum").item()
            count += batch.numel()
    return nats / count / math.log(2), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-index", required=True)
    parser.add_argument("--eval-index", required=True)
    parser.add_argument("--reference", type=Path, default=None, help="pytorch-vqvae's modules.py")
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--kernel", type=int, default=7, help="our stacks' kernel size")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="one run per seed: init and batch order"
    )
    args = parser.parse_args(argv)
    if args.reference is not None and not args.reference.is_file():
        parser.error(f"--reference {args.reference}: no such file")

    train, k = _codes(args.train_index)
    held_out, k_eval = _codes(args.eval_index)
    if k_eval != k:
        parser.error(f"the indexes have K={k} and K={k_eval}: not one tokenizer's codes")
    counts = torch.bincount(train.flatten(), minlength=k).double() + 1  # add-one smoothing
    unigram = -(counts / counts.sum()).log2()[held_out.flatten()].mean().item()
    print(
        f"{len(train)} training and {len(held_out)} held-out grids of {tuple(train.shape[1:])} "
        f"codes, K={k}; {args.steps} steps at batch {args.batch}, Adam {args.lr}"
    )
    print(f"{'model':>10} {'params':>11} {'bits/code':>10} {'s/step':>8}")
    print(f"{'uniform':>10} {'':>11} {math.log2(k):>10.3f}")
    print(f"{'unigram':>10} {'':>11} {unigram:>10.3f}")
    builders = {"ours": lambda: _Ours(k, args.dim, args.layers, args.kernel)}
    if args.reference is not None:
        builders["reference"] = lambda: _Theirs(
            _reference(args.reference, k, args.dim, args.layers)
        )
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in builders}
    for seed in args.seeds:
        for name, build in builders.items():
            torch.manual_seed(seed)  # the same seed draws both models' initial weights
            model = build()
            bits, seconds = _train_and_score(model, train, held_out, args, seed)
            params = sum(p.numel() for p in model.parameters())
            results[name].append((bits, seconds))
            print(
                f"{name:>10} {params:>11,} {bits:>10.3f} {seconds:>8.3f}  seed {seed}", flush=True
            )
    for name, runs in results.items():
        bits = np.array([b for b, _ in runs])
        spread = f" +- {bits.std(ddof=1):.3f} (sd)" if len(bits) > 1 else ""
        print(f"{name:>10} mean {bits.mean():.3f}{spread} bits per code over {len(bits)} seeds")
    if "reference" in results:
        pairs = list(zip(results["ours"], results["reference"], strict=True))
        diffs = np.array([ours[0] - theirs[0] for ours, theirs in pairs])
        times = np.mean([ours[1] / theirs[1] for ours, theirs in pairs])
        print(
            f"ours - reference: {diffs.mean():+.3f} bits per code (per seed: "
            f"{', '.join(f'{d:+.3f}' for d in diffs)}); time ours / reference {times:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
