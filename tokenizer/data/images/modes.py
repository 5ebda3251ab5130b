"""Any PIL image -> upright 8-bit RGB, by the real range of its mode.

The one conversion every path shares: the training stream, evaluation and the corpus
tokenizer (through tars.decode_image) and Tokenizer.preprocess / encode (through
transforms.to_uint8_tensor). PIL's own convert("RGB") clips 16-bit values to 255 (a
16-bit PNG turns white), maps float 0..1 to 0..1 of 255 (near black) and drops alpha
onto whatever colour lies under it; here each mode is read by its range instead:

- EXIF orientation is applied first, so a photograph shot on its side is cropped upright.
- 16-bit greyscale (I;16, I;16B, ...): round(value / 257), so 65535 -> 255.
- 32-bit integer (I): PIL's 16-bit convention, 0..65535 (PGM/PPM with maxval > 255,
  which PIL rescales to 0..65535; 16-bit PNGs in older Pillow). Values outside that
  range, and integer TIFFs other than 16-bit unsigned, have no agreed range: refused.
- float (F): 0..1, as for float tensors given to Tokenizer.encode; values outside
  [0, 1] (say a 0..255 float TIFF) or NaN are refused, naming the range found.
- 16-bit RGB / RGBA PNGs: PIL itself decodes them to 8 bits by the high byte
  (value >> 8, at most one level below round(value / 257)); used as PIL gives them.
- Alpha (RGBA, LA, PA, RGBa, and P / L / RGB / I;16 with a transparent colour) is
  composited onto ALPHA_BACKGROUND (white): round((c * a + 255 * (255 - a)) / 255).
- Everything else (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX): PIL's convert("RGB"). No ICC
  colour management: CMYK is PIL's naive conversion.
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image, ImageOps

# What transparent pixels become: white, the usual page/web background (and what
# most icon and logo artwork is drawn for).
ALPHA_BACKGROUND = (255, 255, 255)

# Float images a hair outside [0, 1] (resampled, rounded) are clipped; more is a wrong range.
RANGE_SLACK = 1e-3

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
# Modes PIL converts to RGB correctly by itself (given no transparency).
_PLAIN_MODES = ("RGB", "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_TIFF_BITS, _TIFF_SAMPLE_FORMAT = 258, 339


class ImageModeError(ValueError):
    """An image whose pixel values have no range we can read honestly."""


def oriented(image: Image.Image) -> Image.Image:
    """The image as its EXIF orientation says it is shown (the same object when upright).
    Call after image.draft(): exif_transpose loads the pixels."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in range(2, 9):
        return ImageOps.exif_transpose(image)
    return image


def as_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB uint8 of any PIL image by its mode's real range (module docstring);
    raises ImageModeError when the range is unknown or the values lie outside it."""
    image = oriented(image)
    mode, transparency = image.mode, image.info.get("transparency")
    if mode == "RGB" and transparency is None:
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image)  # (H, W) uint16 (any byte order) or int32
        if mode == "I":
            _check_integer_range(image, values)
        return _composite_grey(sixteen_to_eight(values), values, transparency)
    if mode == "F":
        return _from_float(np.asarray(image, dtype=np.float64))
    if mode in _ALPHA_MODES or transparency is not None:
        # PIL applies a palette's or a colour's transparency exactly; I;16 went above.
        rgba = np.asarray(image.convert("RGBA"))  # (H, W, 4)
        return _composite(rgba[..., :3], rgba[..., 3])
    if mode in _PLAIN_MODES:
        return image.convert("RGB")
    raise ImageModeError(f"PIL image mode {mode!r} is not supported: convert it to RGB first")


def _check_integer_range(image: Image.Image, values: np.ndarray) -> None:
    if image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        bits, sample_format = (
            _first(tags.get(_TIFF_BITS, 0)),
            _first(tags.get(_TIFF_SAMPLE_FORMAT, 1)),
        )
        signed = sample_format == 2  # TIFF SampleFormat: 1 unsigned, 2 signed
        if bits != 16 or signed:
            kind = "signed" if signed else "unsigned"
            raise ImageModeError(
                f"a {bits}-bit {kind} integer TIFF has no agreed 8-bit range: save it as "
                "8-bit or 16-bit unsigned"
            )
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageModeError(
            f"32-bit integer image (mode I) with values in [{values.min()}, {values.max()}]: "
            "mode I is read as 0..65535 (16-bit); rescale it to 16 or 8 bits first"
        )


def _first(tag: object) -> object:
    """A TIFF tag's first value (PIL gives per-sample tags as tuples)."""
    return tag[0] if isinstance(tag, tuple) and tag else tag


def sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """Integers in 0..65535 -> uint8 round(v / 257), exactly (v / 257 is never k + 1/2)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _from_float(values: np.ndarray) -> Image.Image:
    if values.size:
        low, high = np.min(values), np.max(values)
        if np.isnan(low) or low < -RANGE_SLACK or high > 1.0 + RANGE_SLACK:
            raise ImageModeError(
                f"float image (mode F) with values in [{low:.4g}, {high:.4g}]: float images "
                "are read as 0..1; rescale it (a 0..255 image: divide by 255)"
            )
    grey = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))  # (H, W, 3)


def _composite_grey(grey: np.ndarray, values: np.ndarray, transparency: object) -> Image.Image:
    rgb = np.repeat(grey[..., None], 3, axis=2)  # (H, W, 3)
    if isinstance(transparency, int):  # a PNG tRNS grey level, in the 16-bit values
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        return _composite(rgb, alpha)
    return Image.fromarray(rgb)


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """rgb (H, W, 3), alpha (H, W) uint8 -> RGB over ALPHA_BACKGROUND, exactly rounded
    ((x + 127) // 255 is round(x / 255): x / 255 is never k + 1/2)."""
    a = alpha.astype(np.uint32)[..., None]  # (H, W, 1)
    background = np.array(ALPHA_BACKGROUND, dtype=np.uint32)  # (3,)
    mixed = rgb.astype(np.uint32) * a + background * (255 - a)  # (H, W, 3)
    return Image.fromarray(((mixed + 127) // 255).astype(np.uint8))
