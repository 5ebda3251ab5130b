"""Shared by the tokenize tests: a tiny random release, source shards with captions, bad
samples and known content, and readers that use only tarfile / numpy."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenizer import Tokenizer, build_model, load_config
from tokenizer.data.writer import write_shards


def tiny_tokenizer(seed: int = 0, codebook_size: int = 32, resolution: int = 16) -> Tokenizer:
    torch.manual_seed(seed)
    cfg = load_config(
        overrides=[
            "model.channels=[8,16]",
            "model.res_channels=8",
            f"quantizer.codebook_size={codebook_size}",
            "quantizer.code_dim=4",
            f"data.resolution={resolution}",
        ]
    )
    return Tokenizer(build_model(cfg), cfg)


def tiny_two_grid_tokenizer(seed: int = 0, resolution: int = 32) -> Tokenizer:
    """A random VQ-VAE-2 of grids `top` (resolution / 8) and `bottom` (resolution / 4), K=32."""
    torch.manual_seed(seed)
    cfg = load_config(
        overrides=[
            "model.arch=vqvae2", "model.channels=[8,16]", "model.res_channels=8",
            "model.num_res_blocks=1", "quantizer.codebook_size=32", "quantizer.code_dim=8",
            f"data.resolution={resolution}",
        ]
    )  # fmt: skip
    return Tokenizer(build_model(cfg), cfg)


def save_tiny_release(directory: Path, **kwargs) -> Path:
    return tiny_tokenizer(**kwargs).save_pretrained(directory)


def image_bytes(rng: np.random.Generator, width: int, height: int, fmt: str = "PNG") -> bytes:
    # Ramps of random phase and colour plus a block: varied codes, small files, and
    # decoding cost that grows with the size (the kill test wants a run of a few seconds).
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase, period = rng.uniform(0, 6.3, 3), rng.uniform(8, 64, 3)
    pixels = np.stack([np.sin(xx / period[c] + yy / (2 * period[c]) + phase[c]) for c in range(3)])
    pixels = ((pixels.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    pixels[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass(frozen=True)
class Sources:
    paths: list[str]
    samples: dict[str, dict[str, bytes]]  # key -> fields, every sample of every shard
    bad: dict[str, str]  # key -> what is wrong with it

    @property
    def pattern(self) -> str:
        first = Path(self.paths[0])
        prefix = first.name.removesuffix("000000.tar")
        return str(first.parent / f"{prefix}{{000000..{len(self.paths) - 1:06d}}}.tar")

    @property
    def good_keys(self) -> list[str]:
        return [k for k in self.samples if k not in self.bad]


def write_sources(
    directory: Path,
    num_shards: int,
    per_shard: int,
    width: int = 40,
    height: int = 32,
    seed: int = 0,
    prefix: str = "",
    key_prefix: str = "",
    classes: int = 0,
) -> Sources:
    """Shards of PNG samples (every fifth a JPEG) with a txt caption; odd ones also carry
    json, one a caption that is not valid UTF-8; with `classes`, every sample a cls field
    (j % classes), else every third one (cls 7), as a class label would travel. Shard 1 holds an undecodable image and a
    sample without an image. Shards are `{prefix}000000.tar`, ...; keys
    `{key_prefix}img{shard}_{j:03d}` (the same keys in every set unless prefixed)."""
    rng = np.random.default_rng(seed)
    samples: dict[str, dict[str, bytes]] = {}
    bad: dict[str, str] = {}
    order: list[dict] = []
    for shard in range(num_shards):
        for j in range(per_shard):
            key = f"{key_prefix}img{shard}_{j:03d}"
            ext, fmt = ("jpg", "JPEG") if j % 5 == 4 else ("png", "PNG")
            fields = {ext: image_bytes(rng, width, height, fmt), "txt": f"a photo {key}".encode()}
            if j % 2:
                fields["json"] = json.dumps({"key": key, "n": j}).encode()
            if classes or j % 3 == 0:
                fields["cls"] = str(j % classes if classes else 7).encode()
            if shard == 0 and j == 1:
                fields["txt"] = b"caf\xe9 latin-1 \xff"  # not UTF-8: must still travel as is
            if shard == 1 and j == 2:
                fields = {"png": b"\x89PNG\r\n\x1a\nnot really", "txt": b"broken"}
                bad[key] = "cannot decode"
            if shard == 1 and j == 3:
                fields = {"txt": b"no image here"}
                bad[key] = "no image field"
            samples[key] = fields
            order.append({"__key__": key, **fields})
    infos = write_shards(order, directory, prefix=prefix, samples_per_shard=per_shard)
    return Sources([info.path for info in infos], samples, bad)


def plain_tar_samples(path: str | Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, with tarfile alone, in file order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def expected_codes(tok: Tokenizer, fields: list[dict[str, bytes]], resolution: int) -> np.ndarray:
    """Tokenizer.encode on the same images, opened with PIL and cropped by preprocess."""
    images = []
    for f in fields:
        ext = next(e for e in ("png", "jpg") if e in f)
        images.append(Image.open(io.BytesIO(f[ext])))
    return tok.encode(tok.preprocess(images, resolution)).cpu().numpy()  # (B, h, w)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
