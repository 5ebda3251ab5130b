"""A code-frequency plot, drawn with PIL (no plotting library): every code of one grid's
codebook, sorted from most to least used, its share of the codes on a log scale. A flat
line is an evenly used codebook; a cliff, codes that collapsed."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

_WIDTH, _HEIGHT = 640, 360
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 28, 40
_INK, _GRID, _LINE = (0, 0, 0), (220, 220, 220), (31, 119, 180)


def usage_plot(counts: np.ndarray, title: str) -> Image.Image:
    """counts (K,): how often each code was chosen -> a 640x360 RGB plot."""
    counts = np.sort(np.asarray(counts, dtype=np.float64))[::-1]  # (K,) descending
    k, total = counts.size, counts.sum()
    used = int((counts > 0).sum())
    image = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((_LEFT, 8), f"{title}: {used} of {k} codes used", fill=_INK)
    x0, x1, y0, y1 = _LEFT, _WIDTH - _RIGHT, _TOP, _HEIGHT - _BOTTOM
    if used == 0:
        draw.text((x0, (y0 + y1) // 2), "no codes counted", fill=_INK)
        return image
    shares = counts[:used] / total
    # Decades from the rarest used share to the largest; at least one.
    top = math.ceil(math.log10(shares[0]) - 1e-9)
    bottom = min(math.floor(math.log10(shares[-1])), top - 1)

    def y_of(share: float) -> float:
        return y1 - (math.log10(share) - bottom) / (top - bottom) * (y1 - y0)

    def x_of(rank: float) -> float:
        return x0 + rank / max(k - 1, 1) * (x1 - x0)

    for decade in range(bottom, top + 1):
        y = y_of(10.0**decade)
        draw.line([(x0, y), (x1, y)], fill=_GRID)
        draw.text((4, y - 6), f"1e{decade}" if decade else "1", fill=_INK)
    # One point per pixel column (the most used code that falls in it): a codebook of
    # 262144 codes becomes a line of 560 points, not 262144 strokes.
    columns = np.minimum(((np.arange(used) / max(k - 1, 1)) * (x1 - x0)).astype(int), x1 - x0)
    firsts = np.flatnonzero(np.r_[True, columns[1:] != columns[:-1]])
    points = [(x_of(i), y_of(shares[i])) for i in firsts]
    if len(points) == 1:
        points.append((points[0][0] + 1, points[0][1]))
    draw.line(points, fill=_LINE, width=2)
    if used < k:  # where the unused codes start
        draw.line([(x_of(used), y0), (x_of(used), y1)], fill=(214, 39, 40))
    draw.rectangle([x0, y0, x1, y1], outline=_INK)
    draw.text((x0, y1 + 4), "0", fill=_INK)
    last = str(k - 1)
    draw.text((x1 - draw.textlength(last), y1 + 4), last, fill=_INK)
    axis = "codes, most used first; y: share of all codes chosen (log scale)"
    draw.text(((x0 + x1 - draw.textlength(axis)) / 2, y1 + 20), axis, fill=_INK)
    return image
