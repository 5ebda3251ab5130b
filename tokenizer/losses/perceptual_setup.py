"""The perceptual loss from the config: `loss.perceptual.backbone` and `.heads` read into
an LPIPS network, every problem a ConfigError that names the key and what to give it."""

from __future__ import annotations

import torch

from tokenizer.config import Config, ConfigError, PerceptualConfig
from tokenizer.losses.lpips_heads import INSTALLED_HEADS, installed_heads
from tokenizer.losses.perceptual import LPIPS
from tokenizer.losses.weight_files import WeightsFileError, read_state_dict

BACKBONE_KEY = "loss.perceptual.backbone"
HEADS_KEY = "loss.perceptual.heads"

_BACKBONE_HINT = (
    "give torchvision's VGG16 weights (vgg16-397923af.pth) or a .safetensors with its "
    "features.N.weight / features.N.bias keys; nothing is downloaded"
)
_HEADS_HINT = (
    "give lpips' v0.1 VGG heads (vgg.pth, 7 KB, keys lin0..lin4.model.1.weight), or "
    "install a package that ships them ("
    + ", ".join(f"{package}: {package}/{path}" for package, path in INSTALLED_HEADS)
    + ")"
)


def _heads_path(cfg: PerceptualConfig) -> str:
    if cfg.heads is not None:
        return cfg.heads
    found = installed_heads()
    if found is None:
        raise ConfigError(
            f"{HEADS_KEY}: not set and no installed package ships the heads: {_HEADS_HINT}"
        )
    return str(found)


def build_perceptual(cfg: PerceptualConfig, device: torch.device | str = "cpu") -> LPIPS:
    """LPIPS with the configured VGG16 trunk and heads, frozen, on `device`."""
    if cfg.backbone is None:
        raise ConfigError(f"{BACKBONE_KEY}: not set: {_BACKBONE_HINT}")
    lpips = LPIPS()
    for key, path, load, hint in (
        (BACKBONE_KEY, cfg.backbone, lpips.load_backbone, _BACKBONE_HINT),
        (HEADS_KEY, _heads_path(cfg), lpips.load_heads, _HEADS_HINT),
    ):
        try:
            load(read_state_dict(path), source=path)
        except WeightsFileError as err:
            raise ConfigError(f"{key}: {err}: {hint}") from None
    return lpips.to(device)


def check_perceptual(cfg: Config) -> None:
    """Before training starts: when the perceptual term is on, its files exist and load.

    Reads them in full (about 0.5 GB for VGG16): only a complete load proves every key
    and shape, and it costs a second or so once per run.
    """
    if cfg.loss.perceptual.weight > 0:
        build_perceptual(cfg.loss.perceptual)
