"""Training shards written through webdataset's TarWriter: byte-identical whatever the
clock says, fixed header fields, long and non-ASCII keys, nothing left on a failure."""

import tarfile
import time
from pathlib import Path

import pytest

from tokenizer.data.tars import read_tar
from tokenizer.data.writer import TarShardWriter, write_shards

SAMPLES = [
    {"__key__": f"dir/s{i:02d}", "png": bytes([i]) * (100 + i), "txt": f"caption {i}"}
    for i in range(5)
] + [{"__key__": "d" * 150 + "/ümlaut", "json": "{}"}]


def test_shards_do_not_depend_on_the_clock(tmp_path: Path, monkeypatch) -> None:
    first = write_shards(SAMPLES, tmp_path / "a", samples_per_shard=4)
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)
    second = write_shards(SAMPLES, tmp_path / "b", samples_per_shard=4)
    for a, b in zip(first, second, strict=True):
        assert Path(a.path).read_bytes() == Path(b.path).read_bytes()
        assert a.sha256 == b.sha256 and a.num_bytes == Path(a.path).stat().st_size


def test_headers_are_fixed_and_long_names_survive(tmp_path: Path) -> None:
    [_, last] = write_shards(SAMPLES, tmp_path, samples_per_shard=4)
    with tarfile.open(last.path) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uname, m.gname, m.uid, m.gid, m.mode) for m in members} == {
        (1_700_000_000, "", "", 0, 0, 0o444)
    }
    keys = [sample.key for sample in read_tar(last.path, pytest.fail)]
    assert keys == ["dir/s04", "d" * 150 + "/ümlaut"]


def test_an_unfinished_shard_leaves_nothing(tmp_path: Path) -> None:
    with (
        pytest.raises(TypeError, match="expected bytes or str"),
        TarShardWriter(tmp_path / "000000.tar") as writer,
    ):
        writer.add(SAMPLES[0])
        writer.add({"__key__": "bad", "cls": 3})
    assert list(tmp_path.iterdir()) == []
