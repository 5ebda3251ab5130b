"""One layer of the gated PixelCNN's two stacks (van den Oord et al. 2016, figure 2): the
vertical stack feeds the horizontal one through a 1x1 conv of its features shifted down one
row, never the reverse; gated units tanh(a) * sigmoid(b); class and spatial conditioning
added to the gate pre-activations of both stacks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenizer.priors.causal_conv import HorizontalConv, VerticalConv, shift_down


def gate(x: Tensor) -> Tensor:
    """(B, 2C, H, W) -> (B, C, H, W): tanh(a) * sigmoid(b)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One layer of both stacks: (v, h) -> (v', h', skip), all (B, dim, H, W).

    v' = gate(V(v) + cond_v)
    h' = [h +] R(gate(H(h) + 1x1(shift_down(V(v))) + cond_h)), skip = S(same gate)
    The first layer (type A) reads the code embeddings, so its horizontal window excludes
    the current column and it has no residual: h there is the current code. With
    `horizontal_out` False (the last layer, when no attention reads its h') R is not built
    and h passes through: a parameter without a gradient would stop DDP.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        first: bool,
        num_classes: int,
        condition_channels: int,
        dropout: float,
        horizontal_out: bool = True,
    ) -> None:
        super().__init__()
        self.first = first
        self.vertical = VerticalConv(dim, 2 * dim, kernel_size)
        self.horizontal = HorizontalConv(dim, 2 * dim, kernel_size, include_current=not first)
        self.vertical_to_horizontal = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.residual = nn.Conv2d(dim, dim, 1) if horizontal_out else None
        self.skip = nn.Conv2d(dim, dim, 1)
        self.dropout = nn.Dropout(dropout)
        # Both stacks' pre-activation biases in one table / one projection: (B, 4 dim, ...).
        self.class_bias = nn.Embedding(num_classes, 4 * dim) if num_classes else None
        self.condition_bias = (
            nn.Conv2d(condition_channels, 4 * dim, 1) if condition_channels else None
        )

    def _biases(
        self, class_labels: Tensor | None, condition: Tensor | None
    ) -> tuple[Tensor | float, Tensor | float]:
        """The vertical and the horizontal stack's pre-activation biases."""
        bias: Tensor | float = 0.0
        if self.class_bias is not None:
            bias = bias + self.class_bias(class_labels)[:, :, None, None]  # (B, 4 dim, 1, 1)
        if self.condition_bias is not None:
            bias = bias + self.condition_bias(condition)  # (B, 4 dim, H, W)
        return bias.chunk(2, dim=1) if isinstance(bias, Tensor) else (bias, bias)

    def forward(
        self, v: Tensor, h: Tensor, class_labels: Tensor | None, condition: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        bias_v, bias_h = self._biases(class_labels, condition)
        v_pre = self.vertical(v)  # (B, 2 dim, H, W), row r: rows <= r
        # Shifted down one row before it meets the horizontal stack: rows < r only.
        h_pre = self.horizontal(h) + self.vertical_to_horizontal(shift_down(v_pre))
        gated = self.dropout(gate(h_pre + bias_h))  # (B, dim, H, W)
        if self.residual is None:
            h_out = h
        else:
            update = self.residual(gated)
            h_out = update if self.first else h + update
        return gate(v_pre + bias_v), h_out, self.skip(gated)
