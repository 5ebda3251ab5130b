"""Reconstruction metrics, PSNR and SSIM (codebook usage and perplexity live in
quantize/codebook.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# SSIM as Wang et al. (2004) and their reference code define it, which
# skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
# use_sample_covariance=False, data_range=1) reproduces: an 11x11 Gaussian window of
# sigma 1.5, K1 = 0.01, K2 = 0.03 on [0, 1] images, averaged over the positions where
# the window fits inside the image, then over channels.
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # 3.5 sigma, as skimage truncates
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped: the range PSNR and saved images are measured in."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 0..255, rounded: the pixels a saved image holds."""
    return (to_unit_range(images) * 255.0).round().to(torch.uint8)


def psnr_per_image(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] each -> (B,) PSNR in dB of the [0, 1]-range images."""
    mse = (to_unit_range(reference) - to_unit_range(reconstruction)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(device: torch.device) -> torch.Tensor:
    offsets = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(offsets**2) / (2 * _SSIM_SIGMA**2))  # (11,)
    g = g / g.sum()
    return torch.outer(g, g)  # (11, 11), sums to 1


def ssim_per_image(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] each -> (B,) mean SSIM of the [0, 1]-range images
    (H and W at least 11), computed in float64 so that it matches the reference."""
    x = to_unit_range(reference).double()
    y = to_unit_range(reconstruction).double()
    b, c, h, w = x.shape
    size = 2 * _SSIM_RADIUS + 1
    if h < size or w < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {h}x{w}")
    window = _gaussian_window(x.device).expand(c, 1, size, size)  # (C, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        # Per channel, only where the window fits: (B, C, H, W) -> (B, C, H-10, W-10).
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    )  # (B, C, H-10, W-10)
    return ssim_map.flatten(1).mean(1).float()
