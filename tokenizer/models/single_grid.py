"""What every one-grid tokenizer (VQ-VAE, VQGAN) does the same way around its own encode,
decode and `self.quantizer`: the named-grid interface of models/base.py for grid `tokens`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenizer.models.base import SINGLE_GRID, TokenizerOutput
from tokenizer.quantize import QuantizerOutput, VectorQuantizer


class SingleGridModel(nn.Module):
    """Subclasses set `self.quantizer` (release weights are keyed `quantizer.*`) and
    `self._downsample_factor`, and define encode(x) -> z_e and decode(z_q) -> images."""

    quantizer: VectorQuantizer
    _downsample_factor: int

    @property
    def downsample_factor(self) -> int:
        return self._downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def quantizers(self) -> dict[str, VectorQuantizer]:
        return {SINGLE_GRID: self.quantizer}

    def downsample_factors(self) -> dict[str, int]:
        return {SINGLE_GRID: self._downsample_factor}

    def quantize(self, z_e: Tensor) -> QuantizerOutput:
        # Never under a gradient checkpoint: a recomputed forward would repeat the
        # quantizer's EMA update, its dead-code bookkeeping and its collectives.
        return self.quantizer(z_e)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code grid (B, h, w) -> images (B, 3, h*f, w*f)."""
        return self.decode(self.quantizer.lookup(indices))  # (B, D, h, w) in between

    def encode_codes(self, x: Tensor) -> dict[str, Tensor]:
        return {SINGLE_GRID: self.quantize(self.encode(x)).indices}  # (B, h, w)

    def decode_codes(self, codes: dict[str, Tensor]) -> Tensor:
        return self.decode_indices(codes[SINGLE_GRID])

    def forward(self, x: Tensor) -> TokenizerOutput:
        q = self.quantize(self.encode(x))
        return TokenizerOutput(reconstruction=self.decode(q.quantized), grids={SINGLE_GRID: q})


def weight_dtype(module: nn.Module) -> torch.dtype:
    """Engines that cast weights (DeepSpeed bf16) need inputs of the weights' dtype."""
    return next(module.parameters()).dtype
