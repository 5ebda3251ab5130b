"""VQ-VAE-2 (Razavi, van den Oord and Vinyals 2019): a hierarchy of code grids, each with
its own codebook, in the VQ-VAE paper's blocks or the VQGAN's (`model.blocks`,
models/vqvae2_blocks.py). Computes only.

Wiring, as in the paper and rosinality/vq-vae-2-pytorch, for any number of levels:
- bottom-up, the bottom encoder takes the image to features at f = 2 ** len(channels),
  and each encoder above halves the features below it;
- top-down, the top grid quantises its features; every grid below quantises its own
  features joined to a decoding (x2) of the codes above it (`conditions`), so it spends
  its codes on what the coarser grids did not say;
- the codes, each grid's upsampled (x2, `upsamplers`) and joined to the next one's on the
  way down, reach the bottom resolution, where the decoder turns them into the image.
With two levels this is rosinality's model module for module (dec_t, quantize_conv_b,
upsample_t, dec); the paper's three-level FFHQ model (128^2, 64^2, 32^2 codes at 1024 px)
is `levels: 3` with channels for f = 8.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from tokenizer.config import Config, ConfigError, ModelConfig, QuantizerConfig
from tokenizer.models.base import TokenizerOutput
from tokenizer.models.rules import require_divisible_resolution
from tokenizer.models.single_grid import weight_dtype
from tokenizer.models.vqvae2_blocks import bottom_factor, check_blocks, hierarchy_blocks
from tokenizer.quantize import QuantizerOutput, VectorQuantizer, quantizer_from_config


def level_names(levels: int) -> list[str]:
    """Grid names, coarsest first: top, (middle | middle_1 .. middle_n), bottom."""
    if levels < 2:
        raise ValueError(f"a hierarchy needs at least 2 levels, got {levels}")
    middles = ["middle"] if levels == 3 else [f"middle_{i}" for i in range(1, levels - 1)]
    return ["top", *middles, "bottom"]


def level_quantizers(model: ModelConfig, quantizer: QuantizerConfig) -> list[QuantizerConfig]:
    """Each grid's quantizer config, coarsest first: the quantizer section with that
    grid's K and code dimension."""
    sizes = list(model.level_codebook_sizes) or [quantizer.codebook_size] * model.levels
    dims = list(model.level_code_dims) or [quantizer.code_dim] * model.levels
    return [
        replace(quantizer, codebook_size=k, code_dim=d) for k, d in zip(sizes, dims, strict=True)
    ]


_COMMON_KEYS = ("arch", "blocks", "in_channels", "num_res_blocks", "levels")
_LEVEL_KEYS = ("level_codebook_sizes", "level_code_dims")
_BLOCK_KEYS = {
    "paper": ("channels", "res_channels"),
    # grad_checkpointing changes neither weights nor codes.
    "vqgan": ("ch", "ch_mult", "attn_resolutions", "z_channels", "dropout"),
}


def release_keys(model: ModelConfig) -> tuple[str, ...]:
    """The model.* keys that decide a VQ-VAE-2's weights and codes, for its blocks."""
    return (*_COMMON_KEYS, *_BLOCK_KEYS[model.blocks], *_LEVEL_KEYS)


class VQVAE2(nn.Module):
    def __init__(self, model: ModelConfig, quantizer: QuantizerConfig, resolution: int) -> None:
        """`resolution`: the training resolution (data.resolution), at which
        model.attn_resolutions names the stages that attend (VQGAN blocks)."""
        super().__init__()
        self.names = level_names(model.levels)  # coarsest first
        configs = dict(zip(self.names, level_quantizers(model, quantizer), strict=True))
        blocks = hierarchy_blocks(model, resolution)
        self._bottom_factor = blocks.bottom_factor
        factors = self.downsample_factors()

        self.encoders = nn.ModuleDict()
        self.pre_quant = nn.ModuleDict()  # 1x1 convs into each grid's code space
        self.quantizer = nn.ModuleDict()  # release weights keyed quantizer.<grid>.*
        self.conditions = nn.ModuleDict()  # the codes above -> features at this grid (x2)
        self.upsamplers = nn.ModuleDict()  # the codes above -> this grid's resolution (x2)
        context = 0  # channels of the codes from the grids above, at the current grid
        for name in self.names:
            size = resolution // factors[name]  # this grid's side at training resolution
            if name == self.names[-1]:
                self.encoders[name] = blocks.bottom_encoder()
            else:
                self.encoders[name] = blocks.upper_encoder(2 * size)
            dim = configs[name].code_dim
            if context:
                self.conditions[name] = blocks.condition(context, dim, size)
                self.upsamplers[name] = nn.ConvTranspose2d(context, context, 4, stride=2, padding=1)
            joined = blocks.width + (dim if context else 0)
            self.pre_quant[name] = nn.Conv2d(joined, dim, kernel_size=1)
            self.quantizer[name] = quantizer_from_config(configs[name])
            context += dim
        self.decoder = blocks.decoder(context)

    @classmethod
    def from_config(cls, cfg: Config) -> VQVAE2:
        return cls(cfg.model, cfg.quantizer, cfg.data.resolution)

    @staticmethod
    def check_config(cfg: Config) -> None:
        """ConfigError for what a VQ-VAE-2 cannot build or honour."""
        m = cfg.model
        if m.levels < 2:
            raise ConfigError(
                f"model.levels must be >= 2 for model.arch 'vqvae2', got {m.levels} "
                "(one grid is model.arch: vqvae or vqgan)"
            )
        for key in _LEVEL_KEYS:
            values = getattr(m, key)
            if values and len(values) != m.levels:
                raise ConfigError(
                    f"model.{key} needs one entry per level (model.levels = {m.levels}, "
                    f"coarsest first) or none, got {list(values)}"
                )
        f = bottom_factor(m)
        rule = "2**(len(model.ch_mult) - 1)" if m.blocks == "vqgan" else "2**len(model.channels)"
        top = f * 2 ** (m.levels - 1)
        require_divisible_resolution(cfg, top, f"{rule} * 2**(model.levels - 1)")
        check_blocks(cfg, [cfg.data.resolution // (f * 2**i) for i in range(m.levels)])

    def quantizers(self) -> dict[str, VectorQuantizer]:
        return {name: self.quantizer[name] for name in self.names}

    def downsample_factors(self) -> dict[str, int]:
        above = len(self.names) - 1  # grids above the bottom one, each halving
        return {name: self._bottom_factor * 2 ** (above - i) for i, name in enumerate(self.names)}

    def last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight, where the adaptive GAN weight compares the
        gradient norms of the reconstruction and adversarial losses."""
        return self.decoder.last_layer

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        """Images (B, 3, H, W) -> grid name -> encoder features (B, width, H/f, W/f)."""
        h = x.to(weight_dtype(self.decoder))  # engines that cast weights (DeepSpeed bf16)
        features = {}
        for name in reversed(self.names):  # bottom-up
            h = self.encoders[name](h)  # (B, width, H/f_name, W/f_name)
            features[name] = h
        return features

    def _join(self, name: str, context: Tensor | None, quantized: Tensor) -> Tensor:
        """The codes of the grids above (B, C, h/2, w/2) and this grid's (B, D, h, w) ->
        (B, C + D, h, w): the decoder's input, once at the bottom grid."""
        quantized = quantized.to(weight_dtype(self.decoder))
        if context is None:
            return quantized
        return torch.cat([self.upsamplers[name](context), quantized], dim=1)

    def _quantize(self, x: Tensor) -> tuple[dict[str, QuantizerOutput], Tensor]:
        """Images -> every grid's quantizer output, and the joined codes (B, sum D, h, w)
        at the bottom grid's resolution."""
        features = self._features(x)
        grids: dict[str, QuantizerOutput] = {}
        context = None
        for name in self.names:  # top-down
            h = features[name]  # (B, width, h, w)
            if context is not None:
                h = torch.cat([self.conditions[name](context), h], dim=1)  # (B, D + width, h, w)
            # Never under a gradient checkpoint: a recomputed forward would repeat the
            # quantizer's EMA update, its dead-code bookkeeping and its collectives.
            grids[name] = self.quantizer[name](self.pre_quant[name](h))  # (B, D, h, w)
            context = self._join(name, context, grids[name].quantized)
        return grids, context

    def encode_codes(self, x: Tensor) -> dict[str, Tensor]:
        grids, _ = self._quantize(x)
        return {name: q.indices for name, q in grids.items()}  # (B, h, w) each

    def decode_codes(self, codes: dict[str, Tensor]) -> Tensor:
        context = None
        for name in self.names:
            context = self._join(name, context, self.quantizer[name].lookup(codes[name]))
        return self.decoder(context)  # (B, 3, H, W)

    def forward(self, x: Tensor) -> TokenizerOutput:
        grids, context = self._quantize(x)
        return TokenizerOutput(reconstruction=self.decoder(context), grids=grids)
