"""Fréchet distance between two sets of features (Heusel et al. 2017), from statistics
that ranks sum: a count, the feature sums and the sums of outer products, in float64.

Sums reduce across ranks exactly as they add within one (up to float64 rounding), so N
processes give one process's distance without gathering any feature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class FeatureStats:
    count: torch.Tensor  # () float64: feature vectors added
    total: torch.Tensor  # (D,) float64: their sum
    outer: torch.Tensor  # (D, D) float64: the sum of x x^T

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str = "cpu") -> FeatureStats:
        f64 = {"dtype": torch.float64, "device": device}
        return cls(torch.zeros((), **f64), torch.zeros(dim, **f64), torch.zeros(dim, dim, **f64))

    def add(self, features: torch.Tensor) -> None:
        """features (N, D), any float dtype."""
        x = features.to(self.total.device, torch.float64)  # (N, D)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x  # (D, D)

    def reduced(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> FeatureStats:
        return FeatureStats(reduce_sum(self.count), reduce_sum(self.total), reduce_sum(self.outer))

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count  # (D,)

    @property
    def covariance(self) -> torch.Tensor:
        """(D, D), unbiased (N - 1), as numpy.cov and every FID implementation take it."""
        n = self.count
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {int(n)}")
        mean = self.mean
        return (self.outer - n * torch.outer(mean, mean)) / (n - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)  # symmetric: real eigenpairs
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(
    mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is taken as tr((R S2 R)^(1/2)) with R = S1^(1/2): the same
    eigenvalues, but of a symmetric positive semi-definite matrix, so no complex parts
    and no failure when the covariances are singular (fewer images than features),
    where scipy's sqrtm of S1 S2 needs pytorch-fid's jitter."""
    m1, m2 = mean1.double(), mean2.double()
    s1, s2 = cov1.double(), cov2.double()
    root = _sqrt_psd(s1)
    inner = root @ s2 @ root
    inner = (inner + inner.T) / 2  # symmetric up to rounding; eigvalsh wants it exactly
    trace_sqrt = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * trace_sqrt)


def stats_distance(real: FeatureStats, fake: FeatureStats) -> float:
    return frechet_distance(real.mean, real.covariance, fake.mean, fake.covariance)
