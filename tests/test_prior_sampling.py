"""Temperature, top-k and top-p against a brute-force reading of their definitions; draws
reproducible with a generator and inside the kept set."""

from __future__ import annotations

import pytest
import torch

from tokenizer.priors.sampling import draw, filter_logits, sample_logits


def _kept_top_p(probs: list[float], p: float) -> set[int]:
    """The smallest most-likely-first prefix whose mass reaches p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=g, dtype=torch.float64) * 2
    out = filter_logits(logits, top_p=p)
    for row, filtered in zip(logits, out, strict=True):
        want = _kept_top_p(row.softmax(-1).tolist(), p)
        assert set(torch.isfinite(filtered).nonzero().flatten().tolist()) == want


def test_top_k_and_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept[0].tolist() == [False, True, True, False]
    assert kept[1].tolist() == [True, True, True, True]  # ties at the threshold stay
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        filter_logits(logits, temperature=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        filter_logits(logits, top_p=0.0)


def test_draws_are_reproducible_and_inside_the_kept_set():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    a = sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(2))
    b = sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, 5) and a.dtype == torch.int64 and torch.equal(a, b)
    allowed = torch.isfinite(filter_logits(logits, top_k=3))
    assert allowed.gather(-1, a[..., None]).all()
    # Frequencies follow the probabilities.
    probs = torch.tensor([0.1, 0.6, 0.3])
    codes = draw(probs.log().expand(20000, 3), torch.Generator().manual_seed(3))
    freq = torch.bincount(codes, minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
