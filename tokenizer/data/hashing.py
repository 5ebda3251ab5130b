"""A file being written, hashed on the way: a checksum without reading the file again."""

from __future__ import annotations

import hashlib
from typing import Protocol


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class HashingWriter:
    """Passes every write on to `file` and hashes it (sha256)."""

    def __init__(self, file: Writable) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._file.write(data)

    def tell(self) -> int:  # tarfile and np.save may ask where they are
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
