"""LPIPS (Zhang et al. 2018) with the VGG16 trunk, as the lpips package v0.1 computes it.

d(x, y) = sum over the taps l of mean over (h, w) of  w_l . (u(f_l(x)) - u(f_l(y)))^2,
with f_l the VGG16 activations at relu1_2 .. relu5_3 of the ImageNet-scaled inputs, u the
unit-normalisation of each spatial position's channel vector, and w_l a 1x1 linear head
(no bias) learnt on human judgements (the 7 KB v0.1 vgg.pth).

The network is a loss: frozen, always in eval mode, held beside the tokenizer and never
inside it, so its weights reach no checkpoint of the model, release or fingerprint.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from tokenizer.losses.weight_files import select_weights
from tokenizer.nn.vgg import VGG16_TAP_CHANNELS, VGG16Features

# The lpips package's ScalingLayer: inputs in [-1, 1] mapped to torchvision's ImageNet
# normalisation ((x + 1) / 2 - mean) / std, written as (x - shift) / scale.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# lpips' normalize_tensor adds this to the channel norm, so a zero activation stays zero.
_NORM_EPS = 1e-10


def head_key(index: int) -> str:
    """The key of tap `index`'s head in lpips' file (index 1: lpips puts a Dropout first)."""
    return f"lin{index}.model.1.weight"


def _unit_channels(features: Tensor) -> Tensor:
    norm = features.pow(2).sum(dim=1, keepdim=True).sqrt()  # (B, 1, h, w)
    return features / (norm + _NORM_EPS)


class LPIPS(nn.Module):
    """(B, 3, H, W) x (B, 3, H, W) in [-1, 1] -> (B,) LPIPS distances, in fp32.

    Built with placeholder weights; `load_backbone` and `load_heads` put the real ones in
    (tokenizer/losses/perceptual_setup.py reads them from the configured files).
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = VGG16Features()
        self.heads = nn.ModuleList(
            nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in VGG16_TAP_CHANNELS
        )
        # Not persistent: constants of the formula, not weights to load.
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # A task that switches everything it holds to training mode must not change this
        # loss: lpips computes it in eval mode.
        return super().train(False)

    def load_backbone(self, state: Mapping[str, Tensor], source: str) -> None:
        """torchvision's VGG16 state dict (`features.N.*`; `classifier.*` is ignored)."""
        own = self.backbone.state_dict()
        expected = {k: v.shape for k, v in own.items()}
        weights = select_weights(state, expected, source, "features.", "VGG16 weights")
        self.backbone.load_state_dict(weights)

    def load_heads(self, state: Mapping[str, Tensor], source: str) -> None:
        """lpips' v0.1 vgg.pth: `lin{i}.model.1.weight` of shape (1, C_i, 1, 1)."""
        expected = {head_key(i): torch.Size((1, c, 1, 1)) for i, c in enumerate(VGG16_TAP_CHANNELS)}
        weights = select_weights(state, expected, source, "lin", "lpips v0.1 VGG heads")
        for i, head in enumerate(self.heads):
            head.weight.copy_(weights[head_key(i)])

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {x.shape} and {y.shape}")
        batch = x.shape[0]
        # fp32 even under bf16 autocast: unit-normalised differences of 512-channel
        # features are small, and bf16 rounds much of them away.
        with torch.autocast(device_type=x.device.type, enabled=False):
            both = torch.cat([x.float(), y.float()])  # (2B, 3, H, W): one trunk pass
            taps = self.backbone((both - self.shift) / self.scale)
            distance = x.new_zeros(batch, dtype=torch.float32)  # (B,)
            for head, features in zip(self.heads, taps.values(), strict=True):
                unit = _unit_channels(features)  # (2B, C, h, w)
                squared = (unit[:batch] - unit[batch:]).pow(2)  # (B, C, h, w)
                distance = distance + head(squared).mean(dim=(1, 2, 3))
        return distance
