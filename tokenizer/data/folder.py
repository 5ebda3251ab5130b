"""Turn a folder of images (with optional `name.txt` captions) into shard samples."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def sanitize_key(relative: str) -> str:
    """A webdataset key from a relative path without suffix: no dots, safe characters."""
    parts = [re.sub(r"[^A-Za-z0-9_-]", "_", part) for part in relative.split("/") if part]
    return "/".join(parts)


def folder_samples(input_dir: str | os.PathLike) -> Iterator[dict]:
    """One sample per image under `input_dir` (recursive, sorted), bytes stored as they are."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    used: set[str] = set()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_EXTENSIONS):
        if not path.is_file():
            continue
        base = sanitize_key(path.relative_to(root).with_suffix("").as_posix())
        key, n = base, 1
        # "a.jpg" next to "a.png" (or "a.b.jpg" next to "a_b.jpg") would share a key.
        while key in used:
            n += 1
            key = f"{base}_{n}"
        if key != base:
            logger.warning("%s: key %r already used, stored as %r", path, base, key)
        used.add(key)
        sample = {"__key__": key, path.suffix.lower().lstrip("."): path.read_bytes()}
        caption = path.with_suffix(".txt")
        if caption.is_file():
            sample["txt"] = caption.read_bytes()
        yield sample
