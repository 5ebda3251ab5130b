"""Reconstruction and codebook metrics. Callers reduce sums across ranks before dividing."""

from __future__ import annotations

import torch


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped: the range PSNR and saved images are measured in."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr_per_image(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] each -> (B,) PSNR in dB of the [0, 1]-range images."""
    mse = (to_unit_range(reference) - to_unit_range(reconstruction)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of codes hit at least once; counts (K,)."""
    return (counts > 0).float().mean().item()


def codebook_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code distribution: K when uniform, 1 when collapsed."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    probs = counts.float() / total
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return entropy.exp().item()
