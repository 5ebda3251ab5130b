"""Turn a folder of images (with optional `name.txt` / `name.json` sidecars) into shard
samples, checking that every image decodes and saying what is left out and why.

A file is an image when PIL decodes its extension's format here (image_check); a .txt or
.json next to an image of the same name (stem) is its caption / metadata; anything else is
skipped as a non-image. Images are decoded by a thread pool (PIL releases the GIL while
decoding) and come out in sorted path order, so keys and shards are the same every run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tokenizer.data.images.check import BadImage, check_image, readable_extensions

logger = logging.getLogger(__name__)

FOLDER_EXTENSIONS = tuple(f".{ext}" for ext in readable_extensions())
SIDECAR_EXTENSIONS = ("txt", "json")

# SkippedFile.kind
NON_IMAGE = "non-image"
BAD_IMAGE = "bad image"
BAD_SIDECAR = "bad sidecar"


def sanitize_key(relative: str) -> str:
    """A webdataset key from a relative path without suffix: no dots, safe characters."""
    parts = [re.sub(r"[^A-Za-z0-9_-]", "_", part) for part in relative.split("/") if part]
    return "/".join(parts)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str
    kind: str  # NON_IMAGE, BAD_IMAGE or BAD_SIDECAR


@dataclass(frozen=True)
class FolderScan:
    root: Path
    images: list[Path]  # sorted
    sidecars: dict[Path, dict[str, Path]]  # image -> {"txt": caption, "json": metadata}
    non_images: list[Path]  # sorted; includes .txt/.json with no image of their name


@dataclass
class PackCounts:
    images_total: int
    images_done: int = 0
    stored: int = 0
    reencoded: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)


def _extension(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def scan_folder(input_dir: str | os.PathLike) -> FolderScan:
    """Sort every file under `input_dir` (recursive) into images, sidecars and the rest."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    image_exts = {e.lstrip(".") for e in FOLDER_EXTENSIONS}
    files = sorted(p for p in root.rglob("*") if not p.is_dir())
    images = [p for p in files if _extension(p) in image_exts]
    by_stem: dict[tuple[Path, str], Path] = {}
    for path in files:
        if _extension(path) in SIDECAR_EXTENSIONS:
            by_stem.setdefault((path.with_suffix(""), _extension(path)), path)
    sidecars: dict[Path, dict[str, Path]] = {}
    for image in images:
        found = {
            ext: by_stem[(image.with_suffix(""), ext)]
            for ext in SIDECAR_EXTENSIONS
            if (image.with_suffix(""), ext) in by_stem
        }
        if found:
            sidecars[image] = found
    used = {p for found in sidecars.values() for p in found.values()}
    non_images = [p for p in files if _extension(p) not in image_exts and p not in used]
    return FolderScan(root, images, sidecars, non_images)


def non_image_reason(path: Path) -> str:
    ext = _extension(path)
    if ext in SIDECAR_EXTENSIONS:
        return f"a .{ext} with no image of the same name"
    return f"not an image (extension {path.suffix or 'none'!r})"


@dataclass(frozen=True)
class _Checked:
    path: Path
    fields: dict[str, bytes]  # empty: the image was skipped
    reencoded: bool
    skipped: list[SkippedFile]


def _read_sidecar(path: Path, ext: str) -> bytes:
    data = path.read_bytes()
    if ext == "json":
        json.loads(data)  # readers parse it: a broken one would fail there, per sample
    return data


def _check_one(image: Path, sidecars: dict[str, Path]) -> _Checked:
    try:
        checked = check_image(image.read_bytes(), image.suffix)
    except (BadImage, OSError) as err:
        reason = str(err) if isinstance(err, BadImage) else f"cannot read ({err})"
        return _Checked(image, {}, False, [SkippedFile(image, reason, BAD_IMAGE)])
    fields = {checked.field: checked.data}
    skipped = []
    for ext, path in sidecars.items():
        try:
            fields[ext] = _read_sidecar(path, ext)
        except (OSError, ValueError) as err:
            reason = (
                f"not stored ({type(err).__name__}: {err}); "
                f"{image.name} is stored without its {ext}"
            )
            skipped.append(SkippedFile(path, reason, BAD_SIDECAR))
    return _Checked(image, fields, checked.reencoded, skipped)


T = TypeVar("T")
R = TypeVar("R")


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """map() over a thread pool, results in input order, at most 4 x workers in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="image-check") as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class FolderPacker:
    """Samples for the images under `input_dir` that decode, with their sidecars.

    `counts` follows the run; `on_skip` hears of each image or sidecar left out (the
    non-images are known up front in `scan.non_images` and in `counts.skipped` from the
    start); `on_progress` is called after every image.
    """

    def __init__(
        self,
        input_dir: str | os.PathLike,
        workers: int = 1,
        on_skip: Callable[[SkippedFile], None] | None = None,
        on_progress: Callable[[PackCounts], None] | None = None,
    ) -> None:
        self.scan = scan_folder(input_dir)
        self.workers = max(1, workers)
        self.on_skip = on_skip
        self.on_progress = on_progress
        self.counts = PackCounts(len(self.scan.images))
        self.counts.skipped.extend(
            SkippedFile(p, non_image_reason(p), NON_IMAGE) for p in self.scan.non_images
        )

    def samples(self) -> Iterator[dict]:
        """The samples, once: `counts` describes a single pass."""
        if self.counts.images_done:
            raise RuntimeError("FolderPacker.samples() was already consumed; make a new packer")
        root, used = self.scan.root, set()

        def check(image: Path) -> _Checked:
            return _check_one(image, self.scan.sidecars.get(image, {}))

        for result in _ordered_map(check, self.scan.images, self.workers):
            self.counts.images_done += 1
            for skip in result.skipped:
                self.counts.skipped.append(skip)
                if self.on_skip is not None:
                    self.on_skip(skip)
            if result.fields:
                self.counts.stored += 1
                self.counts.reencoded += result.reencoded
                yield {"__key__": _unique_key(result.path, root, used), **result.fields}
            if self.on_progress is not None:
                self.on_progress(self.counts)


def _unique_key(path: Path, root: Path, used: set[str]) -> str:
    base = sanitize_key(path.relative_to(root).with_suffix("").as_posix())
    key, n = base, 1
    # "a.jpg" next to "a.png" (or "a.b.jpg" next to "a_b.jpg") would share a key.
    while key in used:
        n += 1
        key = f"{base}_{n}"
    if key != base:
        logger.warning("%s: key %r already used, stored as %r", path, base, key)
    used.add(key)
    return key


def folder_samples(input_dir: str | os.PathLike, workers: int = 1) -> Iterator[dict]:
    """One sample per image under `input_dir` that decodes (recursive, sorted); each file
    left out is logged with the reason (FolderPacker gives the counts)."""

    def warn(skip: SkippedFile) -> None:
        logger.warning("skipped %s: %s", skip.path, skip.reason)

    packer = FolderPacker(input_dir, workers=workers, on_skip=warn)
    for skip in packer.counts.skipped:
        warn(skip)
    return packer.samples()
