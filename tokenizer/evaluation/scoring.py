"""Score a tokenizer image by image over held-out shards, on one rank or many: per-image
PSNR, SSIM and LPIPS by key, codebook counts per grid, FID statistics, the worst images,
and for a tokenizer of several grids what each grid carries (the PSNR with its codes
replaced by random ones).

Ranks read their share of the shards as evaluate_shards splits them. Nothing collective
runs while they read (the release model's forward is local), so unequal shares need no
lockstep: ranks meet once at the end, where counts and FID statistics are summed and
the per-image records gathered and sorted by key. Every rank returns the same result,
and one process returns what N do: the same keys, counts and skipped samples, and the
same per-image values wherever an image meets the same batch neighbours (a convolution
may round differently at another batch size: then they agree to float32 rounding);
means and FID agree up to the order of float64 sums.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from tokenizer.evaluation.fid import FeatureStats, stats_distance
from tokenizer.evaluation.metrics import psnr_per_image, ssim_per_image, to_uint8
from tokenizer.evaluation.networks import InceptionFeatures
from tokenizer.evaluation.reader import BadSample, KeyedBatch
from tokenizer.losses.perceptual import LPIPS
from tokenizer.models.base import TokenizerModel, quantizer_modules


@dataclass
class ImageScore:
    key: str
    psnr: float  # dB, of the [0, 1] images
    ssim: float
    lpips: float | None = None  # None when no LPIPS weights were given
    # Several grids only: grid -> PSNR of the decoding with that grid's codes replaced by
    # random ones and the other grids' kept (how much of the image the grid carries).
    random_codes_psnr: dict[str, float] = field(default_factory=dict)


@dataclass
class WorstImage:
    key: str
    psnr: float
    original: torch.Tensor  # (3, R, R) uint8
    reconstruction: torch.Tensor  # (3, R, R) uint8


@dataclass
class Collectives:
    """How ranks meet: sum a tensor over ranks, gather any picklable object from all."""

    reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    gather: Callable[[object], list[object]]

    @classmethod
    def local(cls) -> Collectives:
        return cls(lambda t: t, lambda obj: [obj])


@dataclass
class Scores:
    images: list[ImageScore]  # sorted by key
    bad: list[BadSample]  # samples that could not be used, sorted by (shard, key)
    tar_errors: int  # broken tars met (each logged with its shard)
    counts: dict[str, torch.Tensor]  # grid -> (K,) int64: codes chosen over every image
    worst: list[WorstImage]  # lowest PSNR first (ties by key)
    rfid: float | None = None
    fid_features: int | None = None  # D of the Inception features

    def mean(self, name: str) -> float | None:
        values = [getattr(s, name) for s in self.images]
        if not values or values[0] is None:
            return None
        return sum(values) / len(values)


def random_grid_codes(key: str, grid: str, shape: tuple[int, int], k: int) -> torch.Tensor:
    """(h, w) int64 codes uniform in [0, K), drawn from a seed derived from the image's key
    and the grid's name: the same on any rank, at any batch size."""
    seed = int.from_bytes(hashlib.sha256(f"{grid}\0{key}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed >> 1)  # manual_seed takes < 2**63
    return torch.randint(0, k, shape, generator=generator)


def _random_codes_psnr(
    model: TokenizerModel,
    x: torch.Tensor,
    codes: dict[str, torch.Tensor],
    sizes: dict[str, int],
    keys: list[str],
) -> dict[str, list[float]]:
    """Grid -> per-image PSNR with that grid's codes (B, h, w) replaced by random ones in
    [0, sizes[grid]); {} for a model of one grid (random codes there say nothing about
    the model)."""
    if len(codes) < 2:
        return {}
    result = {}
    for name, grid in codes.items():
        shape = (grid.shape[1], grid.shape[2])
        random = [random_grid_codes(key, name, shape, sizes[name]) for key in keys]
        recon = model.decode_codes({**codes, name: torch.stack(random).to(grid.device)})
        result[name] = psnr_per_image(x, recon.float().clamp(-1.0, 1.0)).tolist()
    return result


def _keep_worst(kept: list[WorstImage], new: list[WorstImage], limit: int) -> list[WorstImage]:
    return sorted(kept + new, key=lambda w: (w.psnr, w.key))[:limit]


@torch.no_grad()
def score_batches(
    model: TokenizerModel,
    batches: Iterable[KeyedBatch],
    device: torch.device | str = "cpu",
    lpips: LPIPS | None = None,
    inception: InceptionFeatures | None = None,
    collectives: Collectives | None = None,
    worst: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> Scores:
    """Score this rank's `batches`; returns everyone's Scores on every rank."""
    collectives = collectives or Collectives.local()
    was_training = model.training
    model.eval()
    sizes = {name: q.codebook_size for name, q in quantizer_modules(model).items()}
    counts = {n: torch.zeros(k, dtype=torch.int64, device=device) for n, k in sizes.items()}
    images: list[ImageScore] = []
    bad: list[BadSample] = []
    tar_errors = 0
    kept: list[WorstImage] = []
    real: FeatureStats | None = None
    fake: FeatureStats | None = None
    for batch in batches:
        bad += batch.bad
        tar_errors += batch.tar_errors
        if not batch.keys:
            continue
        x = batch.images.to(device)  # (B, 3, R, R) in [-1, 1]
        out = model(x)
        recon = out.reconstruction.float().clamp(-1.0, 1.0)  # (B, 3, R, R): what decode gives
        psnr = psnr_per_image(x, recon).tolist()
        ssim = ssim_per_image(x, recon).tolist()
        distances = lpips(x, recon).tolist() if lpips is not None else [None] * len(psnr)
        codes = {name: g.indices for name, g in out.grids.items()}  # (B, h, w) each
        randomised = _random_codes_psnr(model, x, codes, sizes, batch.keys)
        for i, (key, p, s, d) in enumerate(zip(batch.keys, psnr, ssim, distances, strict=True)):
            images.append(ImageScore(key, p, s, d, {n: v[i] for n, v in randomised.items()}))
        for name in counts:
            # Per batch in int64: float32 sums stop counting exactly past 2^24 codes.
            counts[name] += out.grids[name].counts.round().to(torch.int64)
        originals, recons = to_uint8(x), to_uint8(recon)  # (B, 3, R, R) uint8
        if inception is not None:
            real_f, fake_f = inception(originals), inception(recons)  # (B, D) each
            if real is None:
                real = FeatureStats.zeros(real_f.shape[1], device)
                fake = FeatureStats.zeros(real_f.shape[1], device)
            real.add(real_f)
            fake.add(fake_f)
        candidates = [
            WorstImage(key, p, originals[i].cpu(), recons[i].cpu())
            for i, (key, p) in enumerate(zip(batch.keys, psnr, strict=True))
        ]
        kept = _keep_worst(kept, candidates, worst)
        if on_batch is not None:
            on_batch(len(batch.keys))
    model.train(was_training)
    return _merge(
        images, bad, tar_errors, counts, kept, real, fake, inception, collectives, worst, device
    )


def _merge(
    images: list[ImageScore],
    bad: list[BadSample],
    tar_errors: int,
    counts: dict[str, torch.Tensor],
    kept: list[WorstImage],
    real: FeatureStats | None,
    fake: FeatureStats | None,
    inception: InceptionFeatures | None,
    collectives: Collectives,
    worst: int,
    device: torch.device | str,
) -> Scores:
    counts = {name: collectives.reduce_sum(c).cpu() for name, c in counts.items()}
    parts = collectives.gather((images, bad, tar_errors, kept))
    all_images = sorted((s for p in parts for s in p[0]), key=lambda s: s.key)
    all_bad = sorted((b for p in parts for b in p[1]), key=lambda b: (b.shard, b.key))
    all_worst = _keep_worst([], [w for p in parts for w in p[3]], worst)
    scores = Scores(all_images, all_bad, sum(p[2] for p in parts), counts, all_worst)
    if inception is not None:
        # A rank without images has no statistics yet; every rank must join the sums.
        dims = collectives.gather(None if real is None else real.total.shape[0])
        dim = next((d for d in dims if d is not None), None)
        if dim is not None:
            real = real or FeatureStats.zeros(dim, device)
            fake = fake or FeatureStats.zeros(dim, device)
            real, fake = real.reduced(collectives.reduce_sum), fake.reduced(collectives.reduce_sum)
            scores.fid_features = dim
            if int(real.count.item()) >= 2:
                scores.rfid = stats_distance(real, fake)
    return scores
