"""Files that appear whole or not at all.

Every writer here goes to a hidden temporary file next to the target (`.NAME.tmp-PID`,
same folder, so the rename cannot cross filesystems), fsyncs it, renames it over the
target and fsyncs the folder: a reader, or a run after a crash or power loss, sees
either the old file or the complete new one, never half of one. A failed write removes
its temporary file and leaves the old file as it was.

Standard library only: the release loader uses it, and must stay light.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What a killed writer leaves behind: `.NAME.tmp-PID`, NAME in the group.
_TEMPORARY = re.compile(r"\.(.+)\.tmp-\d+")


def temporary_path(path: str | os.PathLike) -> Path:
    """The hidden name next to `path` that this process writes it under."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def temporary_target(name: str) -> str | None:
    """The file name a temporary file of this module's would have become (for cleaners
    of a killed run's leftovers), or None when `name` is not one (see temporary_path)."""
    match = _TEMPORARY.fullmatch(name)
    return match.group(1) if match else None


def fsync_path(path: str | os.PathLike) -> None:
    """Make a file's content, or a folder's entries (a rename into it), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        # Some filesystems refuse fsync on a folder; a rename there is still atomic,
        # only its durability is up to the filesystem. A file's fsync must not fail.
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A fresh temporary file for `path` and the mode a new file gets here."""
    tmp = temporary_path(path)
    tmp.unlink(missing_ok=True)  # left by a killed writer that had this pid
    # O_EXCL with 0o666: the mode the umask (and default ACLs) give a new file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)
    return tmp, mode


def _put_in_place(tmp: Path, path: Path, mode: int) -> None:
    """Rename the complete, fsynced tmp over path, durably."""
    # Libraries writing by path may recreate the file with their own mode (safetensors
    # writes 0600 whatever the umask): every file gets what a new file gets here.
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s content to (for writers that take a
    file name); on a normal exit it becomes `path`, on an exception it is removed."""
    path = Path(path)
    tmp, mode = _create_temporary(path)
    try:
        yield tmp
        fsync_path(tmp)
        _put_in_place(tmp, path, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class AtomicFile:
    """A binary file being written under a temporary name: `commit()` gives it its real
    name, `abort()` (or leaving a `with` block without a commit) deletes it. For
    streaming writers (tar shards, np.save) that write piece by piece."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp, self._mode = _create_temporary(self.path)
        try:
            self._file = open(self.tmp, "wb")  # noqa: SIM115 (closed by commit / abort)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        self._done = False

    def write(self, data: bytes) -> int:
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def commit(self) -> Path:
        """Flush, fsync and rename to the real name; returns it."""
        if self._done:
            raise RuntimeError(f"{self.path}: already committed or aborted")
        self._done = True
        try:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
            _put_in_place(self.tmp, self.path, self._mode)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return self.path

    def abort(self) -> None:
        """Delete the temporary file; the old file at `path`, if any, stays. Idempotent."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with AtomicFile(path) as f:
        f.write(data)
        f.commit()


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """JSON with sorted keys and a final newline: the same data gives the same bytes."""
    write_text(path, json.dumps(data, indent=indent, sort_keys=True) + "\n")
