"""Codebook collapse: a warning, naming the grid, when a logging window's vectors chose only
a small part of the codes they could have reached.

The bar is relative to reach, not to K: a window of N vectors can use at most min(K, N)
codes, so a 1M-entry codebook logged every few steps is not called collapsed for touching
under 10% of its codes when it only saw 50k vectors. Healthy codebooks sit far above the
bar (N random draws over K codes reach K (1 - exp(-N / K)), 63% of min(K, N) at N = K);
a collapsed one sits far below, with a handful of codes taking every vector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# While a grid stays collapsed, the warning comes again every this many logging windows.
REPEAT_EVERY = 10


@dataclass
class Collapse:
    """One grid's window under the bar."""

    grid: str
    used: int  # codes chosen at least once in the window
    reach: int  # min(K, vectors in the window): the most codes the window could use
    codebook_size: int
    vectors: int


def find_collapse(grid: str, counts: torch.Tensor, threshold: float) -> Collapse | None:
    """counts (K,): the window's hits per code, summed over ranks. A Collapse when the codes
    used fall under `threshold` of the window's reach; None otherwise or when off (0)."""
    vectors = int(counts.sum().item())
    if threshold <= 0 or vectors == 0:
        return None
    reach = min(counts.numel(), vectors)
    used = int((counts > 0).sum().item())
    if used >= threshold * reach:
        return None
    return Collapse(grid, used, reach, counts.numel(), vectors)


def describe(step: int, collapse: Collapse, threshold: float, window_steps: int) -> str:
    c = collapse
    return (
        f"step {step}: codebook collapse on grid {c.grid!r}: {c.used} of {c.codebook_size} codes "
        f"chosen by the {c.vectors} vectors of the last {window_steps} steps, under "
        f"logging.collapse_usage={threshold:g} of the {c.reach} they could reach. Restarts "
        "(quantizer.restart_threshold, quantizer.restart_unused_steps), k-means init "
        "(quantizer.init=kmeans), a low-dimensional l2 lookup (quantizer.lookup_dim, "
        "quantizer.l2_normalize) or a lower train.lr keep codes alive"
    )


@dataclass
class CollapseWatch:
    """Which grids are collapsed, so that a long collapse warns at its start and every
    REPEAT_EVERY windows, not on every log line, and its end is said once."""

    threshold: float  # logging.collapse_usage; 0: off
    window_steps: int  # logging.every
    _windows: dict[str, int] = field(default_factory=dict)  # grid -> windows collapsed

    def check(self, step: int, counts: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """counts: grid -> (K,) window hits. Returns (warnings, recoveries) to log."""
        warnings: list[str] = []
        recoveries: list[str] = []
        for grid in sorted(counts):
            collapse = find_collapse(grid, counts[grid], self.threshold)
            if collapse is None:
                if self._windows.pop(grid, 0):
                    recoveries.append(f"step {step}: codebook of grid {grid!r} no longer collapsed")
                continue
            seen = self._windows.get(grid, 0)
            if seen % REPEAT_EVERY == 0:
                warnings.append(describe(step, collapse, self.threshold, self.window_steps))
            self._windows[grid] = seen + 1
        return warnings, recoveries

    def collapsed(self) -> list[str]:
        return sorted(self._windows)
