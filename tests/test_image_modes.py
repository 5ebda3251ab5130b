"""Images that are not plain 8-bit RGB, as real files in every mode, through every path
that reads them: decode_image (training stream, evaluation, tokenize all share it), the
streams themselves, and Tokenizer.preprocess / encode on PIL images. Each expectation is
computed in float64 from the values written into the file."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer import Tokenizer, build_model, load_config
from tokenizer.data.images.modes import ALPHA_BACKGROUND, as_rgb
from tokenizer.data.images.transforms import eval_transform
from tokenizer.data.source_batches import iter_shard_batches
from tokenizer.data.stream import iter_eval_batches, iter_train_batches
from tokenizer.data.tars import IMAGE_EXTENSIONS, DecodeError, RawSample, decode_image
from tokenizer.data.writer import write_shards

RES = 16  # every case is RES x RES, so no path resamples and pixels compare exactly
OVERRIDES = [
    "model.channels=[8,16]",
    "model.res_channels=8",
    "quantizer.codebook_size=32",
    "quantizer.code_dim=4",
    f"data.resolution={RES}",
]
WHITE = np.array(ALPHA_BACKGROUND, dtype=np.float64)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    torch.manual_seed(0)
    cfg = load_config(overrides=OVERRIDES)
    return Tokenizer(build_model(cfg), cfg)


# --------------------------------------------------------------------------- file makers


def saved(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def raw_png(samples: np.ndarray, color_type: int, bit_depth: int = 16) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit colour): samples (H, W, C) big-endian."""
    height, width = samples.shape[:2]
    dtype = ">u2" if bit_depth == 16 else ">u1"
    rows = b"".join(b"\x00" + samples[y].astype(dtype).tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """float64 reference: color (H, W, 3) in 0..255 under alpha (H, W) in 0..255."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(color.astype(np.float64) * a + WHITE * (1.0 - a))


def grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey.astype(np.float64)[..., None], 3, axis=2)


def sixteen_bit_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random 16-bit values with the rounding edges of /257 (128 -> 0, 129 -> 1) and the ends."""
    values = rng.integers(0, 65536, size=shape, dtype=np.int64)
    edges = np.array([0, 1, 128, 129, 385, 386, 32767, 32768, 65406, 65407, 65534, 65535])
    flat = values.reshape(-1)
    flat[: edges.size] = edges
    return values


@dataclass
class Case:
    ext: str
    data: bytes
    expected: np.ndarray  # (RES, RES, 3) float64 reference in 0..255
    atol: float = 0.0


def case_grey16(rng: np.random.Generator) -> Case:
    values = sixteen_bit_values(rng, (RES, RES))
    data = saved(Image.fromarray(values.astype(np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    return Case("png", data, grey3(np.rint(values / 257.0)))


def case_grey16_trns(rng: np.random.Generator) -> Case:
    values = sixteen_bit_values(rng, (RES, RES))
    values[3, :] = 40000  # a whole row of the transparent grey level
    data = saved(Image.fromarray(values.astype(np.uint16)), "PNG", transparency=40000)
    alpha = np.where(values == 40000, 0, 255)
    return Case("png", data, over_white(grey3(np.rint(values / 257.0)), alpha))


def case_grey16_tiff_big_endian(rng: np.random.Generator) -> Case:
    values = sixteen_bit_values(rng, (RES, RES))
    image = Image.frombytes("I;16B", (RES, RES), values.astype(">u2").tobytes())
    data = saved(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    return Case("tiff", data, grey3(np.rint(values / 257.0)))


def case_pgm16(rng: np.random.Generator) -> Case:
    """A 16-bit PGM, which PIL opens as mode I (32-bit integers) holding 0..65535."""
    values = sixteen_bit_values(rng, (RES, RES))
    data = f"P5\n{RES} {RES}\n65535\n".encode() + values.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(data)).mode == "I"
    return Case("pgm", data, grey3(np.rint(values / 257.0)))


def case_rgb48(rng: np.random.Generator) -> Case:
    """PIL decodes 16-bit RGB PNGs to 8 bits itself, by the high byte."""
    values = sixteen_bit_values(rng, (RES, RES, 3))
    data = raw_png(values, color_type=2)
    assert Image.open(io.BytesIO(data)).mode == "RGB"
    expected = (values >> 8).astype(np.float64)
    assert np.abs(expected - values / 257.0).max() <= 1.0  # within a level of v / 257
    return Case("png", data, expected)


def case_rgba64(rng: np.random.Generator) -> Case:
    values = sixteen_bit_values(rng, (RES, RES, 4))
    values[:4, :, 3] = 0  # fully transparent rows
    values[:4, :, :3] = [65535, 0, 0]  # over red
    data = raw_png(values, color_type=6)
    return Case("png", data, over_white(values[..., :3] >> 8, values[..., 3] >> 8))


def case_la32(rng: np.random.Generator) -> Case:
    values = sixteen_bit_values(rng, (RES, RES, 2))
    values[:4, :, 1] = 0
    values[:4, :, 0] = 0  # black under alpha 0
    data = raw_png(values, color_type=4)
    return Case("png", data, over_white(grey3(values[..., 0] >> 8), values[..., 1] >> 8))


def case_rgba(rng: np.random.Generator) -> Case:
    color = rng.integers(0, 200, size=(RES, RES, 3))
    alpha = rng.integers(0, 256, size=(RES, RES))
    color[:4] = [200, 20, 40]  # a non-white colour under alpha 0
    alpha[:4] = 0
    alpha[4, :3] = [255, 128, 1]
    pixels = np.dstack([color, alpha]).astype(np.uint8)
    data = saved(Image.fromarray(pixels, "RGBA"), "PNG")
    return Case("png", data, over_white(color, alpha))


def case_la(rng: np.random.Generator) -> Case:
    grey = rng.integers(0, 200, size=(RES, RES))
    alpha = rng.integers(0, 256, size=(RES, RES))
    grey[:4], alpha[:4] = 0, 0
    data = saved(Image.fromarray(np.dstack([grey, alpha]).astype(np.uint8), "LA"), "PNG")
    return Case("png", data, over_white(grey3(grey), alpha))


def _palette_image(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    palette = rng.integers(0, 200, size=(16, 3))
    indices = rng.integers(0, 16, size=(RES, RES))
    indices[0] = 0
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    return image, palette, indices


def case_palette_alpha(rng: np.random.Generator) -> Case:
    """A PNG palette with a tRNS alpha per entry."""
    image, palette, indices = _palette_image(rng)
    entry_alpha = rng.integers(0, 256, size=16)
    entry_alpha[0] = 0
    data = saved(image, "PNG", transparency=bytes(entry_alpha.astype(np.uint8).tolist()))
    return Case("png", data, over_white(palette[indices], entry_alpha[indices]))


def case_gif_transparent(rng: np.random.Generator) -> Case:
    image, palette, indices = _palette_image(rng)
    data = saved(image, "GIF", transparency=0)
    return Case("gif", data, over_white(palette[indices], np.where(indices == 0, 0, 255)))


def case_grey_trns(rng: np.random.Generator) -> Case:
    grey = rng.integers(0, 256, size=(RES, RES))
    grey[:2] = 7
    data = saved(Image.fromarray(grey.astype(np.uint8)), "PNG", transparency=7)
    return Case("png", data, over_white(grey3(grey), np.where(grey == 7, 0, 255)))


def case_rgb_trns(rng: np.random.Generator) -> Case:
    color = rng.integers(0, 256, size=(RES, RES, 3))
    color[:2] = [1, 2, 3]
    data = saved(Image.fromarray(color.astype(np.uint8)), "PNG", transparency=(1, 2, 3))
    alpha = np.where((color == [1, 2, 3]).all(axis=2), 0, 255)
    return Case("png", data, over_white(color, alpha))


def case_float_tiff(rng: np.random.Generator) -> Case:
    values = rng.random((RES, RES)).astype(np.float32)
    values[0, :2] = [0.0, 1.0]
    data = saved(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    return Case("tiff", data, grey3(np.rint(values.astype(np.float64) * 255.0)))


def case_bilevel(rng: np.random.Generator) -> Case:
    bits = rng.random((RES, RES)) < 0.5
    data = saved(Image.fromarray(bits), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    return Case("png", data, grey3(bits * 255.0))


def case_cmyk_jpeg(rng: np.random.Generator) -> Case:
    """No ICC colour management: R = (255 - C)(255 - K) / 255, of the decoded CMYK."""
    cmyk = np.kron(rng.integers(0, 256, size=(RES // 8, RES // 8, 4)), np.ones((8, 8, 1)))
    data = saved(Image.fromarray(cmyk.astype(np.uint8), "CMYK"), "JPEG", quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(data))).astype(np.float64)  # (H, W, 4)
    k = 255.0 - decoded[..., 3:]
    return Case("jpg", data, np.rint((255.0 - decoded[..., :3]) * k / 255.0), atol=1.0)


CASES: dict[str, Callable[[np.random.Generator], Case]] = {
    name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")
}


# PGM is no shard image field (IMAGE_EXTENSIONS); PIL opens it, so it reaches encode.
PIL_ONLY = {"pgm16"}
IN_SHARDS = [name for name in CASES if name not in PIL_ONLY]


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    rng = np.random.default_rng(0)
    made = {name: make(rng) for name, make in CASES.items()}
    assert {n for n, c in made.items() if c.ext not in IMAGE_EXTENSIONS} == PIL_ONLY
    return made


def check(got: np.ndarray | torch.Tensor, case: Case, what: str) -> None:
    got = np.asarray(got, dtype=np.float64)
    error = np.abs(got - case.expected).max()
    assert error <= case.atol, f"{what}: off by {error} levels"


# --------------------------------------------------------------------------- every path


@pytest.mark.parametrize("name", IN_SHARDS)
def test_decode_image_reads_each_mode_by_its_range(cases, name):
    case = cases[name]
    image = decode_image(RawSample(name, "mem", {case.ext: case.data}), RES)
    assert image.mode == "RGB" and image.size == (RES, RES)
    check(np.asarray(image), case, "decode_image")


@pytest.mark.parametrize("name", list(CASES))
def test_preprocess_and_encode_of_pil_images_match_the_reference(tok, cases, name):
    case = cases[name]
    pixels = tok.preprocess(Image.open(io.BytesIO(case.data)))  # (1, 3, R, R) uint8
    check(pixels[0].permute(1, 2, 0), case, "preprocess")
    # encode of the PIL image (also already loaded) sees exactly the preprocessed pixels.
    loaded = Image.open(io.BytesIO(case.data))
    loaded.load()
    assert torch.equal(tok.encode(loaded), tok.encode(pixels))
    assert torch.equal(tok.encode(Image.open(io.BytesIO(case.data))), tok.encode(pixels))


def test_training_evaluation_and_tokenize_streams_read_the_same_pixels(tmp_path: Path, cases):
    stored = {name: cases[name] for name in IN_SHARDS}
    samples = [{"__key__": name, case.ext: case.data} for name, case in stored.items()]
    [info] = write_shards(samples, tmp_path, samples_per_shard=len(samples))

    evaluated = {
        key: image
        for batch in iter_eval_batches([info.path], RES, batch_size=4)
        for key, image in zip(batch.keys, batch.images, strict=True)
    }
    trained: dict[str, torch.Tensor] = {}
    stream = iter_train_batches(
        [info.path], RES, batch_size=1, seed=0, rank=0, world_size=1, stream=0,
        num_streams=1, shuffle_buffer=0, random_flip=False,
    )  # fmt: skip
    while len(trained) < len(stored):
        batch = next(stream)
        trained[batch.keys[0]] = batch.images[0]
    tokenized = {
        key: image
        for batch in iter_shard_batches(0, info.path, RES, batch_size=4)
        for key, image in zip(batch.keys, batch.images, strict=True)
    }
    assert sorted(evaluated) == sorted(trained) == sorted(tokenized) == sorted(stored)
    for name, case in stored.items():
        as_uint8 = ((evaluated[name] + 1.0) * 127.5).round()  # (3, R, R): uint8 / 127.5 - 1 undone
        check(as_uint8.permute(1, 2, 0), case, f"{name}: evaluation")
        assert torch.equal(trained[name], evaluated[name]), name  # unjittered, unflipped
        check(tokenized[name].permute(1, 2, 0), case, f"{name}: tokenize")


def test_sixteen_bit_white_is_white_not_clipped():
    """The defect itself: PIL's convert("RGB") clips 16-bit values, so 257 reads as 255."""
    values = np.array([[257, 257 * 100, 65535, 0]], dtype=np.uint16)
    image = Image.open(io.BytesIO(saved(Image.fromarray(values), "PNG")))
    assert np.asarray(image.convert("RGB"))[0, :, 0].tolist() == [255, 255, 255, 0]  # PIL
    assert np.asarray(as_rgb(image))[0, :, 0].tolist() == [1, 100, 255, 0]


# --------------------------------------------------------------------------- EXIF orientation


def exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    return saved(image, "JPEG", quality=95, exif=exif.tobytes())


def stored_pixels(data: bytes, draft: int | None = None) -> np.ndarray:
    """The JPEG's pixels as stored, before its orientation is applied."""
    image = Image.open(io.BytesIO(data))
    if draft:
        image.draft("RGB", (draft, draft))
    return np.asarray(image.convert("RGB"))


def marked_photo(width: int, height: int) -> np.ndarray:
    """Grey, with a red block in the stored top-left corner."""
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    pixels[: height // 4, : width // 4] = [255, 0, 0]
    return pixels


# Orientation 6: shown rotated 90 degrees clockwise (stored top-left -> shown top-right);
# 8: 90 counter-clockwise (stored top-left -> shown bottom-left).
ORIENTATIONS = {6: (-1, (0, -1)), 8: (1, (-1, 0))}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied_before_the_crop(tok, tmp_path, orientation):
    turns, (row, col) = ORIENTATIONS[orientation]
    data = exif_jpeg(marked_photo(48, 32), orientation)
    upright = np.rot90(stored_pixels(data), k=turns)  # (48, 32, 3)

    image = decode_image(RawSample("k", "mem", {"jpg": data}), 32)
    assert image.size == (32, 48)  # (W, H): portrait once turned
    shown = np.asarray(image)
    assert np.array_equal(shown, upright)
    assert np.abs(shown[row, col].astype(int) - [255, 0, 0]).max() <= 8  # the red corner

    want = eval_transform(Image.fromarray(np.ascontiguousarray(upright)), 32)  # (3, 32, 32)
    [info] = write_shards([{"__key__": "k", "jpg": data}], tmp_path)
    [batch] = list(iter_eval_batches([info.path], 32, batch_size=1))
    assert torch.equal(batch.images[0], want)
    pixels = tok.preprocess(Image.open(io.BytesIO(data)), resolution=32)
    assert torch.equal(pixels[0].float() / 127.5 - 1.0, want)


def test_jpeg_draft_still_applies_with_an_orientation():
    """draft() must run before the pixels load, the EXIF transpose after: a 256x128 JPEG
    for resolution 32 decodes at 1/4 scale (64x32), then turns to 32x64."""
    data = exif_jpeg(marked_photo(256, 128), 6)
    image = decode_image(RawSample("k", "mem", {"jpg": data}), 32)
    assert image.size == (32, 64)
    assert np.array_equal(np.asarray(image), np.rot90(stored_pixels(data, draft=32), k=-1))


# --------------------------------------------------------------------------- refusals


def int32_tiff(values: np.ndarray) -> bytes:
    return saved(Image.fromarray(values.astype(np.int32)), "TIFF")


REFUSED = {
    "float 0..255": ("tiff", saved(Image.fromarray(np.full((RES, RES), 200.0, np.float32)), "TIFF"),
                     r"float image \(mode F\) with values in \[200, 200\]"),
    "float NaN": ("tiff", saved(Image.fromarray(np.full((RES, RES), np.nan, np.float32)), "TIFF"),
                  r"float image \(mode F\) with values in \[nan, nan\]"),
    "32-bit TIFF": ("tiff", int32_tiff(np.full((RES, RES), 7)),
                    "a 32-bit signed integer TIFF has no agreed 8-bit range"),
}  # fmt: skip


@pytest.mark.parametrize("what", list(REFUSED))
def test_images_without_a_known_range_are_refused_with_the_reason(tok, tmp_path, what):
    ext, data, message = REFUSED[what]
    with pytest.raises(DecodeError, match=rf"unusable {ext} image: {message}"):
        decode_image(RawSample("k", "mem", {ext: data}), RES)
    with pytest.raises(ValueError, match=message):
        tok.preprocess(Image.open(io.BytesIO(data)))
    with pytest.raises(ValueError, match=message):
        tok.encode(Image.open(io.BytesIO(data)))
    # The streams skip it as a bad sample, counted once.
    [info] = write_shards([{"__key__": "bad", ext: data}, {"__key__": "ok", **_ok()}], tmp_path)
    batches = list(iter_eval_batches([info.path], RES, batch_size=4))
    assert [k for b in batches for k in b.keys] == ["ok"]
    assert sum(b.skipped for b in batches) == 1


def _ok() -> dict[str, bytes]:
    return {"png": saved(Image.new("RGB", (RES, RES), (1, 2, 3)), "PNG")}


def test_mode_i_outside_sixteen_bits_is_refused():
    image = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    assert image.mode == "I"
    with pytest.raises(ValueError, match=r"mode I\) with values in \[0, 70000\]"):
        as_rgb(image)
    inside = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32))
    assert np.asarray(as_rgb(inside))[0, :, 1].tolist() == [0, 1, 255]


# --------------------------------------------------------------------------- arrays


def test_uint16_arrays_and_tensors_span_sixteen_bits(tok):
    values = sixteen_bit_values(np.random.default_rng(3), (2, RES, RES, 3))
    want = torch.from_numpy(np.rint(values / 257.0).astype(np.uint8)).permute(0, 3, 1, 2)
    codes = tok.encode(want)
    assert torch.equal(tok.encode(values.astype(np.uint16)), codes)  # (B, H, W, 3) numpy
    assert torch.equal(tok.encode(values[0].astype(np.uint16)), codes[:1])
    as_tensor = torch.from_numpy(values.astype(np.uint16)).permute(0, 3, 1, 2)  # torch.uint16
    assert torch.equal(tok.encode(as_tensor), codes)
    with pytest.raises(ValueError, match="a uint8 or a uint16 array, got int32"):
        tok.encode(values.astype(np.int32))
    with pytest.raises(ValueError, match="RGBA: pass a PIL image"):
        tok.encode(np.zeros((RES, RES, 4), np.uint8))
