"""Colour jitter: colorsys's YIQ maths, per-sample determinism, identity when off, and
the config keys that switch it on."""

from __future__ import annotations

import colorsys
import json
import math
import random
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ShardSet
from PIL import Image

from tokenizer.config import ConfigError, DataConfig, load_config
from tokenizer.data.images.augment import ColorJitter, apply_color_jitter, jitter_matrix, jitter_rgb
from tokenizer.data.images.transforms import train_transform
from tokenizer.data.stream import make_train_loader

ROOT = Path(__file__).resolve().parents[1]


def _pixels(seed: int = 0, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    # Greys, black, white and saturated primaries: the corners of the gamut clip.
    pixels[0, :4] = [[0, 0, 0], [128, 128, 128], [255, 255, 255], [255, 0, 0]]
    pixels[1, :3] = [[0, 255, 0], [0, 0, 255], [255, 255, 0]]
    return pixels


def _colorsys_jitter(pixels: np.ndarray, hue_shift: float, scale: float) -> np.ndarray:
    """Per pixel with colorsys: to YIQ, turn and scale (I, Q), back (colorsys clips)."""
    angle = 2 * math.pi * hue_shift
    out = np.empty_like(pixels)
    for idx in np.ndindex(pixels.shape[:2]):
        y, i, q = colorsys.rgb_to_yiq(*(pixels[idx] / 255.0))
        i, q = (
            scale * (i * math.cos(angle) - q * math.sin(angle)),
            scale * (i * math.sin(angle) + q * math.cos(angle)),
        )
        out[idx] = np.rint(np.array(colorsys.yiq_to_rgb(y, i, q)) * 255.0)
    return out


@pytest.mark.parametrize(
    ("hue_shift", "scale"), [(0.25, 1.0), (-0.4, 1.0), (0.1, 0.3), (0.0, 1.7), (0.5, 1.5)]
)
def test_jitter_matches_colorsys_reference(hue_shift: float, scale: float):
    pixels = _pixels(1)
    got = jitter_rgb(pixels, hue_shift, scale).astype(int)
    expected = _colorsys_jitter(pixels, hue_shift, scale).astype(int)
    # The matrix product and colorsys's sums round differently only at exact halves.
    assert np.abs(got - expected).max() <= 1
    assert (got != expected).mean() < 0.01


def test_rotation_keeps_luma_and_composes():
    pixels = _pixels(2)
    luma = np.array([0.30, 0.59, 0.11])  # colorsys's Y
    inside = (pixels.astype(float) @ luma > 60) & (pixels.astype(float) @ luma < 190)
    # Turning the chroma plane moves no luma (bar clipping at the gamut's edge: a mild
    # turn of mid-tones stays inside it).
    turned = jitter_rgb(pixels, 0.05, 0.5).astype(float)
    assert np.abs(turned @ luma - pixels.astype(float) @ luma)[inside].max() < 1.0
    # A full turn, and no turn at scale 1, give the pixels back.
    assert np.array_equal(jitter_rgb(pixels, 0.0, 1.0), pixels)
    assert np.abs(jitter_rgb(pixels, 1.0, 1.0).astype(int) - pixels).max() <= 1
    # Two turns compose: the matrices multiply (before any rounding).
    assert np.allclose(jitter_matrix(0.1, 1.0) @ jitter_matrix(0.15, 1.0), jitter_matrix(0.25, 1.0))
    # Saturation 0: every pixel grey at its own luma.
    grey = jitter_rgb(pixels, 0.3, 0.0)
    assert (grey == grey[..., :1]).all()
    assert np.abs(grey[..., 0] - pixels.astype(float) @ luma).max() <= 0.5 + 1e-9


def test_pil_matrix_path_equals_the_numpy_reference():
    image = Image.fromarray(_pixels(5, (24, 24)))
    jitter = ColorJitter(hue=0.5, saturation=0.8)
    for seed in range(20):
        rng, twin = random.Random(seed), random.Random(seed)
        got = np.asarray(apply_color_jitter(image, jitter, rng))
        hue_shift, scale = twin.uniform(-0.5, 0.5), twin.uniform(0.2, 1.8)
        expected = jitter_rgb(np.asarray(image), hue_shift, scale).astype(int)
        assert np.abs(got.astype(int) - expected).max() <= 1
        assert rng.getstate() == twin.getstate()  # two draws, no more


def test_off_is_the_identity_and_draws_nothing():
    image = Image.fromarray(_pixels(3))
    rng = random.Random(5)
    state = rng.getstate()
    assert apply_color_jitter(image, ColorJitter(), rng) is image
    assert rng.getstate() == state
    # train_transform with the jitter off is exactly the transform without it.
    a = train_transform(image, 12, True, random.Random(7), ColorJitter(0.0, 0.0))
    b = train_transform(image, 12, True, random.Random(7))
    assert torch.equal(a, b)


def test_jitter_is_deterministic_for_a_seed():
    image = Image.fromarray(_pixels(4))
    jitter = ColorJitter(hue=0.5, saturation=0.5)
    a = train_transform(image, 12, True, random.Random(11), jitter)
    b = train_transform(image, 12, True, random.Random(11), jitter)
    c = train_transform(image, 12, True, random.Random(12), jitter)
    plain = train_transform(image, 12, True, random.Random(11))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, plain)


@pytest.mark.parametrize(("hue", "saturation"), [(-0.1, 0.0), (0.6, 0.0), (0.0, 1.5)])
def test_out_of_range_amounts_are_refused(hue: float, saturation: float):
    with pytest.raises(ValueError, match="color jitter"):
        ColorJitter(hue, saturation)
    key = "hue" if hue else "saturation"
    overrides = [f"data.color_jitter.hue={hue}", f"data.color_jitter.saturation={saturation}"]
    with pytest.raises(ConfigError, match=f"data.color_jitter.{key} must be in"):
        load_config(ROOT / "configs" / "demo.yaml", overrides=overrides)


def test_demo_config_turns_the_jitter_on():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.data.color_jitter.hue > 0 and cfg.data.color_jitter.saturation > 0
    assert DataConfig().color_jitter.hue == 0 and DataConfig().color_jitter.saturation == 0


def _take(loader, tracker, n: int) -> list:
    batches = list(islice(loader, n))
    for batch in batches:
        tracker.update(batch)
    return batches


def test_loader_jitters_and_resumes_exactly(shard_set: ShardSet):
    on = DataConfig(resolution=16, num_workers=0, shuffle_buffer=8)
    on.color_jitter.hue, on.color_jitter.saturation = 0.5, 0.5
    off = DataConfig(resolution=16, num_workers=0, shuffle_buffer=8)

    def fresh(cfg: DataConfig, state: dict | None = None):
        return make_train_loader(cfg, shard_set.paths, 4, seed=3, rank=0, world_size=1, state=state)

    loader, tracker = fresh(on)
    reference = _take(iter(loader), tracker, 20)
    plain = _take(iter(fresh(off)[0]), fresh(off)[1], 20)
    assert [b.keys for b in reference] == [b.keys for b in plain]  # same samples, other colours
    assert not any(torch.equal(a.images, b.images) for a, b in zip(reference, plain, strict=True))

    loader, tracker = fresh(on)
    first = _take(iter(loader), tracker, 7)
    state = json.loads(json.dumps(tracker.state_dict()))
    loader, tracker = fresh(on, state)
    rest = _take(iter(loader), tracker, 13)
    for a, b in zip(first + rest, reference, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images)
