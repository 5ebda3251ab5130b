"""The VQGAN encoder and decoder (Esser et al. 2021, taming-transformers; the same network
as LlamaGen's VQ-16 / VQ-8): residual blocks of GroupNorm + SiLU + 3x3 convs, single-head
self-attention at chosen feature resolutions and in the middle, stride-2 convs down and
nearest-neighbour x2 + conv up.

Module names follow LlamaGen's (conv_in, conv_blocks[i].res / .attn / .downsample, mid,
norm_out, conv_out) so that its checkpoints map onto these modules key for key.

With `grad_checkpointing`, each resolution level's blocks, the mid block and the output
head are recomputed in the backward pass instead of keeping their activations
(torch.utils.checkpoint, non-reentrant), only while training with gradients on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# taming / LlamaGen normalise with GroupNorm(32 groups, eps 1e-6).
NORM_GROUPS = 32
MIN_CHANNELS_PER_GROUP = 4
NORM_EPS = 1e-6


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) as in taming, whose widths are 128 and up (4+ channels a group).
    Narrower models (demos, tests) keep 4 channels a group where the width allows: with
    one channel a group GroupNorm is an instance norm, which takes every channel's mean
    over the image away at each block, and a narrow VQGAN then learns colour very late."""
    groups = math.gcd(NORM_GROUPS, max(1, channels // MIN_CHANNELS_PER_GROUP))
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(dropout(silu(norm(conv(silu(norm(x))))))); a 1x1 conv on the skip path
    when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # taming's name for the 1x1 skip projection ("network in network").
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)  # (B, C_out, H, W)
        return skip + h


class AttnBlock(nn.Module):
    """x + proj(attention(norm(x))): single-head self-attention over the h*w positions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = norm(channels)
        # Separate q, k, v 1x1 convs (not one fused conv): the checkpoints of taming and
        # LlamaGen keep them apart, and their weights then load as they are.
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)  # (B, C, H, W)

        def tokens(conv: nn.Conv2d) -> Tensor:
            # (B, C, H, W) -> (B, 1 head, H*W, C)
            return conv(normed).reshape(b, 1, c, h * w).transpose(2, 3)

        # Scaled by 1/sqrt(C) like taming; a fused kernel (flash / memory-efficient on GPU)
        # never materialises the (H*W)^2 weights, which at 64x64 positions is 64 MB a head.
        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        out = out.transpose(2, 3).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2) by a stride-2 3x3 conv. Padded by one on the right
    and bottom only, as taming does (torch's conv padding is symmetric), so that checkpoints
    trained there give the same features here."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution level: residual blocks, each followed by attention where the level
    attends, then the resampling ("downsample" or "upsample", also the attribute's name,
    as in LlamaGen) unless it is the last level."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        attend: bool,
        dropout: float,
        resample: str | None,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.res = nn.ModuleList(
            ResnetBlock(c_in, c_out, dropout)
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.attn = nn.ModuleList(
            AttnBlock(out_channels) for _ in range(num_blocks if attend else 0)
        )
        self.resample = resample
        if resample == "downsample":
            self.downsample = Downsample(out_channels)
        elif resample == "upsample":
            self.upsample = Upsample(out_channels)
        elif resample is not None:
            raise ValueError(f"resample must be 'downsample', 'upsample' or None, got {resample!r}")

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            x = block(x)  # (B, C_out, H, W)
            if len(self.attn):
                x = self.attn[i](x)  # (B, C_out, H, W)
        if self.resample == "downsample":
            x = self.downsample(x)  # (B, C_out, H/2, W/2)
        elif self.resample == "upsample":
            x = self.upsample(x)  # (B, C_out, 2H, 2W)
        return x


def mid_block(channels: int, dropout: float) -> nn.Sequential:
    """ResnetBlock, AttnBlock, ResnetBlock at the coarsest resolution."""
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout),
        AttnBlock(channels),
        ResnetBlock(channels, channels, dropout),
    )


def level_resolutions(resolution: int, num_levels: int) -> list[int]:
    """Feature resolution of each level for `resolution`-pixel inputs, finest first."""
    return [resolution // 2**i for i in range(num_levels)]


class _Checkpointed(nn.Module):
    """Runs its stages one by one, each under torch.utils.checkpoint while training with
    gradients on and `grad_checkpointing` is set. Both networks end in the same head."""

    grad_checkpointing: bool
    norm_out: nn.GroupNorm
    conv_out: nn.Conv2d

    def _run(self, stage: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant: works with DDP, autograd.grad (the adaptive GAN weight) and
            # inputs that need no grad; the RNG state is replayed, so dropout matches.
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def _head(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, C_out, H, W)


class Encoder(_Checkpointed):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f), f = 2 ** (len(ch_mult) - 1).

    conv_in to `ch`; one level per entry of ch_mult at width ch * mult, every level but
    the last ending in a Downsample; the mid block; the head into z_channels. Attention
    follows each residual block of the levels whose feature resolution (at `resolution`
    pixels in) is in attn_resolutions.
    """

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        resolution: int,
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not ch_mult:
            raise ValueError("Encoder needs at least one entry in ch_mult")
        self.grad_checkpointing = grad_checkpointing
        n = len(ch_mult)
        resolutions = level_resolutions(resolution, n)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]  # level i maps widths[i] -> widths[i + 1]
        self.conv_blocks = nn.ModuleList(
            Level(
                widths[i],
                widths[i + 1],
                num_res_blocks,
                attend=resolutions[i] in attn_resolutions,
                dropout=dropout,
                resample="downsample" if i < n - 1 else None,
            )
            for i in range(n)
        )
        self.mid = mid_block(widths[-1], dropout)
        self.norm_out = norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.conv_blocks:
            h = self._run(level, h)  # (B, ch * mult, H / 2**(i+1), ...) after level i
        h = self._run(self.mid, h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self._run(self._head, h)  # (B, z_channels, H/f, W/f)


class Decoder(_Checkpointed):
    """(B, z_channels, h, w) -> (B, out_channels, h*f, w*f): the encoder's mirror.

    conv_in to ch * ch_mult[-1]; the mid block; one level per entry of reversed(ch_mult)
    with num_res_blocks + 1 residual blocks (as taming), every level but the last ending
    in an Upsample; the head into out_channels, with no activation after it.
    """

    def __init__(
        self,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        resolution: int,
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not ch_mult:
            raise ValueError("Decoder needs at least one entry in ch_mult")
        self.grad_checkpointing = grad_checkpointing
        n = len(ch_mult)
        resolutions = level_resolutions(resolution, n)
        top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, kernel_size=3, padding=1)
        self.mid = mid_block(top, dropout)
        levels = []
        width = top
        for i in reversed(range(n)):  # coarsest level first
            levels.append(
                Level(
                    width,
                    ch * ch_mult[i],
                    num_res_blocks + 1,
                    attend=resolutions[i] in attn_resolutions,
                    dropout=dropout,
                    resample="upsample" if i > 0 else None,
                )
            )
            width = ch * ch_mult[i]
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The final conv's weight (out_channels, ch * ch_mult[0], 3, 3): the adaptive GAN
        weight compares the gradient norms of the losses there."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (B, ch * ch_mult[-1], h, w)
        h = self._run(self.mid, h)  # (B, ch * ch_mult[-1], h, w)
        for level in self.conv_blocks:
            h = self._run(level, h)  # (B, ch * ch_mult[i], ...) doubled but on the last
        return self._run(self._head, h)  # (B, out_channels, h*f, w*f)
