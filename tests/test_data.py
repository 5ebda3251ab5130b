"""The image stream: exact epochs, rank/worker splits, bad data, resume, eval, shard tools."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ShardSet, png_bytes, write_test_shards
from PIL import Image
from tokenize_helpers import plain_tar_samples

from tokenizer.config import DataConfig
from tokenizer.data.order import shard_order
from tokenizer.data.shard_specs import check_shards_exist, expand_shards
from tokenizer.data.stream import (
    ImageBatch,
    iter_eval_batches,
    iter_train_batches,
    make_train_loader,
)
from tokenizer.data.writer import write_shards

RES = 16
ROOT = Path(__file__).resolve().parents[1]


def train_stream(
    shards: list[str], rank=0, world_size=1, stream=0, num_streams=1, **kw
) -> Iterator[ImageBatch]:
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("batch_size", 1)
    return iter_train_batches(
        shards, RES, seed=0, rank=rank, world_size=world_size, stream=stream,
        num_streams=num_streams, **kw,
    )  # fmt: skip


def keys_per_epoch(batches: Iterator[ImageBatch], epochs: int) -> dict[int, list[str]]:
    """Keys of a batch_size=1 stream grouped by epoch, for epochs 0..epochs-1."""
    out: dict[int, list[str]] = {e: [] for e in range(epochs)}
    for batch in batches:
        if batch.epoch >= epochs:
            return out
        out[batch.epoch].extend(batch.keys)
    raise AssertionError("a training stream ended")


def test_single_stream_yields_every_sample_once_per_epoch(shard_set: ShardSet):
    epochs = keys_per_epoch(train_stream(shard_set.paths), epochs=3)
    for keys in epochs.values():
        assert sorted(keys) == sorted(shard_set.keys)
    assert len({tuple(keys) for keys in epochs.values()}) == 3  # every epoch its own order


def test_batches_are_images_in_range_with_captions(shard_set: ShardSet):
    batch = next(train_stream(shard_set.paths, batch_size=5))
    assert batch.images.shape == (5, 3, RES, RES) and batch.images.dtype == torch.float32
    assert -1.0 <= batch.images.min() < batch.images.max() <= 1.0
    assert batch.texts == [f"caption of {k}" for k in batch.keys]
    assert (batch.epoch, batch.next_index, batch.skipped) == (0, 5, 0)


@pytest.mark.parametrize("num_shards", [6, 3], ids=["shards>=slots", "fewer-shards-than-slots"])
def test_ranks_x_workers_are_disjoint_and_complete(tmp_path: Path, num_shards: int):
    shards = write_test_shards(tmp_path, num_shards=num_shards, per_shard=10)
    per_slot = [
        keys_per_epoch(train_stream(shards.paths, rank, 2, worker, 2), epochs=2)
        for rank in range(2)
        for worker in range(2)
    ]
    for epoch in range(2):
        union = Counter(k for slot in per_slot for k in slot[epoch])
        assert sorted(union) == sorted(shards.keys)
        assert set(union.values()) == {1}
        assert all(slot[epoch] for slot in per_slot)  # nobody starves


def test_shard_order_differs_between_epochs_and_matches_across_ranks(tmp_path: Path):
    shards = write_test_shards(tmp_path, num_shards=8, per_shard=3)
    orders = [shard_order(0, epoch, 8) for epoch in range(3)]
    assert len({tuple(order) for order in orders}) == 3  # no two epochs alike
    assert shard_order(0, 1, 8) == orders[1]  # a pure function of (seed, epoch): every rank agrees
    for rank in range(2):
        # Without a shuffle buffer the key sequence shows the shard reading order.
        epochs = keys_per_epoch(train_stream(shards.paths, rank, 2, shuffle_buffer=0), epochs=3)
        for epoch, keys in epochs.items():
            read = list(dict.fromkeys(int(k[1 : k.index("_")]) for k in keys))
            assert read == orders[epoch][rank::2]


def test_bad_image_and_truncated_tar_are_skipped_and_counted(tmp_path: Path):
    shards = write_test_shards(tmp_path / "ok", num_shards=3, per_shard=10)
    rng = __import__("numpy").random.default_rng(1)
    bad = [
        {"__key__": "bad_000", "png": png_bytes(rng)},
        {"__key__": "bad_001", "png": b"\x89PNG\r\n\x1a\n this is not a png"},
        {"__key__": "bad_002", "txt": "no image field"},
        {"__key__": "bad_003", "jpg": png_bytes(rng)},  # misnamed, PIL sniffs the content
    ]
    [bad_shard] = write_shards(bad, tmp_path / "bad", samples_per_shard=10)
    truncated = tmp_path / "ok" / "000001.tar"
    with tarfile.open(truncated) as tar:
        member = tar.getmembers()[2 * 6]  # the png of the 7th sample
    data = truncated.read_bytes()[: member.offset_data + member.size // 2]
    truncated.write_bytes(data)

    paths = shards.paths + [bad_shard.path]
    good = set(shards.keys_by_shard[0] + shards.keys_by_shard[2]) | {"bad_000", "bad_003"}
    good |= set(shards.keys_by_shard[1][:6])
    expected_bad = 3  # undecodable, no image, truncated tar

    eval_batches = list(iter_eval_batches(paths, RES, batch_size=4))
    assert sorted(k for b in eval_batches for k in b.keys) == sorted(good)
    assert sum(b.skipped for b in eval_batches) == expected_bad

    cfg = DataConfig(resolution=RES, num_workers=0, shuffle_buffer=4)
    loader, tracker = make_train_loader(cfg, paths, batch_size=1, seed=0, rank=0, world_size=1)
    seen = []
    for batch in loader:
        tracker.update(batch)
        if batch.epoch == 1:
            break
        seen.extend(batch.keys)
    assert sorted(seen) == sorted(good)
    # Every bad sample of epoch 0 is counted by now, and so are the ones epoch 1 read
    # before its first good sample: the first epoch-1 batch (batch_size 1) holds that
    # sample, at raw index next_index - 1, and carries the bad decodes before it. (Epoch
    # 1's tar break is not among them: at most 2 bad decodes lead, emitted within 7 reads
    # of the buffer of 4, and the break comes after at least 6 good reads of its shard.)
    leading_bad = batch.next_index - 1
    assert tracker.bad_samples == expected_bad + leading_bad


def test_stream_of_only_bad_samples_raises_instead_of_spinning(tmp_path: Path):
    [info] = write_shards([{"__key__": "x", "png": b"junk"}], tmp_path)
    with pytest.raises(RuntimeError, match="no decodable image"):
        next(train_stream([info.path]))


def test_missing_shard_is_refused_with_its_path(shard_set: ShardSet, tmp_path: Path):
    missing = str(tmp_path / "nowhere" / "000099.tar")
    with pytest.raises(FileNotFoundError, match="000099.tar"):
        check_shards_exist(shard_set.paths + [missing])
    cfg = DataConfig(resolution=RES, num_workers=0)
    with pytest.raises(FileNotFoundError, match="000099.tar"):
        make_train_loader(cfg, shard_set.paths + [missing], 4, 0, 0, 1)
    with pytest.raises(FileNotFoundError, match="000099.tar"):
        iter_eval_batches([missing], RES, 4)
    check_shards_exist([])  # optional eval shards may be absent
    with pytest.raises(ValueError, match="no training shards"):
        make_train_loader(cfg, [], 4, 0, 0, 1)


def test_expand_shards_braces_strings_and_lists():
    assert expand_shards("d/{000000..000002}.tar") == [f"d/00000{i}.tar" for i in range(3)]
    assert expand_shards(["a/{0..1}.tar", "b.tar"]) == ["a/0.tar", "a/1.tar", "b.tar"]
    assert expand_shards(None) == []


def _take(loader, tracker, n: int) -> list[ImageBatch]:
    batches = []
    for batch in islice(loader, n):
        tracker.update(batch)
        batches.append(batch)
    return batches


@pytest.mark.parametrize("stop", [13, 20])
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(shard_set: ShardSet, stop: int):
    # 2 workers x 30 samples per epoch, batch 4: epochs end mid-batch, and the stops fall
    # before and after the first epoch boundary of each stream.
    cfg = DataConfig(resolution=RES, num_workers=2, shuffle_buffer=8, random_flip=True)
    total = 34

    def fresh(state=None):
        return make_train_loader(cfg, shard_set.paths, 4, seed=3, rank=0, world_size=1, state=state)

    loader, tracker = fresh()
    reference = _take(loader, tracker, total)
    del loader
    assert max(b.epoch for b in reference) >= 2

    loader, tracker = fresh()
    first = _take(loader, tracker, stop)
    state = json.loads(json.dumps(tracker.state_dict()))  # must survive a JSON checkpoint
    # The shards read to their end so far: the resume skips them without opening them.
    assert state["shard_sizes"] and set(state["shard_sizes"].values()) == {10}
    del loader
    loader, tracker = fresh(state)
    rest = _take(loader, tracker, total - stop)
    del loader

    resumed = first + rest
    assert [b.keys for b in resumed] == [b.keys for b in reference]
    assert [b.stream for b in resumed] == [b.stream for b in reference]
    for a, b in zip(resumed, reference, strict=True):
        assert torch.equal(a.images, b.images)  # same crops and flips
    assert tracker.batches_consumed == total


def test_resume_state_of_another_rank_is_refused(shard_set: ShardSet):
    cfg = DataConfig(resolution=RES, num_workers=0)
    _, tracker = make_train_loader(cfg, shard_set.paths, 4, seed=0, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        make_train_loader(cfg, shard_set.paths, 4, 0, 0, 2, state=tracker.state_dict())


@pytest.mark.parametrize("num_shards", [6, 1])
def test_eval_is_deterministic_and_splits_across_ranks(tmp_path: Path, num_shards: int):
    shards = write_test_shards(tmp_path, num_shards=num_shards, per_shard=5)
    runs = [
        list(iter_eval_batches(shards.paths, RES, batch_size=4, rank=0, world_size=2))
        for _ in range(2)
    ]
    assert [b.keys for b in runs[0]] == [b.keys for b in runs[1]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(*runs, strict=True))
    rank1 = list(iter_eval_batches(shards.paths, RES, batch_size=4, rank=1, world_size=2))
    keys = [k for b in runs[0] + rank1 for k in b.keys]
    assert sorted(keys) == sorted(shards.keys)
    assert len(set(keys)) == len(keys)


def test_writer_refuses_dotted_keys_and_leaves_no_temp_files(tmp_path: Path):
    with pytest.raises(ValueError, match="dot"):
        write_shards([{"__key__": "a.b", "txt": "x"}], tmp_path)
    assert list(tmp_path.iterdir()) == []
    infos = write_shards(
        ({"__key__": f"k{i}", "txt": str(i)} for i in range(5)), tmp_path, samples_per_shard=2
    )
    assert [Path(s.path).name for s in infos] == ["000000.tar", "000001.tar", "000002.tar"]
    assert [s.num_samples for s in infos] == [2, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.tar", "000001.tar", "000002.tar"]


def _make_shards_main():
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_make_shards_sample_images(tmp_path: Path, capsys):
    main = _make_shards_main()
    out = tmp_path / "demo"
    argv = ["--sample-images", "--output", str(out), "--resolution", "32", "--train-crops", "256"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    train = sorted((out / "train").glob("*.tar"))
    evals = sorted((out / "eval").glob("*.tar"))
    assert len(train) >= 8 and evals
    assert f"{out}/train/{{000000..{len(train) - 1:06d}}}.tar" in printed

    train_samples = {k: v for p in train for k, v in plain_tar_samples(str(p)).items()}
    eval_samples = {k: v for p in evals for k, v in plain_tar_samples(str(p)).items()}
    assert len(train_samples) == 256
    train_sources = {json.loads(s["json"])["source"] for s in train_samples.values()}
    eval_sources = {json.loads(s["json"])["source"] for s in eval_samples.values()}
    assert eval_sources == {"chelsea", "flower"}
    assert not train_sources & eval_sources and len(train_sources) >= 5
    some = next(iter(train_samples.values()))
    source = json.loads(some["json"])["source"]
    assert some["txt"].decode().startswith("a 32x32 crop of the") and source in some["txt"].decode()

    batch = next(iter_eval_batches([str(p) for p in evals], 32, batch_size=8))
    assert batch.images.shape == (8, 3, 32, 32)

    # A complete set is reused, not rebuilt.
    stamp = train[0].stat().st_mtime_ns
    assert main(argv) == 0
    assert "reused" in capsys.readouterr().out
    assert train[0].stat().st_mtime_ns == stamp


def test_make_shards_from_folder_round_trips_bytes_and_captions(tmp_path: Path, capsys):

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    first, second = png_bytes(rng), png_bytes(rng)
    (folder / "cat.png").write_bytes(first)
    (folder / "cat.txt").write_text("a cat")
    (folder / "sub" / "dog.v2.png").write_bytes(second)
    (folder / "notes.md").write_text("not an image")

    out = tmp_path / "shards"
    assert _make_shards_main()(["--input", str(folder), "--output", str(out)]) == 0
    assert "wrote 2 samples in 1 shards" in capsys.readouterr().out
    samples = plain_tar_samples(str(out / "000000.tar"))
    assert samples == {"cat": {"png": first, "txt": b"a cat"}, "sub/dog_v2": {"png": second}}


def test_demo_quadrants_tile_the_photo_exactly():
    from tokenizer.data.demo import Photo, quadrants

    pixels = np.random.default_rng(0).integers(0, 256, (7, 10, 3), dtype=np.uint8)
    q = quadrants(Photo("p", "test", pixels))
    top = np.concatenate([q["top-left"].pixels, q["top-right"].pixels], axis=1)
    bottom = np.concatenate([q["bottom-left"].pixels, q["bottom-right"].pixels], axis=1)
    assert np.array_equal(np.concatenate([top, bottom], axis=0), pixels)
    assert q["bottom-right"].origin == (5, 3) and q["bottom-right"].size == (10, 7)


def test_demo_regions_split_holds_out_disjoint_quadrants(tmp_path: Path):
    from tokenizer.data.demo import build_demo_set

    demo = build_demo_set(tmp_path, resolution=32, train_crops=512, eval_crops=256, split="regions")
    metas = {
        part: [json.loads(s["json"]) for p in shards for s in plain_tar_samples(p).values()]
        for part, shards in (("train", demo.train_shards), ("eval", demo.eval_shards))
    }
    assert {m["region"] for m in metas["train"]} == {"top-left", "bottom-right"}
    assert {m["region"] for m in metas["eval"]} == {"top-right", "bottom-left"}
    sources = {part: {m["source"] for m in ms} for part, ms in metas.items()}
    # The same photographs on both sides (only their regions differ), none held out whole.
    assert sources["train"] == sources["eval"] and len(sources["train"]) >= 10
    assert not sources["train"] & {"chelsea", "flower"}
    # Every crop lies inside its own quadrant: no eval crop shares a pixel with a training
    # crop (0.1 px of slack for the rounding of the recorded boxes).
    for m in metas["train"] + metas["eval"]:
        width, height = m["photo_size"]
        cx, cy = width // 2, height // 2
        left, top, right, bottom = m["box"]
        if m["region"].endswith("left"):
            assert right <= cx + 0.1, m
        else:
            assert left >= cx - 0.1, m
        if m["region"].startswith("top"):
            assert bottom <= cy + 0.1, m
        else:
            assert top >= cy - 0.1, m
    with pytest.raises(ValueError, match="unknown demo split 'pixels'"):
        build_demo_set(tmp_path / "x", split="pixels")


def _colour_photograph_files() -> set[str]:
    """Every colour image file scikit-image and scikit-learn ship, by stem."""
    import skimage.data
    import sklearn.datasets

    folders = [Path(skimage.data.__file__).parent]
    folders.append(Path(sklearn.datasets.__file__).parent / "images")
    stems = set()
    for folder in folders:
        for path in folder.iterdir():
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
            if (pixels.max(-1) - pixels.min(-1)).mean() > 2:  # any colour at all
                stems.add(path.stem)
    return stems


def test_demo_uses_every_colour_photograph_shipped():
    from tokenizer.data.demo import HELD_OUT, load_sample_photos

    # Colour files that are not photographs: a colour wheel and a logo.
    synthetic = {"color", "logo"}
    file_to_name = {"ihc": "immunohistochemistry"}
    shipped = {file_to_name.get(s, s) for s in _colour_photograph_files() - synthetic}
    assert {"motorcycle_left", "motorcycle_right", "china", "astronaut"} <= shipped
    names = {p.name for p in load_sample_photos()}
    assert shipped <= names, shipped - names
    assert set(HELD_OUT) <= shipped  # held out photographs are colour ones too


def test_demo_photos_split_trains_on_all_but_the_held_out(tmp_path: Path):
    from tokenizer.data.demo import HELD_OUT, build_demo_set, load_sample_photos

    demo = build_demo_set(tmp_path, resolution=32, train_crops=512, eval_crops=64)
    sources = {
        part: {
            json.loads(s["json"])["source"] for p in shards for s in plain_tar_samples(p).values()
        }
        for part, shards in (("train", demo.train_shards), ("eval", demo.eval_shards))
    }
    everything = {p.name for p in load_sample_photos()}
    assert sources["eval"] == set(HELD_OUT)
    assert sources["train"] == everything - set(HELD_OUT)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["params"]["version"] == 2  # sets built before the motorcycles: rebuilt
