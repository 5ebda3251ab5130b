"""VQ-VAE (van den Oord et al. 2017): encoder, vector quantizer, decoder. Computes only."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenizer.config import Config, ModelConfig, QuantizerConfig
from tokenizer.models.base import SINGLE_GRID, TokenizerOutput
from tokenizer.models.rules import refuse_grad_checkpointing, require_divisible_resolution
from tokenizer.nn.paper import Decoder, Encoder
from tokenizer.quantize import QuantizerOutput, VectorQuantizer, quantizer_from_config


class VQVAE(nn.Module):
    def __init__(self, model: ModelConfig, quantizer: QuantizerConfig) -> None:
        super().__init__()
        self._downsample_factor = 2 ** len(model.channels)
        self.encoder = Encoder(
            in_channels=model.in_channels,
            channels=list(model.channels),
            num_res_blocks=model.num_res_blocks,
            res_channels=model.res_channels,
            code_dim=quantizer.code_dim,
        )
        self.quantizer = quantizer_from_config(quantizer)
        self.decoder = Decoder(
            in_channels=model.in_channels,
            channels=list(model.channels),
            num_res_blocks=model.num_res_blocks,
            res_channels=model.res_channels,
            code_dim=quantizer.code_dim,
        )

    # The model.* keys a VQ-VAE reads: what its releases record.
    RELEASE_KEYS = ("arch", "in_channels", "channels", "num_res_blocks", "res_channels")

    @classmethod
    def from_config(cls, cfg: Config) -> VQVAE:
        return cls(cfg.model, cfg.quantizer)

    @staticmethod
    def check_config(cfg: Config) -> None:
        """ConfigError for what a VQ-VAE cannot build or honour."""
        factor = 2 ** len(cfg.model.channels)
        require_divisible_resolution(cfg, factor, "2**len(model.channels)")
        refuse_grad_checkpointing(cfg)

    @property
    def downsample_factor(self) -> int:
        return self._downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def quantizers(self) -> dict[str, VectorQuantizer]:
        # The attribute keeps its name: release weights are keyed `quantizer.*`.
        return {SINGLE_GRID: self.quantizer}

    def downsample_factors(self) -> dict[str, int]:
        return {SINGLE_GRID: self._downsample_factor}

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> z_e (B, D, H/f, W/f)."""
        # Engines that cast the weights (DeepSpeed bf16) get inputs of the weights' dtype.
        return self.encoder(x.to(_weight_dtype(self.encoder)))

    def quantize(self, z_e: Tensor) -> QuantizerOutput:
        return self.quantizer(z_e)

    def decode(self, z_q: Tensor) -> Tensor:
        """(B, D, h, w) -> (B, 3, h*f, w*f)."""
        return self.decoder(z_q.to(_weight_dtype(self.decoder)))

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


def _weight_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
