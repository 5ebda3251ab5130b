"""Does a file hold an image that decodes, and which bytes go into the shard for it.

Every image is decoded in full (PIL open + load, never just verify(), which reads no
pixels) with PIL's truncated-image tolerance off, so an empty, cut or mislabelled file is
caught while packing rather than as a decode error in every epoch of training.

What is stored:
- an extension the shard reader takes as the image field (tars.IMAGE_EXTENSIONS): the
  file's own bytes, under its lowercased extension;
- another name for one of those formats (.jfif, .jpe, .apng, .mpo): the file's own bytes,
  under that format's usual extension;
- any other format PIL reads here (.ppm, .pgm, .tga, .ico, .qoi, .jp2, .avif, .psd, ...):
  re-encoded as PNG, which is lossless. PNG keeps the decoded pixels as they are (16-bit
  grey, palette, alpha included); the few modes PNG cannot hold (CMYK, YCbCr, LAB, HSV,
  32-bit int beyond 16 bits, float, palette + alpha) go through RGB(A) first, the
  conversion the reader applies anyway. Either way the reader's RGB is checked to be the
  same as the original's before the PNG is kept. Re-encoding rather than widening IMAGE_EXTENSIONS keeps the shards
  readable by any webdataset reader, which knows the common extensions only.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

from tokenizer.data.images.modes import ImageModeError, as_rgb, oriented
from tokenizer.data.tars import IMAGE_EXTENSIONS

# PIL formats whose bytes the reader decodes as they are, by the extension they are stored
# under when the file's own extension is not one the reader takes.
_STORED_AS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tiff",
}
# Modes a PNG holds exactly.
_PNG_MODES = ("1", "L", "LA", "I;16", "I;16B", "P", "RGB", "RGBA")
# Plugins that identify a file but cannot decode it: stubs (BUFR, GRIB, HDF5, WMF) need an
# external handler, and MPEG reads only the frame size, so its "image" would be blank.
_CANNOT_DECODE = ("MPEG",)


@functools.cache
def _decodable_formats() -> frozenset[str]:
    Image.init()
    return frozenset(
        name
        for name, (factory, _accept) in Image.OPEN.items()
        if name not in _CANNOT_DECODE
        and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    )


def readable_extensions() -> tuple[str, ...]:
    """Lowercase extensions (no dot) of the formats PIL decodes in this environment."""
    formats = _decodable_formats()
    found = {
        e.lstrip(".").lower() for e, f in Image.registered_extensions().items() if f in formats
    }
    return tuple(sorted(found | set(IMAGE_EXTENSIONS)))


class BadImage(ValueError):
    """A file that cannot go into a shard; the message is the reason, for the report."""


@dataclass(frozen=True)
class CheckedImage:
    field: str  # the extension it is stored under
    data: bytes
    reencoded: bool  # True: `data` is a PNG made from the file, not the file itself
    size: tuple[int, int]  # (width, height)


def _as_png(image: Image.Image) -> bytes:
    if image.mode == "I" and _fits_16_bits(image):
        image = image.convert("I;16")  # 16-bit PGM/PPM open as 32-bit "I"
    if image.mode not in _PNG_MODES:
        alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if alpha else "RGB")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _fits_16_bits(image: Image.Image) -> bool:
    low, high = image.getextrema()
    return 0 <= low and high <= 65535  # type: ignore[operator]


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    """The same RGB for the training reader (tokenizer.data.images.modes.as_rgb)."""
    return a.size == b.size and as_rgb(a).tobytes() == as_rgb(b).tobytes()


def check_image(data: bytes, extension: str) -> CheckedImage:
    """Decode `data` (a file's bytes, `extension` its suffix without the dot) in full and
    return what to store for it; raise BadImage with the reason when it is not usable."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Set by some library in this process: a cut file would then load half grey.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images cannot be detected"
        )
    if not data:
        raise BadImage("empty file (0 bytes)")
    ext = extension.lower().lstrip(".")
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, size = image.format or "?", image.size
            if kind not in _decodable_formats():
                raise BadImage(f"PIL identifies it as {kind} but cannot decode that here")
            field = ext if ext in IMAGE_EXTENSIONS else _STORED_AS.get(kind)
            if field is not None and kind in ("JPEG", "MPO"):
                # Decoding at 1/8 scale still reads every entropy-coded byte (a cut file
                # fails the same way), and skips most of the inverse DCT.
                image.draft(image.mode, (1, 1))
            image.load()
            # What the training reader would refuse (a float image outside 0..1, say)
            # is skipped here, with the reader's reason, instead of failing later.
            as_rgb(image)
            if field is not None:
                return CheckedImage(field, data, reencoded=False, size=size)
            # PNG keeps no EXIF orientation: store the upright pixels.
            image = oriented(image)
            png = _as_png(image)
            with Image.open(io.BytesIO(png)) as back:
                if not _same_pixels(image, back):
                    raise BadImage(f"{kind} image does not survive a PNG re-encode unchanged")
            return CheckedImage("png", png, reencoded=True, size=size)
    except BadImage:
        raise
    except ImageModeError as err:
        raise BadImage(f"unusable {ext} image: {err}") from None
    except UnidentifiedImageError:
        raise BadImage(f"not an image PIL can identify ({len(data)} bytes)") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"too many pixels: {err}") from None
    except Exception as err:  # PIL raises many types for corrupt data
        raise BadImage(f"does not decode ({type(err).__name__}: {err})") from None
