"""tokenizer/atomic.py: a failed write leaves the old file as it was and no temporary
file behind; a finished one replaces it whole."""

import json
import os
from pathlib import Path

import pytest

from tokenizer.atomic import (
    AtomicFile,
    atomic_path,
    temporary_path,
    temporary_target,
    write_bytes,
    write_json,
    write_text,
)


class Boom(Exception):
    pass


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writers_replace_the_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    write_text(target, "text")
    assert target.read_text() == "text"
    write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _only(tmp_path) == ["out.json"]


def _streamed(target: Path) -> None:
    with AtomicFile(target) as f:
        f.write(b"half of the new")
        assert temporary_target(f.tmp.name) == target.name
        raise Boom


def _by_path(target: Path) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")  # as save_file(tensors, tmp) would
        raise Boom


@pytest.mark.parametrize("half_write", [_streamed, _by_path])
def test_failure_mid_write_keeps_the_old_file(tmp_path: Path, half_write) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old content")
    with pytest.raises(Boom):
        half_write(target)
    assert target.read_bytes() == b"old content"
    assert _only(tmp_path) == ["file.bin"]


def test_failure_at_the_rename_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "record.json"
    write_json(target, {"v": 1})

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert _only(tmp_path) == ["record.json"]


def test_commit_is_once_and_abort_after_it_is_a_no_op(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    f = AtomicFile(target)
    f.write(b"abc")
    assert f.tell() == 3
    assert f.commit() == target
    f.abort()
    assert target.read_bytes() == b"abc"
    with pytest.raises(RuntimeError, match="already committed"):
        f.commit()


def test_a_stale_temporary_of_this_pid_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    temporary_path(target).write_text("left by a killed writer")
    write_text(target, "new")
    assert _only(tmp_path) == ["x.txt"]


def test_new_files_get_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "w") as tmp:
            tmp.write_bytes(b"")
            os.chmod(tmp, 0o600)  # as safetensors does
        write_bytes(tmp_path / "b", b"")
    finally:
        os.umask(old)
    assert (tmp_path / "w").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o640


def test_temporary_names_are_hidden_and_recognised() -> None:
    name = temporary_path(Path("/x/000001.tar")).name
    assert name == f".000001.tar.tmp-{os.getpid()}"
    assert temporary_target(name) == "000001.tar"
    assert temporary_target("000001.tar") is None
    assert temporary_target(".000001.tar.tmp") is None
