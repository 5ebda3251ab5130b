"""Reading webdataset tar shards sample by sample, and decoding their images.

One place knows webdataset's naming rule and survives truncated tars and corrupt
images; the training stream, evaluation and the corpus tokenizer all read through it.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from tokenizer.data.images.modes import ImageModeError, as_rgb

# What PIL reads; make_shards stores each as it is, under its lowercased extension.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class RawSample:
    key: str
    shard: str
    fields: dict[str, bytes]  # extension -> bytes: {"png": ..., "txt": ..., "json": ...}


class DecodeError(ValueError):
    """A sample whose image cannot be used; the message is the reason, for manifests."""


def split_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: key = path up to the first dot of the basename, ext = the rest."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{head}/{stem}" if head else stem), ext.lower()


def read_tar(path: str, on_error: Callable[[str], None]) -> Iterator[RawSample]:
    """Yield the complete samples of a tar in file order; stop at the first read error,
    reporting it through `on_error` (a truncated tar keeps the samples before the break)."""
    current: RawSample | None = None
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                parts = split_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                # A new key completes the previous sample: hand it out before reading
                # on, so a break in this member's data cannot take it down too.
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key, path, {})
                current.fields[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        if current is not None:
            yield current
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        # The sample being read when the tar broke may be incomplete: drop it.
        on_error(f"shard {path}: read error ({err}); kept the samples before it")


def image_extension(fields: dict[str, bytes]) -> str | None:
    return next((e for e in IMAGE_EXTENSIONS if e in fields), None)


def decode_image(sample: RawSample, resolution: int) -> Image.Image:
    """The sample's image as upright 8-bit RGB (image_modes.as_rgb: by its mode's real
    range, alpha onto white, EXIF orientation applied); raises DecodeError with the reason
    when it has none, it does not decode, or its values have no range we can read."""
    ext = image_extension(sample.fields)
    if ext is None:
        raise DecodeError(f"no image field (one of {', '.join(IMAGE_EXTENSIONS)})")
    try:
        image = Image.open(io.BytesIO(sample.fields[ext]))
        # JPEGs can decode at a reduced DCT scale that still covers (R, R): much faster
        # for large photographs, and the bicubic resize that follows finishes the job.
        # It must come before the pixels load, which as_rgb's EXIF transpose does.
        image.draft("RGB", (resolution, resolution))
        return as_rgb(image)
    except ImageModeError as err:
        raise DecodeError(f"unusable {ext} image: {err}") from None
    except Exception as err:  # PIL raises many types for corrupt data
        raise DecodeError(f"cannot decode {ext}: {type(err).__name__}: {err}") from None


def slot_samples(
    shards: Sequence[str],
    order: Sequence[int],
    slot: int,
    nslots: int,
    on_error: Callable[[str], None],
) -> Iterator[RawSample]:
    """The raw samples one reader (slot) of nslots takes from `shards` read in `order`:
    whole shards order[slot::nslots], or with fewer shards than readers every shard,
    keeping the samples whose running index falls to this slot."""
    if len(shards) >= nslots:
        for j in order[slot::nslots]:
            yield from read_tar(shards[j], on_error)
        return
    running = 0
    for j in order:
        for raw in read_tar(shards[j], on_error):
            if running % nslots == slot:
                yield raw
            running += 1
