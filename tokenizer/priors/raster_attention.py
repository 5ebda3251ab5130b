"""Causal multi-head self-attention over a feature grid's raster positions, with a fixed
2D positional signal: the VQ-VAE-2 paper's attention in its top prior."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def positional_signal(height: int, width: int, dim: int, like: Tensor) -> Tensor:
    """(H * W, dim) fixed 2D sinusoids, raster order: a quarter of the channels each for
    sin and cos of the row and of the column; channels past 4 * (dim // 4) are zero.
    Fixed rather than learned, so any grid shape works (the sampler's cropped grids)."""
    n = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(n, device=like.device) / max(n, 1))

    def waves(length: int) -> Tensor:
        angles = torch.arange(length, device=like.device)[:, None] * freqs  # (L, n)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (L, 2n)

    rows = waves(height)[:, None].expand(height, width, 2 * n)
    cols = waves(width)[None].expand(height, width, 2 * n)
    signal = F.pad(torch.cat([rows, cols], dim=-1), (0, dim - 4 * n))  # (H, W, dim)
    return signal.reshape(height * width, dim).to(like.dtype)


class CausalSelfAttention(nn.Module):
    """h -> (h + update, update), (B, dim, H, W): multi-head self-attention over raster
    positions, position i attending to j <= i. Causal because the horizontal features at j
    already depend only on the codes before j, and j <= i."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention_heads ({heads}) must divide dim ({dim})")
        self.heads = heads
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        b, dim, height, width = h.shape
        seq = h.flatten(2).transpose(1, 2)  # (B, HW, dim)
        x = self.norm(seq) + positional_signal(height, width, dim, seq)
        qkv = self.qkv(x).view(b, height * width, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, HW, dim / heads)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        a = a.transpose(1, 2).reshape(b, height * width, dim)  # (B, HW, dim)
        update = self.out(a).transpose(1, 2).reshape(b, dim, height, width)
        return h + update, update
