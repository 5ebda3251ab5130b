"""Building blocks and the VQ-VAE paper's encoder/decoder (van den Oord et al. 2017, as in
DeepMind sonnet's VQ-VAE example)."""

from __future__ import annotations

from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))); shape-preserving."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        # Not in-place: the first ReLU's input is the skip path.
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)  # (B, C, H, W)


def _residual_stack(channels: int, hidden: int, num_blocks: int) -> nn.Sequential:
    # The paper's stack ends in a ReLU: blocks add to an unrectified skip path.
    blocks: list[nn.Module] = [ResidualBlock(channels, hidden) for _ in range(num_blocks)]
    return nn.Sequential(*blocks, nn.ReLU())


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, code_dim, H/f, W/f), f = 2 ** len(channels).

    One stride-2 4x4 conv per entry of `channels` (each followed by a ReLU), a 3x3 conv,
    the residual stack, and a 1x1 conv into the code space; with code_dim None, no 1x1
    conv: the features (B, channels[-1], H/f, W/f) come out (VQ-VAE-2 joins them to the
    coarser grid's decoding before its own 1x1 conv).
    """

    def __init__(
        self,
        in_channels: int,
        channels: list[int],
        num_res_blocks: int,
        res_channels: int,
        code_dim: int | None,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("Encoder needs at least one entry in channels")
        layers: list[nn.Module] = []
        prev = in_channels
        for width in channels:
            layers += [nn.Conv2d(prev, width, kernel_size=4, stride=2, padding=1), nn.ReLU()]
            prev = width
        layers += [
            nn.Conv2d(prev, prev, kernel_size=3, padding=1),
            _residual_stack(prev, res_channels, num_res_blocks),
        ]
        if code_dim is not None:
            layers.append(nn.Conv2d(prev, code_dim, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, code_dim or channels[-1], h, w)


class Decoder(nn.Module):
    """The encoder's mirror: (B, code_dim, h, w) -> (B, in_channels, h*f, w*f).

    A 3x3 conv out of the code space, the residual stack, then one stride-2 4x4
    transposed conv per entry of reversed(channels), ending at `in_channels` with no
    activation so the output can take any sign.
    """

    def __init__(
        self,
        in_channels: int,
        channels: list[int],
        num_res_blocks: int,
        res_channels: int,
        code_dim: int,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("Decoder needs at least one entry in channels")
        widths = [*reversed(channels), in_channels]  # e.g. [256, 128, 3]
        layers: list[nn.Module] = [
            nn.Conv2d(code_dim, widths[0], kernel_size=3, padding=1),
            _residual_stack(widths[0], res_channels, num_res_blocks),
        ]
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            if i < len(channels) - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> nn.Parameter:
        """The final transposed conv's weight (its in, out channels, 4, 4): the adaptive
        GAN weight compares the gradient norms of the losses there."""
        return self.net[-1].weight

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)  # (B, in_channels, H, W)
