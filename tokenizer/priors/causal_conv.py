"""The gated PixelCNN's two causal convolutions (van den Oord et al. 2016), made causal by
padding and shifting rather than by masking weights: no weight is ever zeroed, so nothing
has to be re-zeroed after an optimizer step or a checkpoint load.

At output position (r, c) of a k x k layer, in raster order:
- VerticalConv reads rows r - k//2 .. r (the current row included) and columns
  c - k//2 .. c + k//2. Its features at row r depend on rows <= r only; `shift_down`
  moves them one row, so what the horizontal stack takes from them at row r depends on
  rows < r only.
- HorizontalConv reads row r, columns c - k//2 .. c - 1 (`include_current=False`, mask
  type A: the first layer, whose input holds the code at (r, c) itself) or c - k//2 .. c
  (type B: later layers, whose input at (r, c) already excludes that code).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def check_kernel_size(kernel_size: int) -> None:
    # Odd, so the vertical window is centred on the column; >= 3, so a type-A
    # horizontal window still holds a column.
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")


def shift_down(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H, W): row r holds input row r - 1; row 0 is zero."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


class VerticalConv(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W); output row r sees input rows r - k//2 .. r."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        check_kernel_size(kernel_size)
        self.half = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, (self.half + 1, kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        # Padding above and to both sides, never below: nothing comes from later rows.
        return self.conv(F.pad(x, (self.half, self.half, self.half, 0)))


class HorizontalConv(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W); output (r, c) sees row r, columns
    c - k//2 .. c - 1, and c itself when `include_current`."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, include_current: bool
    ) -> None:
        super().__init__()
        check_kernel_size(kernel_size)
        self.half = kernel_size // 2
        width = self.half + int(include_current)
        self.conv = nn.Conv2d(in_channels, out_channels, (1, width))

    def forward(self, x: Tensor) -> Tensor:
        # Padding on the left only. Without the current column the window is one narrower,
        # so the output has one extra column at the right: the one that would read (r, W).
        return self.conv(F.pad(x, (self.half, 0)))[..., : x.shape[-1]]
