"""Reading webdataset tar shards sample by sample, and decoding their images.

One place knows webdataset's naming rule and survives truncated tars and corrupt
images; the training stream, evaluation and the corpus tokenizer all read through it.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from tokenizer.data.images.modes import ImageModeError, as_rgb
from tokenizer.data.slots import Slot

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


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


@dataclass
class SampleRef:
    """A sample whose tar headers were read but not its payloads: where each field's
    bytes lie in an uncompressed tar. load() reads them (one seek per field)."""

    key: str
    shard: str
    spans: dict[str, tuple[int, int]]  # extension -> (offset, size) in the tar file

    def load(self) -> RawSample:
        fields: dict[str, bytes] = {}
        with open(self.shard, "rb") as f:
            for ext, (offset, size) in self.spans.items():
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise OSError(f"shard {self.shard}: changed while it was read ({self.key!r})")
                fields[ext] = data
        return RawSample(self.key, self.shard, fields)


def _compressed(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith(_COMPRESSED_MAGIC)


def scan_tar(
    path: str,
    on_error: Callable[[str], None],
    wanted: Callable[[int], bool | None] | None = None,
) -> Generator[RawSample | SampleRef, None, int]:
    """The complete samples of a tar in file order, reading payloads only where asked.

    `wanted(n)` is asked at the first header of the n-th sample of this tar (every
    earlier one is complete): True reads its payloads (a RawSample), False only records
    where they lie (a SampleRef; the reader seeks past them), None leaves the sample out.
    Without `wanted` every payload is read. Compressed tars cannot be seeked and are
    always read. Returns the number of complete samples (left-out ones included); stops
    at the first read error, reporting it through `on_error` (a truncated tar keeps the
    samples before the break), as tarfile's stream reader would."""
    complete = 0
    current: RawSample | SampleRef | None = None
    keep: bool | None = True
    try:
        seekable = not _compressed(path)
        size = os.path.getsize(path)
        # "r:" reads the headers and seeks past the payloads; the payloads it is asked
        # for it reads with extractfile. Errors match the stream reader's ("r|*").
        with tarfile.open(path, "r:" if seekable else "r|*") as tar:
            for member in tar:
                parts = split_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                # A new key completes the previous sample: hand it out before reading
                # on, so a break in this member's data cannot take it down too.
                if current is not None and current.key != key:
                    complete += 1
                    if keep is not None:
                        yield current
                    current = None
                if current is None:
                    keep = True if wanted is None or not seekable else wanted(complete)
                    current = RawSample(key, path, {}) if keep else SampleRef(key, path, {})
                if isinstance(current, SampleRef):
                    if member.offset_data + member.size > size:
                        raise tarfile.ReadError("unexpected end of data")
                    current.spans[ext] = (member.offset_data, member.size)
                else:
                    current.fields[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        if current is not None:
            complete += 1
            if keep is not None:
                yield current
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        # The sample being read when the tar broke may be incomplete: drop it.
        on_error(f"shard {path}: read error ({err}); kept the samples before it")
    return complete


def read_tar(path: str, on_error: Callable[[str], None]) -> Iterator[RawSample]:
    """Yield the complete samples of a tar in file order, payloads read; stop at the
    first read error, reporting it through `on_error` (a truncated tar keeps the samples
    before the break)."""
    for sample in scan_tar(path, on_error):
        assert isinstance(sample, RawSample)
        yield sample


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
    slot: Slot,
    on_error: Callable[[str], None],
    lazy_until: int = 0,
) -> Iterator[RawSample | SampleRef]:
    """The raw samples one reader (slot) takes from `shards` read in `order`: whole
    shards slot.take(order), or with fewer shards than readers every shard, keeping the
    samples whose running index falls to this slot (the others' payloads are skipped).

    The first `lazy_until` samples of this slot come as SampleRefs, their payloads not
    read: a resumed stream skips them (or loads the few it still needs)."""
    taken = 0

    def wanted(_: int) -> bool:
        return taken >= lazy_until

    if len(shards) >= slot.count:
        for j in slot.take(order):
            for raw in scan_tar(shards[j], on_error, wanted):
                taken += 1
                yield raw
        return
    running = 0
    for j in order:

        def mine(n: int, base: int = running) -> bool | None:
            return wanted(n) if slot.owns(base + n) else None

        samples = scan_tar(shards[j], on_error, mine)
        while True:
            try:
                raw = next(samples)
            except StopIteration as stop:
                running += stop.value
                break
            taken += 1
            yield raw
