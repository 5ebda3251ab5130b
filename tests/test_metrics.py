"""Reconstruction metrics against hand computations and scikit-image's reference SSIM."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tokenizer.evaluation.evaluate import evaluate
from tokenizer.evaluation.metrics import psnr_per_image, ssim_per_image


def _pair(noise: float, seed: int, size: tuple[int, int] = (32, 40)) -> tuple[torch.Tensor, ...]:
    """Smooth images (B, 3, H, W) in [-1, 1] and a noisy copy."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(3, 3, *size, generator=g) * 2 - 1, 3, 1, 1)
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


def test_psnr_by_hand() -> None:
    reference = torch.full((2, 3, 4, 4), -1.0)  # black in [0, 1]
    reconstruction = reference.clone()
    reconstruction[0] += 0.2  # every pixel off by 0.1 in [0, 1]: MSE 0.01 -> 20 dB
    psnr = psnr_per_image(reference, reconstruction)
    assert psnr[0].item() == pytest.approx(20.0, abs=1e-4)
    assert psnr[1].item() == pytest.approx(100.0)  # identical: capped, not infinite


@pytest.mark.parametrize("noise", [0.02, 0.2, 1.0])
def test_ssim_matches_scikit_image(noise: float) -> None:
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _pair(noise, seed=int(noise * 100))
    ours = ssim_per_image(x, y)  # (3,)
    for i in range(x.shape[0]):
        a = ((x[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        b = ((y[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        reference = metrics.structural_similarity(
            a,
            b,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=2,
        )
        assert ours[i].item() == pytest.approx(reference, abs=1e-6)


def test_ssim_of_identical_images_is_one_and_refuses_tiny_images() -> None:
    x, _ = _pair(0.0, seed=1)
    torch.testing.assert_close(ssim_per_image(x, x), torch.ones(3))
    with pytest.raises(ValueError, match="11x11"):
        ssim_per_image(x[..., :10, :], x[..., :10, :])


class _DimmingAutoencoder(torch.nn.Module):
    """Stands in for a VQVAE: reconstructions are the images dimmed, codes 0 and 2 used."""

    codebook_size = 4
    training = False

    def quantizers(self) -> dict[str, SimpleNamespace]:
        return {"tokens": SimpleNamespace(codebook_size=4)}

    def forward(self, images: torch.Tensor) -> SimpleNamespace:
        counts = torch.tensor([images.shape[0], 0.0, 1.0, 0.0])  # (K,)
        return SimpleNamespace(
            reconstruction=0.8 * images, grids={"tokens": SimpleNamespace(counts=counts)}
        )


def test_evaluate_averages_psnr_and_ssim_over_images_across_batches() -> None:
    x, _ = _pair(0.0, seed=2)
    result = evaluate(_DimmingAutoencoder(), [x[:1], x[1:]])  # the mean is per image
    assert result.num_images == 3
    assert result.psnr == pytest.approx(psnr_per_image(x, 0.8 * x).mean().item(), rel=1e-6)
    assert result.ssim == pytest.approx(ssim_per_image(x, 0.8 * x).mean().item(), rel=1e-6)
    assert result.usage == pytest.approx(0.5)  # 2 of 4 codes
    assert math.isfinite(result.perplexity)


def _skimage_pair(channels: int, size: tuple[int, int], seed: int):
    x, y = _pair(0.1, seed, size)  # (3, 3, H, W)
    return x[:, :channels], y[:, :channels]  # (3, C, H, W)


@pytest.mark.parametrize(
    ("channels", "size"),
    [(3, (11, 11)), (3, (16, 64)), (1, (23, 17)), (4, (40, 12)), (3, (64, 64))],
)
def test_psnr_and_ssim_match_scikit_image_at_several_sizes_and_channels(channels, size) -> None:
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _skimage_pair(channels, size, seed=channels * 100 + size[0])
    psnr, ssim = psnr_per_image(x, y), ssim_per_image(x, y)  # (3,) each
    for i in range(x.shape[0]):
        # The [0, 1] images both metrics are defined on, float64 as scikit-image takes them.
        a = ((x[i] + 1) / 2).clamp(0, 1).permute(1, 2, 0).double().numpy()
        b = ((y[i] + 1) / 2).clamp(0, 1).permute(1, 2, 0).double().numpy()
        expected_psnr = metrics.peak_signal_noise_ratio(a, b, data_range=1.0)
        expected_ssim = metrics.structural_similarity(
            a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0, channel_axis=2,
        )  # fmt: skip
        # PSNR is computed in float32 (its MSE of values rounded to float32 inputs).
        assert psnr[i].item() == pytest.approx(expected_psnr, abs=1e-4)
        assert ssim[i].item() == pytest.approx(expected_ssim, abs=1e-6)
