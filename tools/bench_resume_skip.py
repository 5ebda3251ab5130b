r"""What a resume at 90% of an epoch costs, against reading that 90%.

    python tools/bench_resume_skip.py [--samples 2000] [--kb 100] [--fraction 0.9]

Writes shards of real JPEGs (noise images of about --kb KB each) to a temporary folder,
then measures through the training stream itself (tokenizer.data.shard_stream):

- skip: a stream resumed at `fraction` of the epoch as training resumes it, with the
  shard sizes its checkpoint holds, time to its first sample (shards consumed whole are
  not opened; the rest of the way it reads tar headers and seeks past payloads);
- headers: the same resume without shard sizes (a checkpoint written before they were
  kept): every consumed header read, every consumed payload seeked past;
- read: the same samples consumed from the start with their payloads read (what a
  resume cost before: every consumed payload was read);
- decode: PIL decoding of those images, timed on a subset and scaled (what consuming
  them in training costs at the least).

Before each measurement the shard files are dropped from the page cache
(posix_fadvise DONTNEED) so that reads come from the disk, as after a restart on a
cluster node; where the kernel ignores the advice the figures are warm-cache ones.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Runs as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.data.shard_stream import StreamPosition, StreamSpec, iter_shard_stream  # noqa: E402
from tokenizer.data.slots import reader_slot  # noqa: E402
from tokenizer.data.tars import RawSample  # noqa: E402
from tokenizer.data.writer import write_shards  # noqa: E402


def _jpegs(kb: int, distinct: int = 16) -> list[bytes]:
    """`distinct` noise JPEGs of about `kb` KB (noise compresses badly: size ~ pixels)."""
    rng = np.random.default_rng(0)
    side = 64
    out: list[bytes] = []
    while side < 4096:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        if buf.tell() >= kb * 1024:
            break
        side = int(side * 1.2)
    for i in range(distinct):
        pixels = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _drop_cache(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _payload_size(raw: RawSample, place) -> int:
    return sum(len(v) for v in raw.fields.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--kb", type=int, default=100, help="approximate JPEG size")
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--fraction", type=float, default=0.9)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    args = parser.parse_args()

    images = _jpegs(args.kb)
    with tempfile.TemporaryDirectory() as tmp:
        samples = (
            {"__key__": f"{i:08d}", "jpg": images[i % len(images)]} for i in range(args.samples)
        )
        infos = write_shards(samples, tmp, samples_per_shard=args.per_shard)
        shards = [s.path for s in infos]
        total_mb = sum(os.path.getsize(p) for p in shards) / 2**20
        cut = int(args.fraction * args.samples)
        spec = StreamSpec(shards=shards, seed=0, shuffle_buffer=args.shuffle_buffer, epochs=1)
        slot = reader_slot(0, 1)
        print(f"{len(infos)} shards, {args.samples} samples, {total_mb:.0f} MB; resume at {cut}")

        _drop_cache(shards)
        started = time.perf_counter()
        stream = iter_shard_stream(spec, _payload_size, slot)
        read_bytes = 0
        sizes: dict[int, int] = {}  # what the stream reports as it goes, as checkpointed
        for n, item in enumerate(stream):
            read_bytes += item.value or 0
            sizes.update(item.shard_sizes)
            if n + 1 == cut:
                break
        read_s = time.perf_counter() - started

        def resume(known: dict[int, int] | None) -> float:
            _drop_cache(shards)
            started = time.perf_counter()
            start = StreamPosition(0, cut)
            first = next(iter_shard_stream(spec, _payload_size, slot, start, shard_sizes=known))
            assert first.index == cut, (first.index, cut)
            return time.perf_counter() - started

        headers_s = resume(None)
        skip_s = resume(sizes)

        subset = min(200, cut)
        started = time.perf_counter()
        for i in range(subset):
            Image.open(io.BytesIO(images[i % len(images)])).convert("RGB").load()
        decode_s = (time.perf_counter() - started) / subset * cut

    print(f"read   {read_s:8.3f} s  ({read_bytes / 2**20:.0f} MB of payloads, {cut} samples)")
    print(f"decode {decode_s:8.3f} s  (scaled from {subset} decodes)")
    print(f"headers {headers_s:7.3f} s  (resume at sample {cut}, no shard sizes: every header "
          "read, payloads seeked past)")  # fmt: skip
    print(f"skip   {skip_s:8.3f} s  (resume at sample {cut} with the {len(sizes)} shard sizes a "
          "checkpoint holds: shards before it not opened)")  # fmt: skip
    print(f"headers / read = {headers_s / read_s:.4f}")
    print(f"skip / read = {skip_s / read_s:.4f}   skip / decode = {skip_s / decode_s:.4f}")


if __name__ == "__main__":
    main()
