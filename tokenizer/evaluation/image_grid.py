"""Image grids for logs and the demo: tensors in [-1, 1] to PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenizer.evaluation.metrics import to_unit_range


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> Image.Image:
    """Each row a (B, 3, H, W) batch in [-1, 1] of equal shape -> one PIL image."""
    batch, _, height, width = rows[0].shape
    grid = np.full(
        (len(rows) * (height + pad) + pad, batch * (width + pad) + pad, 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(rows):
        pixels = (to_unit_range(row.detach().cpu()) * 255.0).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
        for c in range(batch):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[top : top + height, left : left + width] = pixels[c]
    return Image.fromarray(grid)


def save_image_grid(rows: list[torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(path)
    return path
