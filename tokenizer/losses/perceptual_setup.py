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


class LPIPSFileError(WeightsFileError):
    """One of LPIPS' two files is missing or does not load; `which` says which."""

    def __init__(self, which: str, message: str) -> None:
        super().__init__(message)
        self.which = which  # "backbone" or "heads"


def load_lpips(
    backbone: str, heads: str | None = None, device: torch.device | str = "cpu"
) -> tuple[LPIPS, str]:
    """LPIPS with the VGG16 trunk in `backbone` and the lpips v0.1 heads in `heads` (None:
    the copy an installed package ships), frozen, on `device`; returns it and the heads
    file used. The loss and tools/eval_tokenizer.py read their files through this."""
    if heads is None:
        found = installed_heads()
        if found is None:
            raise LPIPSFileError("heads", f"not set and no installed package ships the heads: "
                                 f"{_HEADS_HINT}")  # fmt: skip
        heads = str(found)
    lpips = LPIPS()
    for which, path, load, hint in (
        ("backbone", backbone, lpips.load_backbone, _BACKBONE_HINT),
        ("heads", heads, lpips.load_heads, _HEADS_HINT),
    ):
        try:
            load(read_state_dict(path), source=path)
        except WeightsFileError as err:
            raise LPIPSFileError(which, f"{err}: {hint}") from None
    return lpips.to(device), heads


def build_perceptual(cfg: PerceptualConfig, device: torch.device | str = "cpu") -> LPIPS:
    """LPIPS with the configured VGG16 trunk and heads, frozen, on `device`; a problem is
    a ConfigError naming the key."""
    if cfg.backbone is None:
        raise ConfigError(f"{BACKBONE_KEY}: not set: {_BACKBONE_HINT}")
    try:
        return load_lpips(cfg.backbone, cfg.heads, device)[0]
    except LPIPSFileError as err:
        key = BACKBONE_KEY if err.which == "backbone" else HEADS_KEY
        raise ConfigError(f"{key}: {err}") from None


def check_perceptual(cfg: Config) -> None:
    """Before training starts: when the perceptual term is on, its files exist and load.

    Reads them in full (about 0.5 GB for VGG16): only a complete load proves every key
    and shape, and it costs a second or so once per run.
    """
    if cfg.loss.perceptual.weight > 0:
        build_perceptual(cfg.loss.perceptual)
