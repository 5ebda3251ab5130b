"""VQGAN (Esser et al. 2021; LlamaGen's VQ-16 / VQ-8): the residual + attention encoder,
a 1x1 conv into the code space, the vector quantizer, a 1x1 conv out of it, the decoder.
Computes only; the perceptual and adversarial losses live in tokenizer/losses."""

from __future__ import annotations

from torch import Tensor, nn

from tokenizer.config import Config, ModelConfig, QuantizerConfig
from tokenizer.models.rules import require_attention_levels, require_divisible_resolution
from tokenizer.models.single_grid import SingleGridModel, weight_dtype
from tokenizer.nn.vqgan import Decoder, Encoder, level_resolutions
from tokenizer.quantize import quantizer_from_config


class VQGAN(SingleGridModel):
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
        require_attention_levels(cfg, level_resolutions(cfg.data.resolution, len(m.ch_mult)))

    def last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight, where the adaptive GAN weight (taming) compares
        the gradient norms of the reconstruction and adversarial losses."""
        return self.decoder.last_layer

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> z_e (B, code_dim, H/f, W/f)."""
        # Engines that cast the weights (DeepSpeed bf16) get inputs of the weights' dtype.
        h = self.encoder(x.to(weight_dtype(self.encoder)))  # (B, z_channels, H/f, W/f)
        return self.quant_conv(h)  # (B, code_dim, H/f, W/f)

    def decode(self, z_q: Tensor) -> Tensor:
        """(B, code_dim, h, w) -> (B, 3, h*f, w*f)."""
        h = self.post_quant_conv(z_q.to(weight_dtype(self.post_quant_conv)))  # (B, z, h, w)
        return self.decoder(h)  # (B, 3, h*f, w*f)
