"""VQGAN (Esser et al. 2021; LlamaGen's VQ-16 / VQ-8): the residual + attention encoder,
a 1x1 conv into the code space, the vector quantizer, a 1x1 conv out of it, the decoder.
Computes only; the perceptual and adversarial losses live in tokenizer/losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenizer.config import Config, ConfigError, ModelConfig, QuantizerConfig
from tokenizer.models.base import SINGLE_GRID, TokenizerOutput
from tokenizer.models.rules import require_divisible_resolution
from tokenizer.nn.vqgan import Decoder, Encoder, level_resolutions
from tokenizer.quantize import QuantizerOutput, VectorQuantizer, quantizer_from_config


class VQGAN(nn.Module):
    # The model.* keys that decide a VQGAN's weights and codes: what its releases record
    # (grad_checkpointing changes neither; dropout is off at inference but is kept, as
    # an architecture setting a reader may want to know).
    RELEASE_KEYS = (
        "arch",
        "in_channels",
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
        "z_channels",
        "dropout",
    )

    def __init__(self, model: ModelConfig, quantizer: QuantizerConfig, resolution: int) -> None:
        """`resolution`: the training resolution (data.resolution), at which
        model.attn_resolutions names the levels that attend."""
        super().__init__()
        shape = dict(
            ch=model.ch,
            ch_mult=list(model.ch_mult),
            num_res_blocks=model.num_res_blocks,
            attn_resolutions=list(model.attn_resolutions),
            z_channels=model.z_channels,
            resolution=resolution,
            dropout=model.dropout,
            grad_checkpointing=model.grad_checkpointing,
        )
        self.encoder = Encoder(in_channels=model.in_channels, **shape)
        self.quant_conv = nn.Conv2d(model.z_channels, quantizer.code_dim, kernel_size=1)
        self.quantizer = quantizer_from_config(quantizer)
        self.post_quant_conv = nn.Conv2d(quantizer.code_dim, model.z_channels, kernel_size=1)
        self.decoder = Decoder(out_channels=model.in_channels, **shape)
        # One stride-2 Downsample between consecutive levels.
        self._downsample_factor = 2 ** (len(self.encoder.conv_blocks) - 1)

    @classmethod
    def from_config(cls, cfg: Config) -> VQGAN:
        return cls(cfg.model, cfg.quantizer, cfg.data.resolution)

    @staticmethod
    def check_config(cfg: Config) -> None:
        """ConfigError for what a VQGAN cannot build: a resolution its downsampling does
        not divide, or an attention resolution no level has (which would silently build a
        network without that attention)."""
        m = cfg.model
        require_divisible_resolution(cfg, 2 ** (len(m.ch_mult) - 1), "2**(len(model.ch_mult) - 1)")
        levels = level_resolutions(cfg.data.resolution, len(m.ch_mult))
        missing = [r for r in m.attn_resolutions if r not in levels]
        if missing:
            raise ConfigError(
                f"model.attn_resolutions {list(m.attn_resolutions)}: {missing} is no level's "
                f"feature resolution at data.resolution={cfg.data.resolution} (the levels: "
                f"{levels}); name those that attend, or [] for attention in the mid block only"
            )

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

    def last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight, where the adaptive GAN weight (taming) compares
        the gradient norms of the reconstruction and adversarial losses."""
        return self.decoder.last_layer

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> z_e (B, code_dim, H/f, W/f)."""
        # Engines that cast the weights (DeepSpeed bf16) get inputs of the weights' dtype.
        h = self.encoder(x.to(_weight_dtype(self.encoder)))  # (B, z_channels, H/f, W/f)
        return self.quant_conv(h)  # (B, code_dim, H/f, W/f)

    def quantize(self, z_e: Tensor) -> QuantizerOutput:
        # Never under a checkpoint: a recomputed forward would repeat the quantizer's EMA
        # update, its dead-code bookkeeping and its collectives.
        return self.quantizer(z_e)

    def decode(self, z_q: Tensor) -> Tensor:
        """(B, code_dim, h, w) -> (B, 3, h*f, w*f)."""
        h = self.post_quant_conv(z_q.to(_weight_dtype(self.post_quant_conv)))  # (B, z, h, w)
        return self.decoder(h)  # (B, 3, h*f, w*f)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code grid (B, h, w) -> images (B, 3, h*f, w*f)."""
        return self.decode(self.quantizer.lookup(indices))  # (B, code_dim, h, w) in between

    def encode_codes(self, x: Tensor) -> dict[str, Tensor]:
        return {SINGLE_GRID: self.quantize(self.encode(x)).indices}  # (B, h, w)

    def decode_codes(self, codes: dict[str, Tensor]) -> Tensor:
        return self.decode_indices(codes[SINGLE_GRID])

    def forward(self, x: Tensor) -> TokenizerOutput:
        q = self.quantize(self.encode(x))
        return TokenizerOutput(reconstruction=self.decode(q.quantized), grids={SINGLE_GRID: q})


def _weight_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
