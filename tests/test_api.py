"""Release format: save_pretrained / from_pretrained, and refusal of mismatched weights."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tokenizer import Tokenizer, build_model, load_config
from tokenizer.api import weights_fingerprint
from tokenizer.data.images.transforms import eval_transform
from tokenizer.models.base import SINGLE_GRID
from tokenizer.release import release_fingerprint

OVERRIDES = [
    "model.channels=[8,16]",
    "model.res_channels=8",
    "quantizer.codebook_size=32",
    "quantizer.code_dim=4",
    "data.resolution=16",
]


@pytest.fixture
def tok() -> Tokenizer:
    torch.manual_seed(0)
    cfg = load_config(overrides=OVERRIDES)
    return Tokenizer(build_model(cfg), cfg)


def test_round_trip_gives_identical_codes(tok, tmp_path):
    images = torch.rand(2, 3, 16, 16)
    tok.save_pretrained(tmp_path / "rel")
    loaded = Tokenizer.from_pretrained(tmp_path / "rel")
    assert torch.equal(loaded.encode(images), tok.encode(images))
    assert torch.equal(loaded.decode(tok.encode(images)), tok.decode(tok.encode(images)))
    config = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert config["codebook_size"] == 32 and config["downsample_factor"] == 4


def test_decode_output_range_and_encode_validation(tok):
    codes = torch.randint(0, 32, (2, 4, 4))
    images = tok.decode(codes)
    assert images.shape == (2, 3, 16, 16) and 0.0 <= images.min() and images.max() <= 1.0
    with pytest.raises(ValueError, match="float tensor"):
        tok.encode(torch.zeros(2, 3, 16, 16, dtype=torch.int32))  # uint8 and float are accepted
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="outside"):
        tok.decode(torch.full((1, 4, 4), 32))


def test_mismatched_weights_name_the_tensor(tok, tmp_path):
    rel = tok.save_pretrained(tmp_path / "rel")
    # As a release written before config.json recorded weights_sha256: the digest check
    # (tests/test_release.py) would refuse the edited weights before the shape check.
    config = json.loads((rel / "config.json").read_text())
    del config["weights_sha256"]
    (rel / "config.json").write_text(json.dumps(config))
    weights = load_file(str(rel / "model.safetensors"))
    name = "quantizer.embed"
    assert name in weights
    weights[name] = torch.zeros(16, 4)
    save_file(weights, str(rel / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(16, 4\)"):
        Tokenizer.from_pretrained(rel)

    del weights[name]
    save_file(weights, str(rel / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"'{name}' is missing"):
        Tokenizer.from_pretrained(rel)


def test_release_needs_both_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Tokenizer.from_pretrained(tmp_path)


def test_encode_accepts_tensors_arrays_and_pil_images_alike(tok):
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)  # (B, 3, H, W)
    want = tok.encode(pixels)
    assert want.shape == (2, 4, 4) and want.dtype == torch.int64
    hwc = pixels.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3), as PIL and numpy users hold it
    pil = [Image.fromarray(a) for a in hwc]
    for images in (pixels.float() / 255, hwc, hwc / 255.0, pil, list(pixels), list(hwc)):
        assert torch.equal(tok.encode(images), want)
    assert torch.equal(tok.encode(pil[1]), want[1:])  # one image is a batch of one
    assert torch.equal(tok.encode(pixels[0]), want[:1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tok.encode(pixels.float() / 127.5 - 1.0)
    with pytest.raises(ValueError, match="channels-last"):
        tok.encode(pixels.numpy())
    with pytest.raises(ValueError, match="different sizes"):
        tok.encode([pil[0], pil[1].resize((32, 32))])


def test_grid_shape_embed_and_decode_of_stored_codes(tok):
    assert tok.grid_shape(64, 32) == (16, 8)
    with pytest.raises(ValueError, match="divisible"):
        tok.grid_shape(30, 32)
    codes = torch.randint(0, 32, (2, 4, 4))
    vectors = tok.embed(codes)
    assert vectors.shape == (2, 4, 4, tok.code_dim) and vectors.dtype == torch.float32
    assert torch.equal(vectors[1, 2, 3], tok.codebook[codes[1, 2, 3]].float())
    assert tok.embed(codes.flatten(1)).shape == (2, 16, tok.code_dim)  # sequences too
    stored = torch.from_numpy(codes.numpy().astype(np.uint16))  # as an index shard holds them
    assert torch.equal(tok.decode(stored), tok.decode(codes))
    with pytest.raises(ValueError, match="outside"):
        tok.embed(torch.tensor([32]))


def test_fingerprint_follows_the_weights_not_the_file(tok, tmp_path):
    rel = tok.save_pretrained(tmp_path / "rel")
    loaded = Tokenizer.from_pretrained(rel)
    config = json.loads((rel / "config.json").read_text())
    weights_sha256 = weights_fingerprint(load_file(str(rel / "model.safetensors")))
    assert config["weights_sha256"] == weights_sha256
    assert loaded.fingerprint == tok.fingerprint == release_fingerprint(config, weights_sha256)
    assert len(tok.fingerprint) == 64
    torch.manual_seed(1)
    cfg = load_config(overrides=OVERRIDES)
    assert Tokenizer(build_model(cfg), cfg).fingerprint != tok.fingerprint
    half = Tokenizer.from_pretrained(rel, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.fingerprint != tok.fingerprint
    assert half.encode(torch.rand(1, 3, 16, 16)).shape == (1, 4, 4)


def test_preprocess_is_the_evaluation_crop(tok):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
    pixels = tok.preprocess(image)
    assert pixels.shape == (1, 3, 16, 16) and pixels.dtype == torch.uint8
    assert torch.equal(pixels[0].float() / 127.5 - 1.0, eval_transform(image, 16))
    assert tok.preprocess([image, image], resolution=8).shape == (2, 3, 8, 8)


def test_single_grid_per_grid_facts_match_the_single_grid_ones(tok):
    assert tok.grid_names == (SINGLE_GRID,)
    assert tok.codebook_sizes == {SINGLE_GRID: tok.codebook_size}
    assert tok.grid_shapes(32, 64) == {SINGLE_GRID: tok.grid_shape(32, 64)}
    images = torch.rand(2, 3, 32, 32)
    grids = tok.encode_grids(images)
    assert set(grids) == {SINGLE_GRID} and torch.equal(grids[SINGLE_GRID], tok.encode(images))
    with pytest.raises(ValueError, match="not divisible"):
        tok.grid_shapes(33, 32)


def test_decode_grids_is_decode_for_a_single_grid(tok):
    codes = tok.encode(torch.rand(2, 3, 32, 32))  # (2, h, w)
    assert torch.equal(tok.decode_grids({SINGLE_GRID: codes}), tok.decode(codes))
    with pytest.raises(ValueError, match="needs grids"):
        tok.decode_grids({"top": codes})
    with pytest.raises(ValueError, match=r"grid 'tokens': codes outside"):
        tok.decode_grids({SINGLE_GRID: codes * 0 + tok.codebook_size})
