"""The PatchGAN discriminator of VQGAN (taming-transformers' NLayerDiscriminator, itself
pix2pix's; LlamaGen and MaskBit's VQGAN+ use the same network): one logit per
overlapping patch of the image, not one per image.

Layout, for `layers` = n and width `ndf`:
    conv4x4 s2 (3 -> ndf), LeakyReLU(0.2)                     no norm on the input layer
    n - 1 x [conv4x4 s2, norm, LeakyReLU(0.2)]                width doubles, capped at 8 ndf
    conv4x4 s1, norm, LeakyReLU(0.2)                          width doubles once more (cap 8x)
    conv4x4 s1 (-> 1)                                         the patch logits
A 4x4 conv of stride 2 and padding 1 halves a side (rounding down), one of stride 1 takes
one off: an (H, W) image gives (H // 2**n - 2, W // 2**n - 2) logits (256 px, n = 3: 30x30).

Norms (`norm`):
- "batch" (taming, LlamaGen): BatchNorm2d. In training mode every forward normalises with
  its own batch's statistics: the real and the fake batch are separate forwards, so each
  is normalised on its own, and under DDP or DeepSpeed each rank uses its own micro-batch
  (no SyncBatchNorm: these statistics never cross ranks). The running mean and variance
  are buffers used only in eval mode; DDP overwrites them from rank 0 before each forward,
  DeepSpeed never synchronises them, so after training they are rank 0's (the one saved)
  or each rank's own. The discriminator only ever runs in training mode here, so they
  matter only to whoever evaluates it afterwards.
- "group": GroupNorm (up to 32 groups): per-sample statistics, so no coupling between the
  samples of a batch nor any buffer; the same on every rank and batch size.
- "none": no normalisation; the convs then carry biases.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from tokenizer.config import DISC_NORMS, AdversarialConfig

_KERNEL = 4
_PADDING = 1
_MAX_WIDTH_FACTOR = 8
_SLOPE = 0.2
_GROUPS = 32


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # The largest group count <= 32 that divides the width (32 for 64 * 2**k).
        return nn.GroupNorm(math.gcd(_GROUPS, channels), channels)
    return nn.Identity()


def _block(in_ch: int, out_ch: int, stride: int, norm: str) -> list[nn.Module]:
    # A norm's shift makes a conv bias redundant (taming drops it under BatchNorm).
    conv = nn.Conv2d(in_ch, out_ch, _KERNEL, stride, _PADDING, bias=norm == "none")
    return [conv, _norm(norm, out_ch), nn.LeakyReLU(_SLOPE)]


def init_discriminator_weights(module: nn.Module) -> None:
    """taming's weights_init, for `Module.apply`: conv weights ~ N(0, 0.02) (DCGAN's),
    norm gains ~ N(1, 0.02) and norm shifts 0. Conv biases keep PyTorch's default init,
    as in taming."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """(B, in_channels, H, W) images in [-1, 1] -> (B, 1, H // 2**layers - 2, ...) logits."""

    def __init__(
        self, in_channels: int = 3, ndf: int = 64, layers: int = 3, norm: str = "batch"
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"PatchDiscriminator needs layers >= 1, got {layers}")
        if norm not in DISC_NORMS:
            raise ValueError(f"unknown discriminator norm {norm!r} ({', '.join(DISC_NORMS)})")
        self.layers = layers
        # No norm on the input layer: DCGAN found a norm there destabilises training.
        net: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, _KERNEL, 2, _PADDING),
            nn.LeakyReLU(_SLOPE),
        ]
        width = ndf
        for n in range(1, layers):
            out = ndf * min(2**n, _MAX_WIDTH_FACTOR)
            net += _block(width, out, stride=2, norm=norm)
            width = out
        out = ndf * min(2**layers, _MAX_WIDTH_FACTOR)
        net += _block(width, out, stride=1, norm=norm)
        net.append(nn.Conv2d(out, 1, _KERNEL, 1, _PADDING))
        self.net = nn.Sequential(*net)
        self.apply(init_discriminator_weights)

    @classmethod
    def from_config(cls, cfg: AdversarialConfig, in_channels: int = 3) -> PatchDiscriminator:
        return cls(in_channels, cfg.disc_ndf, cfg.disc_layers, cfg.disc_norm)

    def output_size(self, size: int) -> int:
        """Side of the logit map for an input side `size`."""
        return (size >> self.layers) - 2

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)  # (B, 1, H // 2**layers - 2, W // 2**layers - 2)
