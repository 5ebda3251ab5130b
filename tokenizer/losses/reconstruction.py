"""Training objective: reconstruction + the quantizer's VQ terms."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenizer.models import TokenizerOutput


@dataclass
class LossTerms:
    total: torch.Tensor  # what backward() sees
    # Each term on its own, unweighted where the total weights it (commitment: the total
    # carries beta x commitment), for the log.
    terms: dict[str, torch.Tensor]


def reconstruction_loss(
    images: torch.Tensor, reconstruction: torch.Tensor, kind: str
) -> torch.Tensor:
    """Mean over pixels, in fp32 so bf16 autocast does not round small errors away."""
    if kind == "mse":
        return F.mse_loss(reconstruction.float(), images.float())
    if kind == "l1":
        return F.l1_loss(reconstruction.float(), images.float())
    raise ValueError(f"loss.reconstruction: unknown kind {kind!r} (mse, l1)")


def vqvae_loss(images: torch.Tensor, output: TokenizerOutput, kind: str) -> LossTerms:
    """Reconstruction + every grid's quantizer loss; the VQ terms summed over grids."""
    recon = reconstruction_loss(images, output.reconstruction, kind)
    grids = output.grids.values()
    return LossTerms(
        total=recon + output.quantizer_loss,
        terms={
            "reconstruction": recon,
            "codebook": sum(q.codebook_loss for q in grids),
            "commitment": sum(q.commitment_loss for q in grids),
        },
    )
