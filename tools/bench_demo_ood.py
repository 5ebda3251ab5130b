"""A released tokenizer on a folder of real images, beside a flat mean-colour image.

    python tools/bench_demo_ood.py --tokenizer runs/demo/release --input wallpapers/

Every image under --input (recursive; the extensions shards accept) goes through the
tokenizer's own preprocessing (shorter side to the resolution, bicubic, centre crop), is
encoded and decoded, and scored by PSNR and SSIM. The baseline replaces each crop by its
mean colour: a tokenizer that only gets the average colour right scores that, so the gap
above it is what the codes carry. Several --tokenizer directories are scored on the same
crops, one row each.

To get images of another kind than the demo's photographs, e.g. Debian's wallpapers:
    apt-get download plasma-workspace-wallpapers && dpkg -x plasma-workspace-wallpapers_*.deb x
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from tokenizer.api import Tokenizer
from tokenizer.data.images.transforms import eval_crop, to_uint8_tensor, uint8_to_model_range
from tokenizer.data.tars import IMAGE_EXTENSIONS
from tokenizer.evaluation.metrics import psnr_per_image, ssim_per_image


@dataclass(frozen=True)
class Scores:
    name: str
    psnr: float  # dB, mean over images
    ssim: float
    num_images: int


def find_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"--input folder not found: {root}")
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )
    if not paths:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under --input folder {root}"
        )
    return paths


def load_crops(paths: list[Path], resolution: int) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1]: the eval preprocessing of every image."""
    crops = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.draft("RGB", (resolution, resolution))
                crop = eval_crop(image.convert("RGB"), resolution)
        except Exception as err:  # PIL raises many types for a file it cannot read
            raise ValueError(f"cannot read image {path}: {err}") from err
        crops.append(uint8_to_model_range(to_uint8_tensor(crop)))
    return torch.stack(crops)  # (N, 3, R, R)


def flat_mean_colour(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> each image filled with its own mean colour."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()


def score(name: str, images: torch.Tensor, recon: torch.Tensor) -> tuple[Scores, torch.Tensor]:
    psnr = psnr_per_image(images, recon)  # (N,)
    ssim = ssim_per_image(images, recon)  # (N,)
    return Scores(name, psnr.mean().item(), ssim.mean().item(), images.shape[0]), psnr


@torch.no_grad()
def reconstruct(tok: Tokenizer, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> the tokenizer's reconstructions, in [-1, 1]."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = (images[start : start + batch_size] + 1.0) / 2.0  # [0, 1]
        out.append(tok.decode(tok.encode(batch.to(tok.device))).cpu() * 2.0 - 1.0)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, nargs="+", help="release directories")
    parser.add_argument("--input", required=True, help="folder of images (recursive)")
    parser.add_argument("--resolution", type=int, default=0, help="default: the first's own")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-image", action="store_true", help="also print each image's PSNR")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    toks = [Tokenizer.from_pretrained(d, device=args.device) for d in args.tokenizer]
    resolution = args.resolution or toks[0].config.data.resolution
    paths = find_images(Path(args.input))
    images = load_crops(paths, resolution)  # (N, 3, R, R)

    rows = [score("flat mean colour", images, flat_mean_colour(images))]
    for directory, tok in zip(args.tokenizer, toks, strict=True):
        rows.append(score(directory, images, reconstruct(tok, images, args.batch_size)))

    print(f"{len(paths)} images from {args.input} at {resolution}x{resolution}")
    width = max(len(r.name) for r, _ in rows)
    for r, _ in rows:
        print(f"  {r.name:<{width}}  PSNR {r.psnr:6.2f} dB  SSIM {r.ssim:.4f}")
    if args.per_image:
        names = [r.name for r, _ in rows]
        print("per image PSNR (dB): " + " | ".join(names))
        for i, path in enumerate(paths):
            cells = " ".join(f"{psnr[i].item():6.2f}" for _, psnr in rows)
            print(f"  {path.relative_to(args.input)}  {cells}")
    print(json.dumps({"resolution": resolution, "results": [asdict(r) for r, _ in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
