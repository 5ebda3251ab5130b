"""What Tokenizer.encode accepts, brought to one shape: a (B, 3, H, W) tensor that is
either uint8 or float in [0, 1].

Accepted: torch tensors (channels-first, (3, H, W) or (B, 3, H, W)), numpy arrays
(channels-last as PIL and imageio give them, (H, W, 3) or (B, H, W, 3)), PIL images of
any mode (read by image_modes.as_rgb, as training reads files), and lists of any of
these. uint8 stays uint8, so the model sees exactly the values the training pipeline
gives it for the same pixels. uint16 arrays and tensors (16-bit PNGs read by imageio or
OpenCV) span 0..65535 and become uint8 round(v / 257), as 16-bit files do in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image

from tokenizer.data.images.modes import RANGE_SLACK, sixteen_to_eight
from tokenizer.data.images.transforms import to_uint8_tensor

ImageInput: TypeAlias = torch.Tensor | np.ndarray | Image.Image | Sequence[Any]


def _from_tensor(images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"tensors must be (B, 3, H, W) or (3, H, W), channels first; got {tuple(images.shape)}"
        )
    if images.dtype == torch.uint16:
        # torch has few uint16 kernels: convert on the CPU through numpy.
        return torch.from_numpy(sixteen_to_eight(images.cpu().numpy()))
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(
            f"expected a float tensor in [0, 1], a uint8 or a uint16 tensor, got {images.dtype}"
        )
    return images


def _from_numpy(images: np.ndarray) -> torch.Tensor:
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            "numpy arrays must be channels-last RGB (B, H, W, 3) or (H, W, 3), as PIL gives "
            f"them; got {images.shape} (greyscale or RGBA: pass a PIL image, whose alpha "
            "is composited onto white)"
        )
    if images.dtype == np.uint16:
        images = sixteen_to_eight(images)
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"expected a float array in [0, 1], a uint8 or a uint16 array, got {images.dtype}"
        )
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (B, 3, H, W)


def _one(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return _from_tensor(item)
    if isinstance(item, np.ndarray):
        return _from_numpy(item)
    if isinstance(item, Image.Image):
        return to_uint8_tensor(item).unsqueeze(0)  # (1, 3, H, W)
    raise TypeError(
        f"cannot encode a {type(item).__name__}: pass tensors, numpy arrays, PIL images "
        "or a list of them"
    )


def as_pixel_batch(images: ImageInput) -> torch.Tensor:
    """Any accepted input -> (B, 3, H, W), uint8 or floating (checked to lie in [0, 1])."""
    if isinstance(images, list | tuple):
        if not images:
            raise ValueError("no images given")
        parts = [_one(item) for item in images]
        kinds = {p.dtype == torch.uint8 for p in parts}
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(kinds) > 1:
            raise ValueError("a list mixes uint8 and float images: convert them to one kind")
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes in one batch: {sorted(shapes)}")
        batch = torch.cat(parts)
    else:
        batch = _one(images)
    if batch.is_floating_point() and batch.numel():
        low, high = torch.aminmax(batch)
        if low.item() < -RANGE_SLACK or high.item() > 1.0 + RANGE_SLACK:
            raise ValueError(
                f"float images must lie in [0, 1], got values in [{low.item():.3f}, "
                f"{high.item():.3f}] (images in [-1, 1]? pass (x + 1) / 2)"
            )
    return batch
