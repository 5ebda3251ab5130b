"""Held-out evaluation: PSNR and codebook usage over a finite stream of batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from tokenizer.data import ImageBatch
from tokenizer.metrics import psnr_per_image
from tokenizer.models import VQVAE
from tokenizer.quantize.codebook import perplexity, usage


@dataclass
class EvalResult:
    psnr: float  # dB, mean over images
    usage: float  # fraction of codes used on these images
    perplexity: float
    num_images: int


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.no_grad()
def evaluate(
    model: VQVAE,
    batches: Iterable[ImageBatch],
    device: torch.device | str = "cpu",
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity,
    max_batches: int = 0,
) -> EvalResult:
    """`reduce_sum` sums a tensor over ranks, so every rank returns the global result."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.codebook_size, device=device)
    psnr_sum = torch.zeros((), device=device)
    num_images = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        images = batch.images.to(device)  # (B, 3, H, W) in [-1, 1]
        out = model(images)
        psnr_sum += psnr_per_image(images, out.reconstruction).sum()
        num_images += images.shape[0]
        counts += torch.bincount(out.quantizer.indices.flatten(), minlength=counts.numel())
    model.train(was_training)
    counts, psnr_sum, num_images = reduce_sum(counts), reduce_sum(psnr_sum), reduce_sum(num_images)
    n = int(num_images.item())
    return EvalResult(
        psnr=(psnr_sum / max(n, 1)).item(),
        usage=usage(counts).item(),
        perplexity=perplexity(counts).item(),
        num_images=n,
    )
