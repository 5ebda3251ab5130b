"""Index shards in process: the format, plain readers, IndexShards, packed arrays, verify,
resume from partial output, refusal of another tokenizer's codes, appending a second set
of inputs, duplicate keys across shards, and checksums."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from tokenize_helpers import (
    Sources,
    expected_codes,
    plain_tar_samples,
    save_tiny_release,
    tiny_tokenizer,
    tree_bytes,
    write_sources,
)

from tokenizer import Tokenizer
from tokenizer.data.index.duplicates import DuplicateKeysError, find_duplicates
from tokenizer.data.index.format import code_dtype, keys_path, read_manifest, read_record
from tokenizer.data.index.reader import IndexShards, collate_tokens
from tokenizer.data.index.verify import verify_index
from tokenizer.tokenize.corpus import TokenizeOptions, tokenize_corpus

RES = 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("index")
    release = save_tiny_release(root / "release")
    sources = write_sources(root / "src", num_shards=3, per_shard=8)
    return {"root": root, "release": release, "sources": sources}


def run(world: dict, out: Path, storage: str = "tar", workers: int = 0, **kw) -> None:
    options = TokenizeOptions(
        tokenizer=str(kw.pop("release", world["release"])),
        inputs=kw.pop("inputs", [world["sources"].pattern]),
        output=str(out),
        batch_size=3,  # shards of 8: batches end mid-shard and shards end mid-batch
        num_workers=workers,
        storage=storage,
        progress=False,
        **kw,
    )
    tokenize_corpus(options)


@pytest.fixture(scope="module")
def npy_index(world) -> Path:
    out = world["root"] / "npy"
    run(world, out, storage="npy", workers=1)
    return out


@pytest.fixture(scope="module")
def tar_index(world) -> Path:
    out = world["root"] / "tar"
    run(world, out, storage="tar")
    return out


def copy_index(index: Path, to: Path) -> Path:
    shutil.copytree(index, to)
    return to


def tool_main():
    spec = importlib.util.spec_from_file_location("tok_ds", ROOT / "tools" / "tokenize_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_output_is_complete_with_captions_and_failures_listed(world, npy_index):
    sources: Sources = world["sources"]
    manifest = read_manifest(npy_index)
    assert [Path(s.path).name for s in manifest.shards] == [Path(p).name for p in sources.paths]
    assert [s.source for s in manifest.shards] == sources.paths
    assert manifest.num_samples == len(sources.good_keys) and manifest.num_failed == 2
    reasons = {f.key: f.reason for _, f in manifest.failed}
    assert sorted(reasons) == sorted(sources.bad)
    for key, what in sources.bad.items():
        assert what in reasons[key]
    assert manifest.dtype == "uint16" and manifest.grid_shape == [4, 4]
    assert manifest.preprocessing["resolution"] == RES
    assert manifest.tokenizer["sha256"] == Tokenizer.from_pretrained(world["release"]).fingerprint

    tok = Tokenizer.from_pretrained(world["release"])
    for shard, path in zip(manifest.shards, sources.paths, strict=True):
        out = plain_tar_samples(npy_index / shard.path)
        source = plain_tar_samples(path)
        assert list(out) == [k for k in source if k not in sources.bad]
        for key, fields in out.items():
            carried = ("txt", "json", "cls")
            assert set(fields) == {"tokens.npy"} | {e for e in source[key] if e in carried}
            for ext in carried:
                assert fields.get(ext) == source[key].get(ext)  # byte-identical, even non-UTF-8
        codes = np.stack([np.load(io.BytesIO(f["tokens.npy"])) for f in out.values()])
        want = expected_codes(tok, [source[k] for k in out], RES)
        np.testing.assert_array_equal(codes, want)


def test_plain_webdataset_and_numpy_read_the_shards(world, npy_index):
    # What a prior codebase does without this project: webdataset + numpy, nothing else.
    urls = sorted(str(p) for p in npy_index.glob("*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)
    rows = [(s["__key__"], np.load(io.BytesIO(s["tokens.npy"])), s.get("txt")) for s in dataset]
    assert [k for k, _, _ in rows] == world["sources"].good_keys
    for key, tokens, txt in rows:
        assert tokens.dtype == np.uint16 and tokens.shape == (4, 4) and tokens.max() < 32
        assert txt == world["sources"].samples[key]["txt"]
    manifest = json.loads((npy_index / "manifest.json").read_text())
    assert manifest["codebook_size"] == 32 and manifest["dtype"] == "uint16"


def test_npy_format_memory_maps_and_matches_the_tars(world, npy_index, tar_index):
    data = IndexShards(npy_index / "manifest.json")
    streamed = list(data)
    packed = data.packed()
    assert len(packed) == len(streamed) == data.num_samples
    for i, sample in enumerate(streamed):
        row = packed[i]
        assert row.key == sample.key and row.fields == sample.fields
        np.testing.assert_array_equal(row.tokens, sample.tokens)
        np.testing.assert_array_equal(packed.tokens(i), sample.tokens)
    first = packed.arrays["tokens"][0]
    assert isinstance(first, np.memmap) and first.dtype == np.uint16 and first.shape == (8, 4, 4)
    # Raw numpy, no project code: np.load with mmap_mode on the packed file.
    raw = np.load(npy_index / "000000.tokens.npy", mmap_mode="r")
    np.testing.assert_array_equal(raw[0], streamed[0].tokens)
    assert streamed[1].txt == "caf\ufffd latin-1 \ufffd"  # lossy as text, exact as bytes
    assert streamed[1].fields["txt"] == b"caf\xe9 latin-1 \xff"
    assert streamed[1].json == {"key": "img0_001", "n": 1}

    tar_only = tar_index
    for name in ("000000.tar", "000001.tar", "000002.tar"):
        assert (tar_only / name).read_bytes() == (npy_index / name).read_bytes()
    with pytest.raises(ValueError, match="--format npy"):
        IndexShards(tar_only).packed()


def test_index_shards_split_by_rank_and_worker_and_shuffle_per_epoch(npy_index):
    keys = [s.key for s in IndexShards(npy_index)]
    for nslots in (2, 4):  # fewer shards (3) than slots: samples are split instead
        parts = [
            [s.key for s in IndexShards(npy_index, rank=r, world_size=nslots, remainder="keep")]
            for r in range(nslots)
        ]
        assert Counter(k for p in parts for k in p) == Counter(keys)
    # 2 ranks x 2 DataLoader workers: every sample once over the four readers.
    loaders = [
        torch.utils.data.DataLoader(
            IndexShards(npy_index, rank=rank, world_size=2, remainder="keep"), batch_size=4,
            num_workers=2, collate_fn=collate_tokens,
        )
        for rank in range(2)
    ]  # fmt: skip
    batches = [batch for loader in loaders for batch in loader]
    assert Counter(k for batch in batches for k in batch.keys) == Counter(keys)
    assert batches[0].tokens.dtype == torch.int64 and batches[0].tokens.shape[1:] == (4, 4)

    data = IndexShards(npy_index, shuffle=True, seed=1, shuffle_buffer=5)
    epochs = []
    for epoch in range(3):
        data.set_epoch(epoch)
        epochs.append([s.key for s in data])
    assert all(sorted(e) == sorted(keys) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    data.set_epoch(1)
    assert [s.key for s in data] == epochs[1]  # an epoch's order is reproducible


def test_another_tokenizers_manifest_is_refused(world, npy_index):
    mine = Tokenizer.from_pretrained(world["release"])
    IndexShards(npy_index, tokenizer=mine)  # the right one passes
    other = tiny_tokenizer(seed=1)
    with pytest.raises(ValueError, match="not by the given one"):
        IndexShards(npy_index / "manifest.json", tokenizer=other)
    # Codes from another tokenizer never land in an existing index folder either.
    other_release = other.save_pretrained(world["root"] / "other_release")
    with pytest.raises(ValueError, match="other settings"):
        run(world, npy_index, storage="npy", release=other_release)


def test_verify_passes_clean_output_and_catches_damage(world, npy_index, tmp_path):
    report = verify_index(npy_index)
    assert report.ok, report.problems
    assert len(report.notes) == 2  # the two failed samples, listed

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name, data in tree_bytes(npy_index).items():
        (damaged / name).parent.mkdir(parents=True, exist_ok=True)
        (damaged / name).write_bytes(data)
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] += 1
    manifest["shards"][1]["failed"] = []  # two source keys neither present nor failed
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    codes = np.load(damaged / "000002.tokens.npy")
    codes[0, 0, 0] += 1
    np.save(damaged / "000002.tokens.npy", codes)
    report = verify_index(damaged)
    problems = "\n".join(report.problems)
    assert "000000.tar: 8 samples, manifest says 9" in problems
    assert "num_samples differs" in problems and "num_failed differs" in problems
    assert "'img1_002' is neither in the index nor failed" in problems
    assert "000002.tokens.npy: row 0 differs from the tar" in problems
    assert "000002.tar: 000002.tokens.npy has changed since it was written" in problems
    assert "000000.tar: its record differs from the manifest's entry" in problems
    assert not report.ok


def test_resume_redoes_partial_shards_and_equals_a_clean_run(world, npy_index, tmp_path):
    out = tmp_path / "resumed"
    for name, data in tree_bytes(npy_index).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    # What a kill leaves behind: no manifest, a shard without its record, a half-written
    # temporary, a truncated tar whose record is gone, a packed array never written.
    (out / "manifest.json").unlink()
    (out / "records" / "000001.json").unlink()
    (out / ".000001.tar.tmp-12345").write_bytes(b"partial")
    tar = out / "000002.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    (out / "records" / "000002.json").unlink()
    (out / "000002.tokens.npy").unlink()
    untouched = (out / "000000.tar").stat().st_mtime_ns

    run(world, out, storage="npy")
    assert tree_bytes(out) == tree_bytes(npy_index)
    assert (out / "000000.tar").stat().st_mtime_ns == untouched  # complete: not redone


def test_truncated_source_tar_is_recorded(world, tmp_path):
    sources = write_sources(tmp_path / "src", num_shards=1, per_shard=6)
    path = Path(sources.paths[0])
    with tarfile.open(path) as tar:
        image = [m for m in tar.getmembers() if m.name.endswith((".png", ".jpg"))][-2]
    # Cut inside a payload: a tar that ends in the zero padding after a member reads as
    # a clean end (to tarfile too), so where the cut falls must not depend on the layout.
    path.write_bytes(path.read_bytes()[: image.offset_data + image.size // 2])
    out = tmp_path / "out"
    options = TokenizeOptions(
        str(world["release"]), [str(path)], str(out), batch_size=4, num_workers=0, progress=False
    )
    tokenize_corpus(options)
    [shard] = read_manifest(out).shards
    assert shard.read_error and "read error" in shard.read_error
    assert 0 < shard.num_samples < 6
    assert verify_index(out).ok


def test_large_codebooks_write_int32(world, tmp_path):
    assert code_dtype(65536) == np.uint16 and code_dtype(65537) == np.int32
    release = save_tiny_release(tmp_path / "big", codebook_size=70000)
    src = write_sources(tmp_path / "src", num_shards=1, per_shard=3)
    out = tmp_path / "out"
    tokenize_corpus(
        TokenizeOptions(str(release), src.paths, str(out), num_workers=0, progress=False)
    )
    manifest = read_manifest(out)
    assert manifest.dtype == "int32" and manifest.codebook_size == 70000
    [sample, *_] = list(IndexShards(out))
    assert sample.tokens.dtype == np.int32
    assert verify_index(out).ok


def test_a_second_set_of_inputs_is_refused_without_append_and_appended_with_it(
    world, tar_index, tmp_path
):
    first: Sources = world["sources"]
    out = copy_index(tar_index, tmp_path / "out")
    before = (out / "manifest.json").read_bytes()
    second = write_sources(tmp_path / "b", num_shards=2, per_shard=4, prefix="b", key_prefix="b")

    # Without --append the first set would silently fall out of the manifest.
    with pytest.raises(ValueError, match=r"already indexes 3 input shards .*--append"):
        run(world, out, inputs=second.paths)
    assert (out / "manifest.json").read_bytes() == before
    assert verify_index(out).ok

    run(world, out, inputs=second.paths, append=True)
    manifest = read_manifest(out)
    assert manifest.inputs == first.paths + second.paths
    assert [s.source for s in manifest.shards] == first.paths + second.paths
    assert manifest.num_samples == len(first.good_keys) + len(second.good_keys)
    assert manifest.num_failed == 4
    assert [s.key for s in IndexShards(out)] == first.good_keys + second.good_keys
    report = verify_index(out)
    assert report.ok, report.problems
    appended = tree_bytes(out)

    # The same command again: nothing redone, the same bytes; listing every input
    # without --append is a rerun too.
    run(world, out, inputs=second.paths, append=True)
    run(world, out, inputs=first.paths + second.paths)
    assert tree_bytes(out) == appended

    # Killed in the middle of the append: the old manifest still stands, --verify says
    # the folder holds shards it does not list, and the rerun ends as the clean one.
    (out / "manifest.json").write_bytes(before)
    (out / "records" / "b000001.json").unlink()
    problems = "\n".join(verify_index(out).problems)
    assert "b000000.tar: on disk but not in the manifest" in problems
    assert "records/b000000.json: on disk but not in the manifest" in problems
    run(world, out, inputs=second.paths, append=True)
    assert tree_bytes(out) == appended

    # A new input named like a shard already in the index is refused, naming both.
    clash = write_sources(tmp_path / "c", num_shards=1, per_shard=2, key_prefix="c")
    with pytest.raises(ValueError, match="would both write 000000.tar") as err:
        run(world, out, inputs=clash.paths, append=True)
    assert first.paths[0] in str(err.value) and clash.paths[0] in str(err.value)
    assert tree_bytes(out) == appended
    # An output folder holding the inputs themselves would overwrite them.
    with pytest.raises(ValueError, match="its index shard would replace it"):
        run(world, Path(clash.paths[0]).parent, inputs=clash.paths)
    assert plain_tar_samples(clash.paths[0]).keys() == clash.samples.keys()


def test_verify_rejects_shards_and_records_the_manifest_does_not_list(tar_index, tmp_path):
    # What the run of a second set used to leave: a manifest of the second set only.
    out = copy_index(tar_index, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = manifest["shards"].pop(0)
    manifest["inputs"].remove(dropped["source"])
    manifest["num_samples"] -= dropped["num_samples"]
    manifest["num_failed"] -= len(dropped["failed"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = verify_index(out, check_sources=False)
    assert report.problems == [
        f"{name}: on disk but not in the manifest (from an unfinished or failed run, or "
        "another index?)"
        for name in ("000000.tar", "records/000000.json", "records/000000.keys.npy")
    ]

    # An input of the manifest without a shard, and a stray file, are problems too.
    (out / "records" / "000000.json").unlink()
    (out / "000000.tar").unlink()
    (out / "records" / "000000.keys.npy").unlink()
    manifest["inputs"].insert(0, dropped["source"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "extra.tokens.npy").write_bytes(b"stray")
    problems = "\n".join(verify_index(out, check_sources=False).problems)
    assert "1 input shards have no index shard" in problems
    assert "extra.tokens.npy: on disk but not in the manifest" in problems


def test_duplicate_keys_across_shards_stop_tokenize_naming_keys_and_shards(
    world, tar_index, tmp_path, capsys
):
    first: Sources = world["sources"]
    # Shard d000000.tar repeats the keys img0_000..img0_007 of the first set's shard 0.
    dup = write_sources(tmp_path / "d", num_shards=1, per_shard=8, prefix="d", seed=5)
    a, d = first.paths[0], dup.paths[0]
    out = tmp_path / "fresh"
    main = tool_main()
    argv = ["--tokenizer", str(world["release"]), "--input", a, d, "--output", str(out)]
    assert main([*argv, "--num-workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: 8 keys appear in more than one shard" in err
    assert f"'img0_000' in {a} and {d}" in err and f"'img0_007' in {a} and {d}" in err
    assert "no manifest written" in err
    assert not (out / "manifest.json").exists()
    assert not verify_index(out).ok  # tokenize and --verify agree: no index here

    # Against keys already in the index: the existing manifest stays as it was.
    index = copy_index(tar_index, tmp_path / "index")
    before = (index / "manifest.json").read_bytes()
    with pytest.raises(DuplicateKeysError, match=f"'img0_003' in {a} and {d}") as caught:
        run(world, index, inputs=[d], append=True)
    assert [x.key for x in caught.value.duplicates] == [f"img0_{j:03d}" for j in range(8)]
    assert (index / "manifest.json").read_bytes() == before
    problems = "\n".join(verify_index(index).problems)
    assert "d000000.tar: on disk but not in the manifest" in problems


def test_duplicates_are_named_from_keys_and_a_digest_collision_is_no_duplicate(tar_index):
    manifest = read_manifest(tar_index)
    records = manifest.shards[:2]
    digests = [np.load(keys_path(tar_index, r.path)) for r in records]
    assert find_duplicates(tar_index, records, digests, pytest.fail) == []
    # Two different keys whose digests (forged here) collide: the second pass reads the
    # keys themselves and finds no duplicate.
    forged = [d.copy() for d in digests]
    forged[1][0] = forged[0][0]
    assert find_duplicates(tar_index, records, forged, pytest.fail) == []
    # The same key in both: named, with both sources.
    twice = [digests[0], np.concatenate([digests[1], digests[0][:1]])]
    assert find_duplicates(tar_index, records, twice, pytest.fail) == []  # not in the tar
    same = [records[0], records[0]]
    [found] = find_duplicates(tar_index, same, [digests[0][:1], digests[0][:1]], pytest.fail)
    assert found.key == "img0_000" and found.sources == [records[0].source] * 2


def _flip_a_code_bit(tar_path: Path, key: str) -> None:
    """Flips the low bit of the last code of `key`'s tokens.npy, inside the tar: the code
    stays in range, so only a checksum can tell."""
    with tarfile.open(tar_path) as tar:
        member = tar.getmember(f"{key}.tokens.npy")
    at = member.offset_data + member.size - 2  # low byte of the last uint16 code
    data = bytearray(tar_path.read_bytes())
    data[at] ^= 1
    tar_path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_tokens_npy_inside_a_tar_fails_verify(tar_index, tmp_path, capsys):
    out = copy_index(tar_index, tmp_path / "flipped")
    before = plain_tar_samples(out / "000001.tar")["img1_000"]["tokens.npy"]
    _flip_a_code_bit(out / "000001.tar", "img1_000")
    after = plain_tar_samples(out / "000001.tar")["img1_000"]["tokens.npy"]
    codes, original = np.load(io.BytesIO(after)), np.load(io.BytesIO(before))
    assert (codes != original).sum() == 1 and codes.max() < 32  # a valid-looking code

    for check_sources in (True, False):
        report = verify_index(out, check_sources=check_sources)
        assert report.problems == [
            "000001.tar: 000001.tar has changed since it was written (sha256 differs from "
            "the record): damaged; delete records/000001.json and rerun the tokenize "
            "command to rewrite the shard"
        ]
    assert tool_main()(["--verify", str(out), "--skip-sources"]) == 1
    printed = capsys.readouterr().out
    assert "PROBLEM: 000001.tar: 000001.tar has changed" in printed
    assert "FAILED (1 problems)" in printed

    # What the message says mends it: the shard is rewritten, the index is whole again.
    (out / "records" / "000001.json").unlink()
    tokenize_corpus(
        TokenizeOptions(
            str(read_manifest(out).tokenizer["source"]),
            read_manifest(out).inputs,
            str(out),
            batch_size=3,
            num_workers=0,
            progress=False,
        )
    )
    assert tree_bytes(out) == tree_bytes(tar_index)


def test_records_carry_the_sha256_of_every_file(npy_index):
    record = read_record(npy_index, "000001.tar")
    assert sorted(record.checksums) == [
        "000001.samples.jsonl",
        "000001.tar",
        "000001.tokens.npy",
    ]
    for name, digest in record.checksums.items():
        assert hashlib.sha256((npy_index / name).read_bytes()).hexdigest() == digest
    assert read_manifest(npy_index).shards[1] == record
