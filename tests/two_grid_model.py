"""A test-only model with two named code grids, `top` (f=8) and `bottom` (f=4), each with
its own real VectorQuantizer: it runs the post-training chain (Tokenizer, release,
tokenize, index shards, verify, evaluation) on a hierarchy, as VQ-VAE-2 will.

Importing this module registers it as `model.arch: two-grid-test` (also in a fresh
process: the import is all it takes). The bottom codebook is twice the top one, so each
grid has its own K (and, from K > 32768 on, its own code dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenizer.api import Tokenizer
from tokenizer.config import Config, load_config
from tokenizer.models.base import TokenizerOutput
from tokenizer.models.registry import register_arch
from tokenizer.quantize import VectorQuantizer, search_from_config

ARCH = "two-grid-test"
TOP, BOTTOM = "top", "bottom"


def _quantizer(cfg: Config, codebook_size: int) -> VectorQuantizer:
    q = cfg.quantizer
    return VectorQuantizer(
        codebook_size=codebook_size,
        code_dim=q.code_dim,
        beta=q.beta,
        ema=q.ema,
        search=search_from_config(q),
    )


class TwoGridModel(nn.Module):
    """Bottom features at f=4, top at f=8 from them; the decoder upsamples the top code
    and joins it to the bottom code (VQ-VAE-2's wiring, one conv per stage)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        d, width = cfg.quantizer.code_dim, cfg.model.channels[0]
        self.enc_bottom = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, d, 4, stride=2, padding=1),
        )
        self.enc_top = nn.Conv2d(d, d, 4, stride=2, padding=1)
        self.quantize_top = _quantizer(cfg, cfg.quantizer.codebook_size)
        self.quantize_bottom = _quantizer(cfg, 2 * cfg.quantizer.codebook_size)
        self.up_top = nn.ConvTranspose2d(d, d, 4, stride=2, padding=1)
        self.dec = nn.Sequential(
            nn.Conv2d(2 * d, width, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(width, 3, 4, stride=2, padding=1),
            nn.Tanh(),
        )

    @classmethod
    def from_config(cls, cfg: Config) -> TwoGridModel:
        return cls(cfg)

    def quantizers(self) -> dict[str, VectorQuantizer]:
        return {TOP: self.quantize_top, BOTTOM: self.quantize_bottom}

    def downsample_factors(self) -> dict[str, int]:
        return {TOP: 8, BOTTOM: 4}

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bottom = self.enc_bottom(x)  # (B, D, H/4, W/4)
        return self.enc_top(bottom), bottom  # (B, D, H/8, W/8), (B, D, H/4, W/4)

    def _decode(self, top_q: Tensor, bottom_q: Tensor) -> Tensor:
        joined = torch.cat([self.up_top(top_q), bottom_q], dim=1)  # (B, 2D, H/4, W/4)
        return self.dec(joined)  # (B, 3, H, W)

    def encode_codes(self, x: Tensor) -> dict[str, Tensor]:
        top, bottom = self._encode(x)
        return {TOP: self.quantize_top(top).indices, BOTTOM: self.quantize_bottom(bottom).indices}

    def decode_codes(self, codes: dict[str, Tensor]) -> Tensor:
        top_q = self.quantize_top.lookup(codes[TOP])  # (B, D, H/8, W/8)
        bottom_q = self.quantize_bottom.lookup(codes[BOTTOM])  # (B, D, H/4, W/4)
        return self._decode(top_q, bottom_q)

    def forward(self, x: Tensor) -> TokenizerOutput:
        top, bottom = self._encode(x)
        qt, qb = self.quantize_top(top), self.quantize_bottom(bottom)
        return TokenizerOutput(self._decode(qt.quantized, qb.quantized), {TOP: qt, BOTTOM: qb})


register_arch(ARCH, TwoGridModel.from_config)


def two_grid_config(codebook_size: int = 16, resolution: int = 16) -> Config:
    # Three entries in model.channels (2 ** 3 = 8, the coarsest grid's factor, as a VQ-VAE
    # would read them; this arch registers no config rules of its own); only channels[0]
    # sets a width here.
    return load_config(
        overrides=[
            f"model.arch={ARCH}",
            "model.channels=[8,8,8]",
            f"quantizer.codebook_size={codebook_size}",
            "quantizer.code_dim=4",
            f"data.resolution={resolution}",
        ]
    )


def two_grid_tokenizer(seed: int = 0, codebook_size: int = 16, resolution: int = 16) -> Tokenizer:
    torch.manual_seed(seed)
    cfg = two_grid_config(codebook_size, resolution)
    return Tokenizer(TwoGridModel(cfg), cfg)
