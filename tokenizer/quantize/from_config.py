"""The VectorQuantizer a QuantizerConfig describes: every model builds its quantizer here,
so an option added to the config reaches every architecture at once."""

from __future__ import annotations

from tokenizer.config import QuantizerConfig
from tokenizer.quantize.backends import search_from_config
from tokenizer.quantize.quantizer import VectorQuantizer


def quantizer_from_config(cfg: QuantizerConfig) -> VectorQuantizer:
    """A quantizer with every option of `cfg` (its search backend included)."""
    return VectorQuantizer(
        codebook_size=cfg.codebook_size,
        code_dim=cfg.code_dim,
        beta=cfg.beta,
        ema=cfg.ema,
        ema_decay=cfg.ema_decay,
        ema_epsilon=cfg.ema_epsilon,
        init=cfg.init,
        restart_threshold=cfg.restart_threshold,
        restart_unused_steps=cfg.restart_unused_steps,
        lookup_dim=cfg.lookup_dim,
        l2_normalize=cfg.l2_normalize,
        kmeans_iters=cfg.kmeans_iters,
        search=search_from_config(cfg),
    )
