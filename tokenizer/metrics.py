"""Reconstruction metrics (codebook usage and perplexity live in quantize/codebook.py)."""

from __future__ import annotations

import torch


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped: the range PSNR and saved images are measured in."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr_per_image(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] each -> (B,) PSNR in dB of the [0, 1]-range images."""
    mse = (to_unit_range(reference) - to_unit_range(reconstruction)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
