"""Held-out evaluation: PSNR, SSIM and codebook usage over a finite stream of images."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch

from tokenizer.data.stream import iter_eval_batches
from tokenizer.evaluation.metrics import psnr_per_image, ssim_per_image
from tokenizer.models.base import SINGLE_GRID, TokenizerModel, quantizer_modules
from tokenizer.quantize.codebook import perplexity, usage


@dataclass
class GridUsage:
    """How one code grid's codebook was used over the whole evaluation set."""

    usage: float  # fraction of the grid's K codes used on these images
    perplexity: float  # exp(entropy) of the code frequencies: K when used evenly
    codebook_size: int


@dataclass
class EvalResult:
    psnr: float  # dB, mean over images
    ssim: float  # mean over images (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5)
    num_images: int
    grids: dict[str, GridUsage]  # grid name -> its codebook usage
    lpips: float | None = None  # mean over images, when an LPIPS network was given

    def _single(self) -> GridUsage:
        if len(self.grids) != 1:
            raise ValueError(f"grids {', '.join(self.grids)}: use result.grids[name]")
        return next(iter(self.grids.values()))

    @property
    def usage(self) -> float:
        """The usage of a single-grid model's codebook."""
        return self._single().usage

    @property
    def perplexity(self) -> float:
        return self._single().perplexity

    def metrics(self) -> dict[str, float]:
        """Flat named scalars for logs and JSON: psnr, ssim, num_images, and per grid
        `usage` / `perplexity` (one grid: the names tools and logs have always used) or
        `usage/<grid>` / `perplexity/<grid>` (several)."""
        out: dict[str, float] = {"psnr": self.psnr, "ssim": self.ssim}
        if self.lpips is not None:
            out["lpips"] = self.lpips
        for name, grid in self.grids.items():
            suffix = "" if len(self.grids) == 1 else f"/{name}"
            out[f"usage{suffix}"] = grid.usage
            out[f"perplexity{suffix}"] = grid.perplexity
        out["num_images"] = self.num_images
        return out

    def describe(self) -> str:
        """One line for people: PSNR, SSIM and each grid's usage and perplexity."""
        grids = ", ".join(
            f"{'' if name == SINGLE_GRID else f'{name}: '}usage {100 * g.usage:.1f}% of "
            f"{g.codebook_size} codes, perplexity {g.perplexity:.1f}"
            for name, g in self.grids.items()
        )
        lpips = "" if self.lpips is None else f", lpips {self.lpips:.4f}"
        return f"psnr {self.psnr:.2f} dB, ssim {self.ssim:.4f}{lpips}, {grids}"


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.no_grad()
def evaluate(
    model: TokenizerModel,
    images: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity,
    on_batch: Callable[[int], None] | None = None,
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """images: batches (B, 3, H, W) in [-1, 1]. `reduce_sum` sums a tensor over ranks, so
    every rank returns the global result; `on_batch(B)` follows each batch (progress);
    `lpips(x, y) -> (B,)` adds the mean LPIPS. Usage is counted over every image of the
    set, per grid."""
    was_training = model.training
    model.eval()
    sizes = {name: q.codebook_size for name, q in quantizer_modules(model).items()}
    counts = {name: torch.zeros(k, device=device) for name, k in sizes.items()}  # (K,) each
    psnr_sum = torch.zeros((), device=device)
    ssim_sum = torch.zeros((), device=device)
    lpips_sum = torch.zeros((), device=device)
    num_images = torch.zeros((), device=device)
    for batch in images:
        batch = batch.to(device)
        out = model(batch)
        psnr_sum += psnr_per_image(batch, out.reconstruction).sum()
        if batch.shape[0]:  # lockstep's empty batches have no pixels to slide a window over
            ssim_sum += ssim_per_image(batch, out.reconstruction).sum()
            if lpips is not None:
                lpips_sum += lpips(batch, out.reconstruction.float()).sum()
        num_images += batch.shape[0]
        for name in counts:
            counts[name] += out.grids[name].counts  # (K,) this batch's, from the quantizer
        if on_batch is not None:
            on_batch(batch.shape[0])
    model.train(was_training)
    counts = {name: reduce_sum(c) for name, c in counts.items()}
    num_images = reduce_sum(num_images)
    psnr_sum, ssim_sum = reduce_sum(psnr_sum), reduce_sum(ssim_sum)
    lpips_mean = None
    if lpips is not None:
        lpips_mean = (reduce_sum(lpips_sum) / num_images.clamp_min(1)).item()
    n = int(num_images.item())
    return EvalResult(
        psnr=(psnr_sum / max(n, 1)).item(),
        ssim=(ssim_sum / max(n, 1)).item(),
        num_images=n,
        grids={
            name: GridUsage(usage(c).item(), perplexity(c).item(), sizes[name])
            for name, c in counts.items()
        },
        lpips=lpips_mean,
    )


def lockstep(
    batches: Iterable[torch.Tensor],
    empty: torch.Tensor,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[torch.Tensor]:
    """Yield until every rank is done, an empty batch on ranks already done: ranks can
    hold unequal shares of an eval set, and ZeRO-3 forwards are collective."""
    source = iter(batches)
    while True:
        batch = next(source, None)
        alive = reduce_sum(torch.tensor(float(batch is not None), device=empty.device))
        if alive.item() == 0:
            return
        yield empty if batch is None else batch


def evaluate_shards(
    model: TokenizerModel,
    shards: list[str],
    resolution: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity,
    max_batches: int = 0,
    on_batch: Callable[[int], None] | None = None,
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """Each rank evaluates its share of `shards`: its first `max_batches` batches, or all of
    them when max_batches is 0. Reading stops there, so a periodic evaluation during
    training decodes only what it scores."""
    if max_batches < 0:
        raise ValueError(f"max_batches={max_batches}: give 0 (every batch) or a positive count")
    source = iter_eval_batches(shards, resolution, batch_size, rank, world_size)
    batches = (b.images for b in islice(source, max_batches or None))
    if world_size > 1:
        empty = torch.zeros(0, 3, resolution, resolution, device=device)  # (0, 3, R, R)
        batches = lockstep(batches, empty, reduce_sum)
    return evaluate(model, batches, device, reduce_sum, on_batch, lpips)
