"""Image transforms: shorter-side resize, then a random (train) or centre (eval) crop.

The evaluation transform is also the tokenizer's preprocessing for corpora
(tools/tokenize_dataset.py), so a prior sees codes of exactly the crops evaluation sees.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokenizer.data.images.augment import ColorJitter, apply_color_jitter
from tokenizer.data.images.modes import ALPHA_BACKGROUND, as_rgb


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image.resize(new, Image.Resampling.BICUBIC)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """Any PIL image -> (3, H, W) uint8, through image_modes.as_rgb (a no-op for the
    upright RGB images the pipeline's crops already are)."""
    array = np.array(as_rgb(image), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def uint8_to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 in [-1, 1]; the one conversion training, evaluation
    and Tokenizer.encode share, so the same pixels give bit-identical model inputs."""
    return pixels.float().div_(127.5).sub_(1.0)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return uint8_to_model_range(to_uint8_tensor(image))


def train_transform(
    image: Image.Image,
    resolution: int,
    flip: bool,
    rng: random.Random,
    color_jitter: ColorJitter | None = None,
) -> torch.Tensor:
    """Shorter side to `resolution`, random square crop, optional flip, optional colour
    jitter (on the crop: cheap, and the same draws whatever the source size)
    -> (3, R, R) in [-1, 1]."""
    image = resize_shorter(image, resolution)
    w, h = image.size
    left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if color_jitter is not None:
        image = apply_color_jitter(image, color_jitter, rng)
    return _to_tensor(image)


def eval_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to `resolution` (bicubic), centre crop to (R, R)."""
    image = resize_shorter(image, resolution)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def eval_transform(image: Image.Image, resolution: int) -> torch.Tensor:
    """Shorter side to `resolution`, centre crop -> (3, R, R) in [-1, 1]."""
    return _to_tensor(eval_crop(image, resolution))


def eval_preprocessing(resolution: int) -> dict[str, Any]:
    """A description of eval_crop for manifests: what a reader must do to match the codes."""
    return {
        "transform": "eval",
        "resolution": resolution,
        "resize": "shorter side to resolution, PIL bicubic",
        "crop": "centre, resolution x resolution",
        "jpeg_draft": True,  # JPEGs decode at the smallest DCT scale covering the resolution
        # How image_modes.as_rgb reads what is not plain 8-bit RGB.
        "exif_orientation": "applied",
        "alpha_background": list(ALPHA_BACKGROUND),
        "sixteen_bit": "round(v / 257)",
        "float": "0..1, others refused",
        "model_input": "uint8 / 127.5 - 1",
    }
