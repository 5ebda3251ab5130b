"""A resumed shard stream passes over what it consumed before without reading it: tar
headers are read and payloads seeked past, and whole shards whose sizes the stream
reported earlier are not opened at all; the samples that follow are the uninterrupted ones."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

import tokenizer.data.slot_samples as slot_samples_module
from tokenizer.data.shard_stream import StreamPosition, StreamSpec, iter_shard_stream
from tokenizer.data.slot_samples import CountedRef, _ShardHeaders
from tokenizer.data.slots import reader_slot
from tokenizer.data.writer import write_shards

SHARDS, PER_SHARD, BUFFER = 6, 10, 8


@pytest.fixture()
def shards(tmp_path: Path) -> list[str]:
    samples = (
        {"__key__": f"s{i:03d}", "bin": f"payload {i}".encode() * (i % 7 + 1)}
        for i in range(SHARDS * PER_SHARD)
    )
    infos = write_shards(samples, tmp_path, samples_per_shard=PER_SHARD)
    return [str(info.path) for info in infos]


def _payload(raw, place) -> bytes:
    return raw.fields["bin"]


def _items(shards, start=None, sizes=None) -> list:
    spec = StreamSpec(shards, seed=5, shuffle_buffer=BUFFER, epochs=1)
    return list(iter_shard_stream(spec, _payload, reader_slot(0, 1), start, shard_sizes=sizes))


def _opened(monkeypatch) -> list[str]:
    opened: list[str] = []
    scan = slot_samples_module.scan_tar

    def recording(path, *args, **kwargs):
        opened.append(path)
        return (yield from scan(path, *args, **kwargs))

    monkeypatch.setattr(slot_samples_module, "scan_tar", recording)
    return opened


@pytest.mark.parametrize("cut", [0, 7, 45, 59])
def test_resume_with_shard_sizes_skips_whole_shards_and_continues_exactly(shards, cut, monkeypatch):
    reference = _items(shards)
    assert len(reference) == SHARDS * PER_SHARD
    sizes = dict(size for item in reference for size in item.shard_sizes)
    assert sizes == dict.fromkeys(range(SHARDS), PER_SHARD)  # every shard, once read whole

    opened = _opened(monkeypatch)
    resumed = _items(shards, StreamPosition(0, cut), sizes)
    expected = reference[cut:]
    assert [(i.index, i.key, i.value) for i in resumed] == [
        (i.index, i.key, i.value) for i in expected
    ]
    # Shards that lie wholly before the resume point (and the shuffle buffer after it)
    # are opened only when a sample still in the buffer comes from them.
    if cut >= 45:
        assert len(set(opened)) < SHARDS, opened


def test_a_truncated_shard_reports_no_size(tmp_path: Path, shards):
    broken = Path(shards[2])
    with tarfile.open(broken) as tar:
        cut_at = tar.getmembers()[5].offset_data + 3  # inside the 6th sample's payload
    broken.write_bytes(broken.read_bytes()[:cut_at])
    items = _items(shards)
    sizes = dict(size for item in items for size in item.shard_sizes)
    assert 2 not in sizes and len(sizes) == SHARDS - 1
    assert sum(item.skipped for item in items) == 1  # the break, counted once


def test_a_shard_that_lost_samples_since_is_refused_by_name(shards):
    with tarfile.open(shards[0]) as tar:
        assert len(tar.getmembers()) == PER_SHARD
    ref = CountedRef(_ShardHeaders(shards[0]), PER_SHARD + 1)
    with pytest.raises(OSError, match=r"000000.*held more before the resume"):
        ref.load()
    assert CountedRef(_ShardHeaders(shards[0]), 3).load().fields["bin"].startswith(b"payload")
