"""The post-training chain on a model with two code grids (`top` f=8, `bottom` f=4):
tokenize -> index shards with one npy per grid -> manifest with each grid's K, shape
and dtype -> IndexShards and packed arrays -> --verify of both grids."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_index_shards import tool_main
from tokenize_helpers import plain_tar_samples, write_sources
from two_grid_model import BOTTOM, TOP, two_grid_tokenizer

from tokenizer import Tokenizer
from tokenizer.data.index.format import read_manifest
from tokenizer.data.index.reader import IndexShards, collate_tokens
from tokenizer.data.index.verify import verify_index
from tokenizer.data.tars import RawSample, decode_image
from tokenizer.tokenize.corpus import TokenizeOptions, tokenize_corpus

FIELDS = {TOP: "tokens_top.npy", BOTTOM: "tokens_bottom.npy"}


def tokenize(release: Path, inputs: list[str], out: Path, storage: str = "npy") -> Path:
    options = TokenizeOptions(
        str(release), inputs, str(out), batch_size=3, num_workers=0, storage=storage,
        progress=False,
    )  # fmt: skip
    tokenize_corpus(options)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grids")
    release = two_grid_tokenizer().save_pretrained(root / "release")
    sources = write_sources(root / "src", num_shards=3, per_shard=8)
    index = tokenize(release, sources.paths, root / "index")
    return {"root": root, "release": release, "sources": sources, "index": index}


def encode_source(tok: Tokenizer, fields: list[dict[str, bytes]]) -> dict[str, np.ndarray]:
    images = [decode_image(RawSample("k", "s", f), 16) for f in fields]
    codes = tok.encode_grids(tok.preprocess(images, 16))
    return {name: c.numpy() for name, c in codes.items()}


def test_the_manifest_names_each_grid_with_its_field_shape_k_and_dtype(world):
    manifest = read_manifest(world["index"])
    assert [(g.name, g.field, g.shape, g.codebook_size, g.dtype) for g in manifest.grids] == [
        (TOP, FIELDS[TOP], [2, 2], 16, "uint16"),
        (BOTTOM, FIELDS[BOTTOM], [4, 4], 32, "uint16"),
    ]
    # One number could only describe one grid: a reader of a hierarchy reads `grids`.
    assert manifest.codebook_size is None and manifest.grid_shape is None
    assert manifest.tokenizer["config"]["grids"][BOTTOM]["codebook_size"] == 32
    assert manifest.num_samples == len(world["sources"].good_keys)
    shard = manifest.shards[0]
    assert shard.packed == {
        TOP: "000000.tokens_top.npy",
        BOTTOM: "000000.tokens_bottom.npy",
        "samples": "000000.samples.jsonl",
    }


def test_every_sample_holds_one_npy_per_grid_equal_to_encode_grids(world):
    tok = Tokenizer.from_pretrained(world["release"])
    source = world["sources"].samples
    for path in sorted(world["index"].glob("*.tar")):
        out = plain_tar_samples(path)  # tarfile alone, as a prior codebase reads it
        for fields in out.values():
            assert {FIELDS[TOP], FIELDS[BOTTOM]} <= set(fields) and "tokens.npy" not in fields
        want = encode_source(tok, [source[k] for k in out])
        for grid, field in FIELDS.items():
            got = np.stack([np.load(io.BytesIO(f[field])) for f in out.values()])
            assert got.dtype == np.uint16
            np.testing.assert_array_equal(got, want[grid])


def test_index_shards_and_packed_arrays_give_both_grids(world):
    data = IndexShards(world["index"], tokenizer=Tokenizer.from_pretrained(world["release"]))
    assert data.grid_names == [TOP, BOTTOM]
    samples = list(data)
    assert [s.key for s in samples] == world["sources"].good_keys
    first = samples[0]
    assert first.grids[TOP].shape == (2, 2) and first.grids[BOTTOM].shape == (4, 4)
    with pytest.raises(ValueError, match=r"grids top, bottom: use sample\.grids\[name\]"):
        first.tokens  # noqa: B018
    batch = collate_tokens(samples[:5])
    assert batch.grids[TOP].shape == (5, 2, 2) and batch.grids[BOTTOM].dtype == torch.int64
    with pytest.raises(ValueError, match=r"use batch\.grids\[name\]"):
        batch.tokens  # noqa: B018

    packed = data.packed()
    for i, sample in enumerate(samples):
        for grid in (TOP, BOTTOM):
            np.testing.assert_array_equal(packed.tokens(i, grid), sample.grids[grid])
            np.testing.assert_array_equal(packed[i].grids[grid], sample.grids[grid])
    with pytest.raises(ValueError, match=r"use tokens\(index, grid\)"):
        packed.tokens(0)
    with pytest.raises(KeyError, match="no grid 'middle'"):
        packed.tokens(0, "middle")
    raw = np.load(world["index"] / "000002.tokens_bottom.npy", mmap_mode="r")
    np.testing.assert_array_equal(raw[0], samples[-8].grids[BOTTOM])


def test_verify_checks_every_grid(world, tmp_path, capsys):
    report = verify_index(world["index"])
    assert report.ok, report.problems
    # The tool's --verify needs no tokenizer: it reads the grids from the manifest.
    assert tool_main()(["--verify", str(world["index"])]) == 0
    assert "PROBLEM" not in capsys.readouterr().out
    damaged = tmp_path / "damaged"
    shutil.copytree(world["index"], damaged)
    codes = np.load(damaged / "000002.tokens_bottom.npy")
    codes[0, 0, 0] = (codes[0, 0, 0] + 1) % 32
    np.save(damaged / "000002.tokens_bottom.npy", codes)
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["codebook_size"] = 16  # as a single-grid reader would wish
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    problems = "\n".join(verify_index(damaged).problems)
    assert "000002.tokens_bottom.npy: row 0 differs from the tar" in problems
    assert "000002.tar: 000002.tokens_bottom.npy has changed since it was written" in problems
    assert "codebook_size is 16, its grids give None" in problems
    assert "tokens_top" not in problems


def test_each_grid_gets_the_dtype_of_its_own_k(world, tmp_path):
    # Top K = 40000 fits uint16; bottom K = 80000 needs int32.
    release = two_grid_tokenizer(codebook_size=40000).save_pretrained(tmp_path / "big")
    src = write_sources(tmp_path / "src", num_shards=1, per_shard=3)
    out = tokenize(release, src.paths, tmp_path / "out", storage="tar")
    dtypes = {g.name: g.dtype for g in read_manifest(out).grids}
    assert dtypes == {TOP: "uint16", BOTTOM: "int32"}
    [sample, *_] = list(IndexShards(out))
    assert sample.grids[TOP].dtype == np.uint16 and sample.grids[BOTTOM].dtype == np.int32
    assert verify_index(out).ok
