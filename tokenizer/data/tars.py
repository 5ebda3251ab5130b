"""Reading webdataset tar shards sample by sample, and decoding their images.

One place knows webdataset's naming rule and survives truncated tars and corrupt
images; the training stream, evaluation and the corpus tokenizer all read through it.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections.abc import Callable, Generator, Iterator
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


# A member: (name, data offset, data size, read its data). Only regular files.
_Member = tuple[str, int, int, Callable[[], bytes]]
_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # tarfile's isfile(): regular, old regular, contiguous


def _stream_members(f) -> Iterator[_Member]:
    """Members of any tar (compressed too), through tarfile's stream reader."""
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                yield member.name, member.offset_data, member.size, lambda d=data: d


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_ok(block: bytes) -> bool:
    stored = block[148:156].split(b"\0", 1)[0].strip()
    if not stored:
        return False
    # The checksum counts its own field as spaces; old tars summed signed bytes.
    expected = int(stored, 8)
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    if expected == unsigned:
        return True
    return expected == unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<value>\n" records)."""
    path, pos = None, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def _read_exactly(f, n: int) -> bytes:
    """n bytes, fewer only at the end of the file (an unbuffered read may return less)."""
    data = f.read(n)
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _seek_members(f) -> Iterator[_Member]:
    """Members of an uncompressed tar, reading 512-byte headers and seeking past the
    data (python's tarfile parses a header about ten times slower than this, which on
    resume costs more than reading small payloads). ustar, GNU long names and pax paths;
    ends where tarfile ends: at a zero block, a short or a bad header after the first."""
    pos, long_name = 0, None
    while True:
        f.seek(pos)
        block = f.read(_BLOCK)
        if len(block) < _BLOCK or block == bytes(_BLOCK) or not _header_ok(block):
            if pos == 0:
                raise tarfile.ReadError("empty file" if not block else "not a tar file")
            return
        size = _octal(block[124:136])
        kind = block[156:157]
        data_at = pos + _BLOCK
        pos = data_at + -(-size // _BLOCK) * _BLOCK
        if kind in (b"L", b"x"):  # the next member's long name / pax attributes
            f.seek(data_at)
            data = _read_exactly(f, size)
            long_name = (
                data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                if kind == b"L"
                else _pax_path(data) or long_name
            )
            continue
        if kind in (b"g", b"K"):
            continue
        name = long_name
        long_name = None
        if name is None:
            name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if block[257:263] == b"ustar\0" and block[345]:
                prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
        if kind not in _FILE_TYPES:
            continue

        def read(at: int = data_at, n: int = size) -> bytes:
            f.seek(at)
            data = _read_exactly(f, n)
            if len(data) != n:
                raise tarfile.ReadError("unexpected end of data")
            return data

        yield name, data_at, size, read


def _advise(f, skipping: bool) -> None:
    """While headers are read and payloads seeked past, kernel readahead would still read
    the payloads (it fetches 128 KB or more after each header): advise random access then,
    and normal readahead again once payloads are read."""
    advice = os.POSIX_FADV_RANDOM if skipping else os.POSIX_FADV_NORMAL
    try:
        os.posix_fadvise(f.fileno(), 0, 0, advice)
    except (AttributeError, OSError):  # not on this platform or file system: only slower
        pass


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
    skipping = False
    try:
        seekable = not _compressed(path)
        size = os.path.getsize(path)
        # Unbuffered when seeking: a buffered read of one 512-byte header fetches 8 KB.
        with open(path, "rb", buffering=0 if seekable else -1) as f:
            members = _seek_members(f) if seekable else _stream_members(f)
            for name, offset, length, read in members:
                parts = split_name(name)
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
                    if seekable and skipping != (keep is not True):
                        skipping = keep is not True
                        _advise(f, skipping)
                if offset + length > size and seekable:
                    raise tarfile.ReadError("unexpected end of data")
                if isinstance(current, SampleRef):
                    current.spans[ext] = (offset, length)
                else:
                    current.fields[ext] = read()
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
