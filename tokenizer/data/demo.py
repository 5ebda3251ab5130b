"""The embedded demo data set: crops of the photographs bundled with scikit-image and
scikit-learn, so the demo trains on real images without a download.

Two ways to hold images out, neither of which lets an eval crop share a pixel with a
training crop:
- split="photos" (the demo): whole photographs (chelsea, flower) are held out, so eval
  numbers measure generalisation to scenes never seen;
- split="regions": every other photograph is cut into quadrants; crops of the top-left
  and bottom-right quadrants train, crops of the other two are held out. Eval images
  then come from the training distribution (as a validation split of a large corpus
  does), which is what codebook usage on held-out images is meant to measure: on two
  unseen scenes a codebook that serves fifteen others cannot use every code.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tokenizer.atomic import write_json
from tokenizer.data.writer import brace_pattern, write_shards

logger = logging.getLogger(__name__)

# Bundled with the scikit-image wheel (no pooch download). `cat` is `chelsea` again.
# Every colour photograph it ships, then its grey ones (luminance texture). Not here:
# colorwheel and logo (synthetic), chessboard, phantom, horse, text, page (drawings),
# lfw_subset (25x25 faces) and no_time_for_that (a 14x25 animation).
SKIMAGE_COLOUR_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "motorcycle_left",
    "motorcycle_right",
)
SKIMAGE_PHOTOS = (
    *SKIMAGE_COLOUR_PHOTOS,
    "camera",
    "moon",
    "coins",
    "clock",
    "brick",
    "grass",
    "gravel",
    "cell",
)
SKLEARN_PHOTOS = ("china", "flower")  # all it ships, both colour
# The stereo pair comes from one loader; the other names are skimage.data functions.
_SKIMAGE_LOADERS = {
    "motorcycle_left": lambda data: data.stereo_motorcycle()[0],
    "motorcycle_right": lambda data: data.stereo_motorcycle()[1],
}
HELD_OUT = ("chelsea", "flower")
SPLITS = ("photos", "regions")
MANIFEST = "manifest.json"
# 2: the motorcycle stereo pair joined the photographs (a set of version 1 is rebuilt).
_FORMAT_VERSION = 2
_PYRAMID_LEVELS = 6


@dataclass(frozen=True)
class Photo:
    name: str
    library: str  # "scikit-image" or "scikit-learn"
    pixels: np.ndarray  # (H, W, 3) uint8
    # Where `pixels` lie in the original photograph (a quadrant's corner), and its size.
    origin: tuple[int, int] = (0, 0)  # left, top
    source_size: tuple[int, int] | None = None  # width, height; None: pixels are the whole
    region: str = "whole"

    @property
    def size(self) -> tuple[int, int]:
        """The original photograph's width and height."""
        return self.source_size or (self.pixels.shape[1], self.pixels.shape[0])


_TRAIN_QUADRANTS = ("top-left", "bottom-right")
_HELD_QUADRANTS = ("top-right", "bottom-left")


def quadrants(photo: Photo) -> dict[str, Photo]:
    """The photo's four quadrants as photos of their own, keyed by position."""
    h, w = photo.pixels.shape[:2]
    cy, cx = h // 2, w // 2
    boxes = {
        "top-left": (0, 0, cx, cy),
        "top-right": (cx, 0, w, cy),
        "bottom-left": (0, cy, cx, h),
        "bottom-right": (cx, cy, w, h),
    }
    return {
        region: Photo(
            name=photo.name,
            library=photo.library,
            pixels=np.ascontiguousarray(photo.pixels[top:bottom, left:right]),
            origin=(left, top),
            source_size=photo.size,
            region=region,
        )
        for region, (left, top, right, bottom) in boxes.items()
    }


def split_photos(photos: list[Photo], split: str) -> tuple[list[Photo], list[Photo]]:
    """(train, held out) pieces of the photographs for a split (see the module doc)."""
    if split == "photos":
        return (
            [p for p in photos if p.name not in HELD_OUT],
            [p for p in photos if p.name in HELD_OUT],
        )
    if split == "regions":
        parts = [quadrants(p) for p in photos if p.name not in HELD_OUT]
        return (
            [q[r] for q in parts for r in _TRAIN_QUADRANTS],
            [q[r] for q in parts for r in _HELD_QUADRANTS],
        )
    raise ValueError(f"unknown demo split {split!r}; choices: {', '.join(SPLITS)}")


def _as_rgb(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3].astype(np.uint8))


def load_sample_photos() -> list[Photo]:
    """Every bundled photograph this installation can load offline; the others are skipped."""
    photos: list[Photo] = []
    try:
        import skimage.data
    except ImportError:
        logger.warning("scikit-image is not installed: its photographs are skipped")
    else:
        for name in SKIMAGE_PHOTOS:
            special = _SKIMAGE_LOADERS.get(name)
            try:
                pixels = special(skimage.data) if special else getattr(skimage.data, name)()
                photos.append(Photo(name, "scikit-image", _as_rgb(pixels)))
            except Exception as err:  # absent, or needs a download in this version
                logger.info("skimage.data.%s unavailable offline (%s); skipped", name, err)
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        logger.warning("scikit-learn is not installed: its photographs are skipped")
    else:
        bunch = load_sample_images()
        for filename, pixels in zip(bunch.filenames, bunch.images, strict=True):
            name = Path(filename).stem
            if name in SKLEARN_PHOTOS:
                photos.append(Photo(name, "scikit-learn", _as_rgb(pixels)))
    return photos


class _Pyramid:
    """A photo at a few scales, from shorter side = resolution up to its native size.

    Crops from the small levels show whole objects, crops from the native level show
    texture; precomputing the levels keeps thousands of crops cheap.
    """

    def __init__(self, photo: Photo, resolution: int) -> None:
        self.photo = photo
        image = Image.fromarray(photo.pixels)
        shorter = min(image.size)
        sizes = np.geomspace(resolution, max(shorter, resolution), _PYRAMID_LEVELS)
        self.levels: list[tuple[float, Image.Image]] = []
        for target in sorted({int(round(s)) for s in sizes}):
            scale = target / shorter
            w, h = image.size
            size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
            level = image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)
            self.levels.append((scale, level))

    def crop(self, rng: np.random.Generator, resolution: int) -> tuple[bytes, dict]:
        scale, level = self.levels[int(rng.integers(len(self.levels)))]
        left = int(rng.integers(level.width - resolution + 1))
        top = int(rng.integers(level.height - resolution + 1))
        tile = level.crop((left, top, left + resolution, top + resolution))
        buffer = io.BytesIO()
        tile.save(buffer, format="PNG")
        # Per axis: rounding the level's size makes its x and y scales differ slightly.
        sx = level.width / self.photo.pixels.shape[1]
        sy = level.height / self.photo.pixels.shape[0]
        ox, oy = self.photo.origin
        box = [
            round(ox + left / sx, 1),
            round(oy + top / sy, 1),
            round(ox + (left + resolution) / sx, 1),
            round(oy + (top + resolution) / sy, 1),
        ]
        meta = {
            "source": self.photo.name,
            "library": self.photo.library,
            "region": self.photo.region,
            "scale": round(scale, 4),
            "box": box,  # in the original photograph's pixels: left, top, right, bottom
            "photo_size": list(self.photo.size),
        }
        return buffer.getvalue(), meta


def _crop_samples(
    pyramids: list[_Pyramid], count: int, resolution: int, seed: int, prefix: str
) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    for i in range(count):
        pyramid = pyramids[int(rng.integers(len(pyramids)))]
        png, meta = pyramid.crop(rng, resolution)
        caption = (
            f"a {resolution}x{resolution} crop of the {pyramid.photo.library} "
            f"'{pyramid.photo.name}' photograph"
        )
        yield {
            "__key__": f"{prefix}{i:06d}_{pyramid.photo.name}",
            "png": png,
            "txt": caption,
            "json": json.dumps(meta, sort_keys=True),
        }


@dataclass(frozen=True)
class DemoSet:
    train_pattern: str
    eval_pattern: str
    train_shards: list[str]
    eval_shards: list[str]
    built: bool  # False when an existing complete set was reused


def _params(
    resolution: int, train_crops: int, eval_crops: int, seed: int, per_shard: int, split: str
) -> dict:
    params = {
        "version": _FORMAT_VERSION,
        "resolution": resolution,
        "train_crops": train_crops,
        "eval_crops": eval_crops,
        "seed": seed,
        "samples_per_shard": per_shard,
        "held_out": list(HELD_OUT),
    }
    if split != "photos":  # sets built before splits existed stay valid
        params["split"] = split
    return params


def _existing(out: Path, params: dict) -> DemoSet | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("params") != params:
        return None
    shards = manifest["train_shards"] + manifest["eval_shards"]
    if not all(
        (out / s["path"]).is_file() and (out / s["path"]).stat().st_size == s["bytes"]
        for s in shards
    ):
        return None
    return DemoSet(
        manifest["train_pattern"],
        manifest["eval_pattern"],
        [str(out / s["path"]) for s in manifest["train_shards"]],
        [str(out / s["path"]) for s in manifest["eval_shards"]],
        built=False,
    )


def _label(photo: Photo) -> str:
    return photo.name if photo.region == "whole" else f"{photo.name} ({photo.region})"


def _clear(directory: Path) -> None:
    if directory.is_dir():
        for path in directory.iterdir():
            if re.fullmatch(r"\d{6}\.tar", path.name):
                path.unlink()


def build_demo_set(
    out_dir: str | os.PathLike,
    resolution: int = 64,
    train_crops: int = 4096,
    eval_crops: int = 64,
    seed: int = 0,
    samples_per_shard: int | None = None,
    force: bool = False,
    split: str = "photos",
) -> DemoSet:
    """Write OUT/train/*.tar and OUT/eval/*.tar, then OUT/manifest.json last.

    `split` picks what is held out for OUT/eval (see the module doc). Reuses a complete
    set built with the same parameters unless `force`.
    """
    if train_crops < 1 or eval_crops < 1:
        raise ValueError("train_crops and eval_crops must be positive")
    # At least 8 train shards, so 2 ranks x 4 workers each own whole shards.
    per_shard = samples_per_shard or math.ceil(train_crops / 8)
    out = Path(out_dir)
    params = _params(resolution, train_crops, eval_crops, seed, per_shard, split)
    if not force and (existing := _existing(out, params)) is not None:
        return existing

    train_photos, held_photos = split_photos(load_sample_photos(), split)
    train = [_Pyramid(p, resolution) for p in train_photos]
    held = [_Pyramid(p, resolution) for p in held_photos]
    if not train or not held:
        raise RuntimeError("no bundled photographs available (need scikit-image / scikit-learn)")

    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    _clear(out / "train")
    _clear(out / "eval")
    train_info = write_shards(
        _crop_samples(train, train_crops, resolution, seed, "train"),
        out / "train",
        samples_per_shard=per_shard,
    )
    # Two eval shards let two ranks split evaluation by whole shards.
    eval_info = write_shards(
        _crop_samples(held, eval_crops, resolution, seed + 1, "eval"),
        out / "eval",
        samples_per_shard=max(1, math.ceil(eval_crops / 2)),
    )
    result = DemoSet(
        brace_pattern(out / "train", len(train_info)),
        brace_pattern(out / "eval", len(eval_info)),
        [s.path for s in train_info],
        [s.path for s in eval_info],
        built=True,
    )

    def entries(infos: list) -> list[dict]:
        return [
            {"path": os.path.relpath(s.path, out), "samples": s.num_samples, "bytes": s.num_bytes}
            for s in infos
        ]

    manifest = {
        "params": params,
        "photos": {
            "train": [_label(p.photo) for p in train],
            "eval": [_label(p.photo) for p in held],
        },
        "train_pattern": result.train_pattern,
        "eval_pattern": result.eval_pattern,
        "train_shards": entries(train_info),
        "eval_shards": entries(eval_info),
    }
    write_json(out / MANIFEST, manifest)
    return result
