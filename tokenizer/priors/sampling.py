"""Drawing codes from a prior's logits: temperature, top-k and top-p (nucleus) filtering,
then one multinomial draw per position, reproducible with a torch.Generator."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """(..., K) logits -> (..., K) logits with the excluded codes at -inf.

    temperature > 0 divides the logits; top_k keeps the k most likely codes; top_p keeps
    the smallest set of most likely codes whose probability reaches p (the most likely
    code always stays). Ties at the top-k threshold are all kept.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., K)
        probs = sorted_logits.softmax(dim=-1)
        # A code is dropped when the codes before it already reach top_p.
        before = probs.cumsum(dim=-1) - probs  # (..., K)
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(..., K) filtered logits -> (...) int64 codes, one multinomial draw each."""
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])  # (N, K)
    codes = torch.multinomial(flat, 1, generator=generator)  # (N, 1)
    return codes.reshape(probs.shape[:-1])


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(..., K) raw logits -> (...) int64 codes: filter_logits, then draw."""
    return draw(filter_logits(logits, temperature, top_k, top_p), generator)
