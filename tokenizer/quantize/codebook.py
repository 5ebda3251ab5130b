"""Codebook math as pure functions of tensors: no module state, no torch.distributed.

The quantizer (or a test) owns the state and the collectives; these functions only
compute, so the same update runs single-process and on many ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class EMAState:
    cluster_size: Tensor  # (K,) EMA of per-code counts, N_i
    embed_sum: Tensor  # (K, D) EMA of per-code sums of assigned vectors, m_i
    codebook: Tensor  # (K, D) e_i = m_i / N_i' (Laplace-smoothed N_i)


def l2_normalize_rows(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Rows of x (..., d) scaled to unit length; eps keeps a zero row finite."""
    return F.normalize(x, dim=-1, eps=eps)


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """How many times each code was chosen: (any shape) int64 -> (K,) float32."""
    return torch.bincount(indices.reshape(-1), minlength=codebook_size).float()  # (K,)


def code_sums(flat: Tensor, indices: Tensor, codebook_size: int) -> Tensor:
    """Sum of the vectors assigned to each code: flat (N, D), indices (N,) -> (K, D)."""
    sums = flat.new_zeros(codebook_size, flat.shape[1])  # (K, D)
    return sums.index_add_(0, indices, flat)


def ema_update(
    cluster_size: Tensor,
    embed_sum: Tensor,
    batch_counts: Tensor,
    batch_sums: Tensor,
    decay: float,
    epsilon: float,
    unit_norm: bool = False,
) -> EMAState:
    """One EMA codebook step (VQ-VAE paper, appendix A.1); returns new tensors.

    N_i <- g N_i + (1 - g) n_i;  m_i <- g m_i + (1 - g) sum_i;  e_i = m_i / N_i', with
    Laplace smoothing N_i' = (N_i + eps) / (n + K eps) * n, n = sum_i N_i, so that a
    code with N_i -> 0 does not divide by zero while the total mass n is kept.
    With `unit_norm` the codes are l2-normalised means (spherical k-means' update).
    """
    cluster_size = cluster_size * decay + batch_counts * (1.0 - decay)  # (K,)
    embed_sum = embed_sum * decay + batch_sums * (1.0 - decay)  # (K, D)
    n = cluster_size.sum()
    k = cluster_size.shape[0]
    smoothed = (cluster_size + epsilon) / (n + k * epsilon) * n  # (K,)
    codebook = embed_sum / smoothed.unsqueeze(1)  # (K, D)
    if unit_norm:
        codebook = l2_normalize_rows(codebook)
    return EMAState(cluster_size=cluster_size, embed_sum=embed_sum, codebook=codebook)


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code distribution: K when all codes are used evenly, 1 when
    one code takes everything (and 1 for all-zero counts)."""
    probs = counts.float() / counts.float().sum().clamp_min(1e-12)  # (K,)
    # xlogy treats 0 * log 0 as 0, so unused codes add nothing to the entropy.
    entropy = -torch.special.xlogy(probs, probs).sum()
    return entropy.exp()


def usage(counts: Tensor) -> Tensor:
    """Fraction of codes chosen at least once."""
    return (counts > 0).float().mean()


def window_usage(last_used: Tensor, step: int | Tensor, window: int) -> Tensor:
    """Fraction of codes chosen in the last `window` steps (step - window, step].

    last_used (K,) int64 holds the step at which each code was last chosen; steps count
    from 1, so 0 means never.
    """
    recent = (last_used > step - window) & (last_used > 0)  # (K,)
    return recent.float().mean()


def sample_rows(flat: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """`num` rows of flat (N, D) drawn at random: without replacement when N >= num."""
    n = flat.shape[0]
    if n >= num:
        picks = torch.randperm(n, generator=generator, device="cpu")[:num]
    else:
        picks = torch.randint(0, n, (num,), generator=generator, device="cpu")
    return flat[picks.to(flat.device)]  # (num, D)


def dead_codes(usage_ema: Tensor, threshold: float) -> Tensor:
    """Indices of codes whose EMA usage fell under threshold (both in units of the
    uniform rate, 1 = N / K hits per forward)."""
    return torch.nonzero(usage_ema < threshold).flatten()  # (num_dead,)


def idle_codes(last_used: Tensor, last_restart: Tensor, step: int | Tensor, steps: int) -> Tensor:
    """Indices of codes no vector chose in the `steps` steps since their last use or
    (re)start: last_used, last_restart (K,) int64 step numbers."""
    since = step - torch.maximum(last_used, last_restart)  # (K,)
    return torch.nonzero(since >= steps).flatten()  # (num_idle,)


def distinct_rows(x: Tensor, k: int, generator: torch.Generator, spherical: bool = False) -> Tensor:
    """K codes (K, d) from candidate vectors x (N, d), no two of them equal.

    With at least K distinct rows, K of them drawn without replacement; with fewer, every
    distinct row once plus jittered copies of them drawn at random: two equal codes
    would leave one of them unused by construction (the search picks the lower index).
    """
    unique = torch.unique(x.detach().float(), dim=0)  # (U, d), U <= N, sorted rows
    if unique.shape[0] >= k:
        return sample_rows(unique, k, generator)
    return _pad_with_noise(unique, k, generator, spherical)


def _pad_with_noise(x: Tensor, k: int, generator: torch.Generator, spherical: bool) -> Tensor:
    """x's N distinct rows then K - N jittered copies of rows drawn again: (K, d)."""
    extra = sample_rows(x, k - x.shape[0], generator)  # (K - N, d)
    # Jitter at a thousandth of the data's spread, or of its magnitude when every row is
    # one vector (spread 0): big enough that fp32 keeps the copies apart, small enough
    # that each copy stays next to its original.
    spread = x.std(correction=0)
    scale = 1e-3 * torch.maximum(spread, 1e-2 * x.abs().amax().clamp_min(1.0))
    noise = torch.randn(extra.shape, generator=generator).to(x.device) * scale
    centroids = torch.cat([x, extra + noise])  # (K, d)
    return l2_normalize_rows(centroids) if spherical else centroids
