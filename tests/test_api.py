"""Release format: save_pretrained / from_pretrained, and refusal of mismatched weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenizer import Tokenizer, build_model, load_config

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
        tok.encode(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="outside"):
        tok.decode(torch.full((1, 4, 4), 32))


def test_mismatched_weights_name_the_tensor(tok, tmp_path):
    rel = tok.save_pretrained(tmp_path / "rel")
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
