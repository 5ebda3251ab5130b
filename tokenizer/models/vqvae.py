"""VQ-VAE (van den Oord et al. 2017): encoder, vector quantizer, decoder. Computes only."""

from __future__ import annotations

from torch import Tensor

from tokenizer.config import Config, ModelConfig, QuantizerConfig
from tokenizer.models.rules import refuse_grad_checkpointing, require_divisible_resolution
from tokenizer.models.single_grid import SingleGridModel, weight_dtype
from tokenizer.nn.paper import Decoder, Encoder
from tokenizer.quantize import quantizer_from_config


class VQVAE(SingleGridModel):
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

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> z_e (B, D, H/f, W/f)."""
        # Engines that cast the weights (DeepSpeed bf16) get inputs of the weights' dtype.
        return self.encoder(x.to(weight_dtype(self.encoder)))

    def decode(self, z_q: Tensor) -> Tensor:
        """(B, D, h, w) -> (B, 3, h*f, w*f)."""
        return self.decoder(z_q.to(weight_dtype(self.decoder)))
