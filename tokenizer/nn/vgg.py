"""VGG16's convolutional trunk (Simonyan & Zisserman 2015, configuration D), laid out
module for module as torchvision builds `vgg16().features`, so that torchvision's weights
file (vgg16-397923af.pth: keys `features.N.weight` / `features.N.bias`) loads by key.

It returns the five activations LPIPS reads; torchvision itself is not needed."""

from __future__ import annotations

from torch import Tensor, nn

# Configuration D as torchvision spells it: the width of each 3x3 conv (each followed by a
# ReLU), "M" a 2x2 max-pool. torchvision's last pool (features.30) is left off: no tap
# follows it, and it holds no weights, so the state dict's keys are the same.
_LAYOUT: tuple[int | str, ...] = (
    *(64, 64, "M"),
    *(128, 128, "M"),
    *(256, 256, 256, "M"),
    *(512, 512, 512, "M"),
    *(512, 512, 512),
)

# The ReLUs LPIPS reads, by name, with their index in `features` (torchvision's numbering).
VGG16_TAPS: dict[str, int] = {
    "relu1_2": 3,
    "relu2_2": 8,
    "relu3_3": 15,
    "relu4_3": 22,
    "relu5_3": 29,
}
# Channels of each tap, in VGG16_TAPS order.
VGG16_TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)


def _features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(item, int)
        # In place, as torchvision: no conv needs its output kept for backward.
        layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        in_channels = item
    return nn.Sequential(*layers)


class VGG16Features(nn.Module):
    """(B, 3, H, W) ImageNet-normalised images -> the five LPIPS taps, by name.

    relu1_2 (B, 64, H, W), relu2_2 (B, 128, H/2, W/2), relu3_3 (B, 256, H/4, W/4),
    relu4_3 (B, 512, H/8, W/8), relu5_3 (B, 512, H/16, W/16); H and W at least 16.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _features()
        self._tap_names = {index: name for name, index in VGG16_TAPS.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        taps: dict[str, Tensor] = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._tap_names:
                taps[self._tap_names[index]] = x
        return taps
