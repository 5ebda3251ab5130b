"""What every tokenizer model offers, whatever its architecture: named code grids.

A model quantises an image into one or more code grids, each with its own quantizer,
named: `tokens` for a single grid, `top` / `bottom` for VQ-VAE-2's two. Everything that
touches codes (codebook sync, logs, checkpoints, releases, tokenize, index shards,
evaluation, priors) iterates over `quantizers()`, so a hierarchy needs no special case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from tokenizer.outputs import NamedOutput
from tokenizer.quantize import QuantizerOutput, VectorQuantizer

# The grid name of single-grid models; index shards store it as `tokens.npy`.
SINGLE_GRID = "tokens"


@dataclass
class TokenizerOutput(NamedOutput):
    reconstruction: Tensor  # (B, 3, H, W) in [-1, 1]
    grids: dict[str, QuantizerOutput]  # grid name -> that grid's quantizer output

    @property
    def quantizer_loss(self) -> Tensor:
        """Sum over grids of each quantizer's loss (codebook + beta x commitment)."""
        return sum(q.loss for q in self.grids.values())


@runtime_checkable
class TokenizerModel(Protocol):
    """The interface the loop, the Tokenizer, tokenize and evaluation rely on."""

    def quantizers(self) -> dict[str, VectorQuantizer]:
        """Grid name -> its quantizer, coarsest grid first."""
        ...

    def downsample_factors(self) -> dict[str, int]:
        """Grid name -> pixels per code along each side (the grid is (H/f, W/f))."""
        ...

    def encode_codes(self, x: Tensor) -> dict[str, Tensor]:
        """Images in [-1, 1] (B, 3, H, W) -> grid name -> codes (B, h, w) int64."""
        ...

    def decode_codes(self, codes: dict[str, Tensor]) -> Tensor:
        """Grid name -> codes (B, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        ...

    def forward(self, x: Tensor) -> TokenizerOutput: ...


def codebook_sizes(model: TokenizerModel) -> dict[str, int]:
    return {name: q.codebook_size for name, q in model.quantizers().items()}


def quantizer_modules(model: nn.Module) -> dict[str, VectorQuantizer]:
    """The quantizers of a model, also through a DDP / DeepSpeed wrapper."""
    return getattr(model, "module", model).quantizers()
