"""The Fréchet distance from summed float64 statistics against scipy.linalg.sqrtm on the
same features (pytorch-fid's formula), and statistics summed in parts as ranks sum them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenizer.evaluation.fid import FeatureStats, frechet_distance, stats_distance


def scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance, written from its formula."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / dim**0.5
    return rng.normal(size=(n, dim)) @ mixing + shift  # (N, D), correlated


def _stats(x: np.ndarray) -> FeatureStats:
    stats = FeatureStats.zeros(x.shape[1])
    stats.add(torch.from_numpy(x).float())
    return stats


@pytest.mark.parametrize(("n", "dim"), [(200, 32), (500, 64)])
def test_distance_matches_scipy_sqrtm(n: int, dim: int) -> None:
    real, fake = _features(n, dim, 0), _features(n, dim, 1, shift=0.3)
    real, fake = (
        real.astype(np.float32).astype(np.float64),
        fake.astype(np.float32).astype(np.float64),
    )
    ours = stats_distance(_stats(real), _stats(fake))
    assert ours > 0
    assert ours == pytest.approx(scipy_fid(real, fake), rel=1e-9, abs=1e-9)


def test_fewer_images_than_features_still_matches_scipy() -> None:
    # Singular covariances (rank 19 of 32), as a small evaluation set gives with 2048-d
    # Inception features: scipy needs its jitter there; the symmetric route does not.
    real, fake = _features(20, 32, 2), _features(20, 32, 3, shift=0.1)
    real, fake = (
        real.astype(np.float32).astype(np.float64),
        fake.astype(np.float32).astype(np.float64),
    )
    assert stats_distance(_stats(real), _stats(fake)) == pytest.approx(
        scipy_fid(real, fake), rel=1e-6
    )


def test_identical_sets_are_at_distance_zero_and_covariance_is_numpy_s() -> None:
    x = _features(50, 16, 4)
    stats = _stats(x)
    cov = np.cov(x.astype(np.float32).astype(np.float64), rowvar=False)
    np.testing.assert_allclose(stats.covariance.numpy(), cov, rtol=1e-10, atol=1e-12)
    assert frechet_distance(stats.mean, stats.covariance, stats.mean, stats.covariance) == (
        pytest.approx(0.0, abs=1e-9)
    )


def test_statistics_summed_in_parts_equal_the_whole() -> None:
    x = torch.from_numpy(_features(30, 8, 5)).float()
    whole = FeatureStats.zeros(8)
    whole.add(x)
    parts = [FeatureStats.zeros(8) for _ in range(2)]
    parts[0].add(x[:17])
    parts[1].add(x[17:])  # unequal shares, as two ranks may hold

    # What an all-reduce over the two ranks gives, in the order reduced() asks for it.
    other = iter([parts[1].count, parts[1].total, parts[1].outer])
    summed = parts[0].reduced(lambda t: t + next(other))
    assert int(summed.count) == 30
    torch.testing.assert_close(summed.total, whole.total)
    torch.testing.assert_close(summed.outer, whole.outer)
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats.zeros(4).covariance
